//! Where things are written in `kiln.toml`: the source span of any key or
//! value by its path, from a second, span-keeping parse of the same text.
//!
//! The serde shapes in `raw` carry spans only where a check needs one
//! often; everything else (names that need quoting like `[images."a/b"]`,
//! numbers inside inline tables, array elements, map keys) is located here,
//! so an error points at the text whatever form it was written in: a
//! `[table]` header, dotted keys or an inline table.

use std::collections::BTreeSet;
use std::ops::Range;

use toml_edit::{ImDocument, Item, Table, Value};

/// A path segment: a key of a table, or the index of an array element
/// (written as decimal digits; only read as an index inside an array).
pub(crate) type Path<'p> = [&'p str];

/// The span-keeping view of one `kiln.toml` text.
pub(crate) struct Locator<'a> {
    doc: Option<ImDocument<&'a str>>,
}

/// What sits at a path: the span of the key (or array element) that names
/// it, and the span of the value when it is a value (tables are spread
/// over the file; their name is where they are).
struct Found {
    key: Option<Range<usize>>,
    value: Option<Range<usize>>,
}

impl<'a> Locator<'a> {
    pub fn new(text: &'a str) -> Locator<'a> {
        // The text already parsed as TOML once; should this parse still
        // fail, errors fall back to the nearest span known.
        Locator {
            doc: ImDocument::parse(text).ok(),
        }
    }

    fn walk(&self, path: &Path) -> Option<(Option<Range<usize>>, Node<'_>)> {
        let doc = self.doc.as_ref()?;
        let mut node = Node::Table(doc.as_table());
        let mut key = None;
        for seg in path {
            let (k, next) = node.step(seg)?;
            key = k;
            node = next;
        }
        Some((key, node))
    }

    fn find(&self, path: &Path) -> Option<Found> {
        let (key, node) = self.walk(path)?;
        Some(Found {
            key,
            value: node.value().and_then(Value::span),
        })
    }

    /// Whether anything is written at `path`.
    pub fn exists(&self, path: &Path) -> bool {
        self.walk(path).is_some()
    }

    /// The string written at `path`, if a string is.
    pub fn str(&self, path: &Path) -> Option<&str> {
        self.walk(path)?.1.value()?.as_str()
    }

    /// Where the name at `path` is written: the key itself (inside a
    /// `[header]`, a dotted key or an inline table), or an array element.
    pub fn key(&self, path: &Path) -> Range<usize> {
        self.nearest(path, |f| f.key.clone())
    }

    /// Where the value at `path` is written: the value for a value, the
    /// name for a table. Falls back to the nearest enclosing thing written.
    pub fn at(&self, path: &Path) -> Range<usize> {
        self.nearest(path, |f| f.value.clone().or(f.key.clone()))
    }

    fn nearest(&self, path: &Path, pick: impl Fn(&Found) -> Option<Range<usize>>) -> Range<usize> {
        (0..=path.len())
            .rev()
            .find_map(|n| self.find(&path[..n]).and_then(|f| pick(&f)))
            .unwrap_or(0..0)
    }

    /// Where the setting `keys` of an environment (with `role`, of one of
    /// its roles) comes from: the nearest environment up the `inherit`
    /// chain that writes `keys[0]`, as inheritance merges key by key.
    pub fn inherited(&self, env: &str, role: Option<&str>, keys: &Path) -> Range<usize> {
        match self.writer(env, role, keys[0]) {
            Some(owner) => self.at(&scoped(&owner, role, keys)),
            None => self.key(&scoped(env, role, &[])),
        }
    }

    /// Like [`Locator::inherited`], for where a name (a map key) is written.
    pub fn inherited_key(&self, env: &str, role: Option<&str>, keys: &Path) -> Range<usize> {
        match self.writer(env, role, keys[0]) {
            Some(owner) => self.key(&scoped(&owner, role, keys)),
            None => self.key(&scoped(env, role, &[])),
        }
    }

    /// The environment up `env`'s inherit chain that writes `key` (of
    /// `role`, when given), if any does.
    pub fn writer(&self, env: &str, role: Option<&str>, key: &str) -> Option<String> {
        let mut cur = env.to_string();
        let mut seen = BTreeSet::new();
        while seen.insert(cur.clone()) {
            if self.exists(&scoped(&cur, role, &[key])) {
                return Some(cur);
            }
            cur = self.str(&["env", &cur, "inherit"])?.to_string();
        }
        None
    }
}

/// `["env", env, "roles", role, keys...]`, or without the role part.
fn scoped<'p>(env: &'p str, role: Option<&'p str>, keys: &Path<'p>) -> Vec<&'p str> {
    let mut p = vec!["env", env];
    if let Some(r) = role {
        p.extend(["roles", r]);
    }
    p.extend_from_slice(keys);
    p
}

/// A place in the document: a table, or a value (which may itself be an
/// inline table or an array).
#[derive(Clone, Copy)]
enum Node<'d> {
    Table(&'d Table),
    Value(&'d Value),
    /// Something kiln.toml never has (an array of tables, say): nothing
    /// below it is looked up.
    Other,
}

impl<'d> Node<'d> {
    fn of(item: &'d Item) -> Node<'d> {
        match item {
            Item::Table(t) => Node::Table(t),
            Item::Value(v) => Node::Value(v),
            _ => Node::Other,
        }
    }

    fn value(self) -> Option<&'d Value> {
        match self {
            Node::Value(v) => Some(v),
            _ => None,
        }
    }

    /// One step down: the span of what names the child, and the child.
    fn step(self, seg: &str) -> Option<(Option<Range<usize>>, Node<'d>)> {
        match self {
            Node::Table(t) => t.get_key_value(seg).map(|(k, i)| (k.span(), Node::of(i))),
            Node::Value(Value::InlineTable(t)) => {
                t.get_key_value(seg).map(|(k, i)| (k.span(), Node::of(i)))
            }
            Node::Value(Value::Array(a)) => {
                let v = a.get(seg.parse().ok()?)?;
                Some((v.span(), Node::Value(v)))
            }
            _ => None,
        }
    }
}
