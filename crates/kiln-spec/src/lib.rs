//! Parsing and validation of `kiln.toml`.
//!
//! Owns the project file format (a contract, see `../shared/DESIGN.md`): the
//! raw serde shapes with their source spans, defaults, environment
//! inheritance, and every check that can be made without running anything.
//! Every error names `file:line:column` and what was expected.

mod check;
mod duration;
mod locate;
mod raw;
mod supply;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use kiln_model::*;
use toml::Spanned;

pub use check::{
    MAX_APPROVALS, MAX_CHECK_STREAK, MAX_CPUS, MAX_ENVS, MAX_IMAGES, MAX_MTIME, MAX_QUEUE_TIMEOUT,
    MAX_REQUESTS, MAX_ROLES, MAX_SERVERS, MIN_CHECK_INTERVAL, MIN_CPUS, MIN_MEMORY,
};
pub use duration::{format_duration, parse_duration, parse_size, MAX_DURATION, MAX_SIZE};
use locate::Locator;
use raw::*;
pub use supply::is_secret_name;

/// The project file's name inside a project directory.
pub const PROJECT_FILE: &str = "kiln.toml";

/// The kernel's highest `pid_max`: a pids limit above it means nothing.
const MAX_PIDS: i64 = 4_194_304;

/// Below this a build script cannot even start a shell.
const MIN_BUILD_MEMORY: u64 = 4 << 20;

/// Default Debian mirror for `debootstrap` bases.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// A problem with a project file, located in it.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// cannot read {path}
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// {file}:{line}:{column}: {message}
    #[error("{file}:{line}:{column}: {message}")]
    At {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

impl SpecError {
    /// The line and column the error points at, if it points anywhere.
    pub fn location(&self) -> Option<(usize, usize)> {
        match self {
            SpecError::At { line, column, .. } => Some((*line, *column)),
            SpecError::Read { .. } => None,
        }
    }
}

/// Loads and validates `kiln.toml` from a project directory.
pub fn load(dir: &Path) -> Result<Project, SpecError> {
    let file = dir.join(PROJECT_FILE);
    let text = std::fs::read_to_string(&file).map_err(|source| SpecError::Read {
        path: file.clone(),
        source,
    })?;
    let dir = std::fs::canonicalize(dir).map_err(|source| SpecError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    parse(&text, &file, &dir)
}

/// Parses project text. `file` is only used in error messages; `dir` is the
/// project directory that relative paths are resolved against.
///
/// Every value is range-checked here, with checked arithmetic, so that
/// nothing downstream (planner, image builder, runtime) meets a value it
/// cannot handle. One check looks at the host: a balancer's `listen`
/// address must be one of this host's (`host_has`).
pub fn parse(text: &str, file: &Path, dir: &Path) -> Result<Project, SpecError> {
    let mut cx = Cx {
        text,
        file,
        loc: Locator::new(""),
    };
    let raw: RawFile = toml::from_str(text)
        .map_err(|e| cx.err(e.span().unwrap_or(0..0), e.message().to_string()))?;
    cx.loc = Locator::new(text);
    Validator { cx, dir }.project(raw)
}

struct Cx<'a> {
    text: &'a str,
    file: &'a Path,
    loc: Locator<'a>,
}

impl Cx<'_> {
    fn err(&self, span: Range<usize>, message: impl fmt::Display) -> SpecError {
        let mut start = span.start.min(self.text.len());
        while !self.text.is_char_boundary(start) {
            start -= 1;
        }
        let upto = &self.text[..start];
        let line = upto.matches('\n').count() + 1;
        let column = upto
            .rsplit('\n')
            .next()
            .map(|l| l.chars().count())
            .unwrap_or(0)
            + 1;
        SpecError::At {
            file: self.file.to_path_buf(),
            line,
            column,
            message: message.to_string(),
        }
    }
}

struct Validator<'a> {
    cx: Cx<'a>,
    dir: &'a Path,
}

impl Validator<'_> {
    fn project(&self, raw: RawFile) -> Result<Project, SpecError> {
        let name = raw.project.name.clone();
        check_name(&self.cx, name.get_ref(), name.span(), "project name")?;
        for (what, count, max, key) in [
            ("images", raw.images.len(), MAX_IMAGES, "images"),
            ("environments", raw.env.len(), MAX_ENVS, "env"),
        ] {
            if count > max {
                return Err(self.cx.err(
                    self.cx.loc.key(&[key]),
                    format!("{count} {what} are more than kiln takes ({max})"),
                ));
            }
        }
        let import_limit = match &raw.project.import_limit {
            Some(l) => self.import_limit(l)?,
            None => DEFAULT_IMPORT_LIMIT,
        };
        let mut images = BTreeMap::new();
        for (iname, img) in &raw.images {
            check_name(
                &self.cx,
                iname,
                self.cx.loc.key(&["images", iname]),
                "image name",
            )?;
            let mut spec = self.image(iname, img, import_limit)?;
            self.supply_chain(&raw.project, iname, img, &mut spec)?;
            images.insert(iname.clone(), spec);
        }
        self.check_image_graph(&raw, &images)?;
        let envs = self.envs(&raw, &images)?;
        let vulnerabilities = self.advisories(&raw.project)?;
        Ok(Project {
            name: name.into_inner(),
            dir: self.dir.to_path_buf(),
            images,
            envs,
            vulnerabilities,
        })
    }

    fn image(&self, name: &str, img: &RawImage, import_limit: u64) -> Result<ImageSpec, SpecError> {
        let from = match img.from.as_ref() {
            None => return Err(self.cx.err(self.header(&["images", name]), format!("image `{name}` has no `from`; expected \"scratch\", an image name, or a table with `rootfs`, `oci` or `debootstrap`"))),
            Some(f) => self.source(name, f)?,
        };
        let base = self.dir.join("images").join(name);
        let at = |keys: &[&str]| self.cx.loc.at(&[&["images", name], keys].concat());
        let key_at = |keys: &[&str]| self.cx.loc.key(&[&["images", name], keys].concat());
        let health = img
            .health
            .as_ref()
            .map(|h| self.health(h, &|k| at(&[&["health"], k].concat())))
            .transpose()?;
        for (key, argv) in [("entrypoint", &img.entrypoint), ("cmd", &img.cmd)] {
            let Some(argv) = argv else { continue };
            if argv.is_empty() {
                return Err(self.cx.err(
                    at(&[key]),
                    format!("`{key} = []` has no effect (the base image's is kept); remove it, or name the program to run"),
                ));
            }
            check::argv(argv, key).map_err(|(i, m)| self.cx.err(at(&[key, &i.to_string()]), m))?;
        }
        if let Some(vars) = &img.env {
            check::env_vars(vars).map_err(|(k, m)| self.cx.err(key_at(&["env", k]), m))?;
        }
        if let Some(w) = &img.workdir {
            check::abs_path(w, "workdir").map_err(|m| self.cx.err(at(&["workdir"]), m))?;
        }
        if let Some(ports) = &img.ports {
            self.ports(ports, &|i| at(&["ports", &i.to_string()]))?;
        }
        for (i, t) in img.test.iter().flatten().enumerate() {
            let i = i.to_string();
            if t.is_empty() {
                return Err(self.cx.err(
                    at(&["test", &i]),
                    "test command is empty; expected a program and its arguments",
                ));
            }
            check::argv(t, "test command")
                .map_err(|(j, m)| self.cx.err(at(&["test", &i, &j.to_string()]), m))?;
        }
        for (k, v) in img.labels.iter().flatten() {
            check::label(k, v).map_err(|m| self.cx.err(key_at(&["labels", k]), m))?;
        }
        if let Some(t) = img.mtime.filter(|t| *t > MAX_MTIME) {
            return Err(self.cx.err(
                at(&["mtime"]),
                format!("mtime = {t} is after the year 9999; expected seconds since 1970 up to {MAX_MTIME}"),
            ));
        }
        let user = img
            .user
            .as_ref()
            .map(|u| {
                u.get_ref().parse::<UserSpec>().map_err(|e| {
                    self.cx.err(
                        u.span(),
                        format!("bad `user`: {e}; expected \"NAME\", \"UID\", \"NAME:GROUP\" or \"UID:GID\""),
                    )
                })
            })
            .transpose()?;
        let build_limits = self.build_limits(img)?;
        let import_limit_bytes = match &img.import_limit {
            Some(l) => self.import_limit(l)?,
            None => import_limit,
        };
        Ok(ImageSpec {
            name: name.to_string(),
            from,
            files_dir: base.join("files"),
            scripts_dir: base.join("scripts"),
            entrypoint: img.entrypoint.clone().unwrap_or_default(),
            cmd: img.cmd.clone().unwrap_or_default(),
            env: img.env.clone().unwrap_or_default(),
            workdir: img.workdir.clone(),
            ports: img.ports.clone().unwrap_or_default(),
            health,
            test: img.test.clone().unwrap_or_default(),
            labels: img.labels.clone().unwrap_or_default(),
            mtime: img.mtime.unwrap_or(0),
            build_network: img.network.unwrap_or(true),
            user,
            build_limits,
            import_limit_bytes,
            scan: None,
            hardening: Hardening::default(),
        })
    }

    /// `limits` and `timeout` of an image's build scripts and tests.
    fn build_limits(&self, img: &RawImage) -> Result<BuildLimits, SpecError> {
        let mut out = BuildLimits::default();
        if let Some(l) = &img.limits {
            let at = |m: String| self.cx.err(l.span(), m);
            if let Some(p) = l.get_ref().pids {
                if !(1..=MAX_PIDS).contains(&p) {
                    return Err(at(format!(
                        "limits.pids = {p} is out of range; expected 1 to {MAX_PIDS}"
                    )));
                }
                out.pids = p as u32;
            }
            if let Some(m) = &l.get_ref().memory {
                let bytes = parse_size(m).map_err(&at)?;
                if !(MIN_BUILD_MEMORY..=i64::MAX as u64).contains(&bytes) {
                    return Err(at(format!(
                        "limits.memory = \"{m}\" is out of range; expected at least 4M"
                    )));
                }
                out.memory_bytes = bytes;
            }
        }
        if let Some(t) = &img.timeout {
            let at = |m: String| self.cx.err(t.span(), m);
            let expected =
                "expected a duration like \"30m\" or { script = \"30m\", test = \"5m\" }";
            let secs = |d: &str| -> Result<u64, SpecError> {
                let secs = parse_duration(d).map_err(&at)?.as_secs();
                if secs == 0 {
                    return Err(at(format!("timeout `{d}` is shorter than a second")));
                }
                Ok(secs)
            };
            match t.get_ref() {
                toml::Value::String(d) => {
                    out.script_timeout_secs = secs(d)?;
                    out.test_timeout_secs = out.script_timeout_secs;
                }
                v @ toml::Value::Table(_) => {
                    let r: RawTimeouts = v.clone().try_into().map_err(|e: toml::de::Error| {
                        at(format!(
                            "bad `timeout` table: {}; {expected}",
                            e.message().trim()
                        ))
                    })?;
                    if let Some(d) = &r.script {
                        out.script_timeout_secs = secs(d)?;
                    }
                    if let Some(d) = &r.test {
                        out.test_timeout_secs = secs(d)?;
                    }
                }
                other => {
                    return Err(at(format!(
                        "`timeout` is a {}; {expected}",
                        other.type_str()
                    )))
                }
            }
        }
        Ok(out)
    }

    /// `import_limit = "8G"`: at least one byte.
    fn import_limit(&self, l: &Spanned<String>) -> Result<u64, SpecError> {
        match parse_size(l.get_ref()) {
            Ok(0) => Err(self
                .cx
                .err(l.span(), "import_limit must be more than 0 bytes")),
            Ok(n) => Ok(n),
            Err(e) => Err(self.cx.err(l.span(), e)),
        }
    }

    /// Docker's default capability set with a role's `drop` and `add`
    /// applied the way Docker applies `--cap-drop` and `--cap-add`: `add =
    /// ["ALL"]` starts from every capability, `drop = ["ALL"]` from none.
    fn capabilities(&self, r: &RawCapabilities) -> Result<BTreeSet<Capability>, SpecError> {
        // Whether the list says "ALL", and its capabilities with their spans.
        type Listed = (bool, Vec<(Capability, Range<usize>)>);
        let parse = |list: &Option<Vec<Spanned<String>>>| -> Result<Listed, SpecError> {
            let mut all = false;
            let mut caps = Vec::new();
            for c in list.iter().flatten() {
                if c.get_ref().trim().eq_ignore_ascii_case("ALL") {
                    all = true;
                    continue;
                }
                let cap = c
                    .get_ref()
                    .parse::<Capability>()
                    .map_err(|e| self.cx.err(c.span(), e))?;
                caps.push((cap, c.span()));
            }
            Ok((all, caps))
        };
        let (drop_all, drop) = parse(&r.drop)?;
        let (add_all, add) = parse(&r.add)?;
        if let Some((cap, span)) = add.iter().find(|(a, _)| drop.iter().any(|(d, _)| d == a)) {
            return Err(self.cx.err(
                span.clone(),
                format!("capability {cap} is both dropped and added"),
            ));
        }
        let mut set = if add_all {
            Capability::ALL.into_iter().collect()
        } else if drop_all {
            BTreeSet::new()
        } else {
            Capability::docker_default()
        };
        for (d, _) in &drop {
            set.remove(d);
        }
        if !add_all {
            set.extend(add.iter().map(|(a, _)| *a));
        }
        Ok(set)
    }

    fn source(&self, image: &str, from: &Spanned<toml::Value>) -> Result<ImageSource, SpecError> {
        let expected = "expected \"scratch\", an image name, or a table with one of `rootfs`, `oci`, `debootstrap`";
        let at = |m: String| self.cx.err(from.span(), m);
        let t: RawFromTable = match from.get_ref() {
            toml::Value::String(n) if n == "scratch" => return Ok(ImageSource::Scratch),
            toml::Value::String(n) => return Ok(ImageSource::Image(n.clone())),
            v @ toml::Value::Table(_) => v.clone().try_into().map_err(|e: toml::de::Error| {
                at(format!(
                    "bad `from` table: {}; {expected}",
                    e.message().trim()
                ))
            })?,
            other => return Err(at(format!("`from` is a {}; {expected}", other.type_str()))),
        };
        let given = [t.rootfs.is_some(), t.oci.is_some(), t.debootstrap.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if given != 1 {
            return Err(at(format!(
                "`from` table names {given} sources; {expected}"
            )));
        }
        if let Some(s) = &t.rootfs {
            let path = self.dir.join(s);
            if !(s.ends_with(".tar")
                || s.ends_with(".tar.gz")
                || s.ends_with(".tgz")
                || s.ends_with(".tar.zst"))
            {
                return Err(at(format!("rootfs `{s}` is not a tarball; expected a .tar, .tar.gz, .tgz or .tar.zst file")));
            }
            if !path.is_file() {
                return Err(at(format!(
                    "rootfs tarball `{}` does not exist",
                    path.display()
                )));
            }
            return Ok(ImageSource::Rootfs(path));
        }
        if let Some(s) = &t.oci {
            let (dir, tag) = match s.rsplit_once(':') {
                Some((d, t)) if !d.is_empty() && !t.is_empty() && !t.contains('/') => (d, t),
                _ => {
                    return Err(at(format!(
                        "oci source `{s}` has no tag; expected \"DIR:TAG\""
                    )))
                }
            };
            let path = self.dir.join(dir);
            if !path.join("index.json").is_file() {
                return Err(at(format!(
                    "`{}` is not an OCI image layout (no index.json)",
                    path.display()
                )));
            }
            return Ok(ImageSource::Oci {
                dir: path,
                tag: tag.to_string(),
            });
        }
        let suite = t.debootstrap.clone().expect("counted above");
        if suite.is_empty() || !suite.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(at(
                "debootstrap suite must be a Debian suite name like \"bookworm\"".into(),
            ));
        }
        let key_at = |k: &str| self.cx.loc.at(&["images", image, "from", k]);
        let mirror = t
            .mirror
            .clone()
            .unwrap_or_else(|| DEFAULT_MIRROR.to_string());
        check::mirror(&mirror).map_err(|m| self.cx.err(key_at("mirror"), m))?;
        let variant = t.variant.clone().unwrap_or_else(|| "minbase".to_string());
        check::variant(&variant).map_err(|m| self.cx.err(key_at("variant"), m))?;
        Ok(ImageSource::Debootstrap {
            suite,
            mirror,
            variant,
        })
    }

    /// Where a table is named, for errors about the whole table: the name
    /// in its `[header]`, dotted key or inline table, however it is quoted.
    fn header(&self, keys: &[&str]) -> Range<usize> {
        self.cx.loc.key(keys)
    }

    /// `max_requests` (1 to [`MAX_REQUESTS`]) and `queue_timeout` (at most
    /// [`MAX_QUEUE_TIMEOUT`]; `"0s"`: no waiting): HTTP mode only, where
    /// requests are admitted one by one. `at` locates a key.
    fn queue_settings(
        &self,
        rb: &RawBalancer,
        mode: BalancerMode,
        at: &dyn Fn(&str) -> Range<usize>,
    ) -> Result<(Option<u32>, Option<u64>), SpecError> {
        for (key, set) in [
            ("max_requests", rb.max_requests.is_some()),
            ("queue_timeout", rb.queue_timeout.is_some()),
        ] {
            if set && mode != BalancerMode::Http {
                return Err(self.cx.err(
                    at(key),
                    format!("`{key}` applies to HTTP mode, where requests are admitted one by one; this balancer is in TCP mode (set `mode = \"http\"` or remove `{key}`)"),
                ));
            }
        }
        if let Some(n) = rb.max_requests {
            check::max_requests(n).map_err(|m| self.cx.err(at("max_requests"), m))?;
        }
        let timeout = match &rb.queue_timeout {
            None => None,
            Some(t) => {
                let e = |m| self.cx.err(at("queue_timeout"), m);
                Some(check::queue_timeout(parse_duration(t).map_err(e)?, t).map_err(e)?)
            }
        };
        Ok((rb.max_requests, timeout))
    }

    /// `tls = { cert, key }` (paths relative to the project) or
    /// `tls = { acme = { directory, email, domains, ca, renew_before } }`.
    fn balancer_tls(&self, t: &Spanned<RawTls>) -> Result<BalancerTls, SpecError> {
        let raw = t.get_ref();
        let path = |p: &Spanned<String>, what: &str| -> Result<String, SpecError> {
            let full = self.dir.join(p.get_ref());
            if !full.is_file() {
                return Err(self.cx.err(
                    p.span(),
                    format!("balancer tls {what} `{}` does not exist", p.get_ref()),
                ));
            }
            Ok(full.to_string_lossy().into_owned())
        };
        match (&raw.cert, &raw.key, &raw.acme) {
            (Some(cert), Some(key), None) => Ok(BalancerTls::Files {
                cert: path(cert, "cert")?,
                key: path(key, "key")?,
            }),
            (None, None, Some(acme)) => {
                let a = acme.get_ref();
                let directory = a.directory.get_ref();
                if !directory.starts_with("https://") || directory.len() <= "https://".len() {
                    return Err(self.cx.err(
                        a.directory.span(),
                        format!("acme directory `{directory}` is not an https:// URL"),
                    ));
                }
                let email = a.email.get_ref();
                if !email.contains('@') || email.contains(char::is_whitespace) {
                    return Err(self.cx.err(
                        a.email.span(),
                        format!("acme email `{email}` is not an email address"),
                    ));
                }
                if a.domains.get_ref().is_empty() {
                    return Err(self.cx.err(
                        a.domains.span(),
                        "acme domains is empty; expected the names to certify",
                    ));
                }
                let mut domains = Vec::new();
                for d in a.domains.get_ref() {
                    let name = d.get_ref();
                    let ok = !name.is_empty()
                        && name.len() <= 253
                        && name.split('.').all(|l| {
                            !l.is_empty()
                                && l.len() <= 63
                                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                        });
                    if !ok {
                        return Err(self
                            .cx
                            .err(d.span(), format!("acme domain `{name}` is not a DNS name")));
                    }
                    domains.push(name.to_ascii_lowercase());
                }
                let ca = a.ca.as_ref().map(|c| path(c, "acme ca")).transpose()?;
                let renew_before_secs = match &a.renew_before {
                    None => 30 * 86_400,
                    Some(r) => self.secs(
                        r.get_ref(),
                        r.span(),
                        "renew_before",
                        Some("the certificate would only be renewed once it has expired"),
                    )?,
                };
                Ok(BalancerTls::Acme {
                    directory: directory.clone(),
                    email: email.clone(),
                    domains,
                    ca,
                    renew_before_secs,
                })
            }
            (Some(_), None, None) => Err(self
                .cx
                .err(t.span(), "balancer tls has a `cert` but no `key`")),
            (None, Some(_), None) => Err(self
                .cx
                .err(t.span(), "balancer tls has a `key` but no `cert`")),
            (None, None, None) => Err(self.cx.err(
                t.span(),
                "balancer tls is empty; expected `cert` and `key`, or `acme`",
            )),
            _ => Err(self.cx.err(
                t.span(),
                "balancer tls has both certificate files and `acme`; choose one",
            )),
        }
    }

    /// `at` locates a key (path) inside the health table.
    fn health(
        &self,
        h: &Spanned<RawHealth>,
        at: &dyn Fn(&[&str]) -> Range<usize>,
    ) -> Result<HealthCheck, SpecError> {
        let r = h.get_ref();
        let bad = |m: &str| {
            Err(self.cx.err(h.span(), format!("{m}; expected {{ http = \"/path\", port = N }}, {{ tcp = N }} or {{ command = [...] }}")))
        };
        let port = |p: u16, key: &str| {
            check::port(p, &format!("health check {key}")).map_err(|m| self.cx.err(at(&[key]), m))
        };
        match (&r.http, r.port, r.tcp, &r.command) {
            (Some(path), Some(p), None, None) => {
                check::http_path(path).map_err(|m| self.cx.err(at(&["http"]), m))?;
                port(p, "port")?;
                Ok(HealthCheck::Http {
                    path: path.clone(),
                    port: p,
                })
            }
            (Some(_), None, None, None) => bad("http health check has no `port`"),
            (None, None, Some(p), None) => {
                port(p, "tcp")?;
                Ok(HealthCheck::Tcp { port: p })
            }
            (None, None, None, Some(argv)) if !argv.is_empty() => {
                check::argv(argv, "health command")
                    .map_err(|(i, m)| self.cx.err(at(&["command", &i.to_string()]), m))?;
                Ok(HealthCheck::Command { argv: argv.clone() })
            }
            _ => bad("health check must be exactly one kind"),
        }
    }

    /// A duration kept in whole seconds, at `span`; `zero` says why zero is
    /// refused, when it is.
    fn secs(
        &self,
        written: &str,
        span: Range<usize>,
        what: &str,
        zero: Option<&str>,
    ) -> Result<u64, SpecError> {
        let d = parse_duration(written).map_err(|e| self.cx.err(span.clone(), e))?;
        if let Some(why) = zero {
            check::nonzero(d, written, what, why).map_err(|m| self.cx.err(span.clone(), m))?;
        }
        check::whole_secs(d, written, what).map_err(|m| self.cx.err(span, m))
    }

    fn ttl(&self, t: &Spanned<String>) -> Result<u64, SpecError> {
        self.secs(
            t.get_ref(),
            t.span(),
            "ttl",
            Some("every server would expire as soon as it starts; remove `ttl` to keep servers until they are replaced"),
        )
    }

    /// Ports a server listens on: 1 to 65535, each once. `at` locates the
    /// `i`-th element.
    fn ports(&self, ports: &[u16], at: &dyn Fn(usize) -> Range<usize>) -> Result<(), SpecError> {
        let mut seen = BTreeSet::new();
        for (i, p) in ports.iter().enumerate() {
            check::port(*p, "port").map_err(|m| self.cx.err(at(i), m))?;
            if !seen.insert(p) {
                return Err(self.cx.err(at(i), format!("port {p} is listed twice")));
            }
        }
        Ok(())
    }

    fn check_image_graph(
        &self,
        raw: &RawFile,
        images: &BTreeMap<String, ImageSpec>,
    ) -> Result<(), SpecError> {
        for (name, img) in images {
            if let ImageSource::Image(parent) = &img.from {
                let span = raw.images[name]
                    .from
                    .as_ref()
                    .map(|f| f.span())
                    .unwrap_or(0..0);
                if !images.contains_key(parent) {
                    let known: Vec<_> = images.keys().map(String::as_str).collect();
                    return Err(self.cx.err(span, format!("image `{name}` is built from unknown image `{parent}`; expected \"scratch\" or one of: {}", known.join(", "))));
                }
                // Walk up from this image: coming back to it is a cycle.
                let mut seen = BTreeSet::new();
                let mut cur = parent.as_str();
                while let Some(ImageSource::Image(p)) = images.get(cur).map(|i| &i.from) {
                    if cur == name || !seen.insert(cur) {
                        break;
                    }
                    cur = p;
                }
                if cur == name {
                    return Err(self.cx.err(
                        span,
                        format!("image `{name}` is built from itself through a cycle of `from`"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn envs(
        &self,
        raw: &RawFile,
        images: &BTreeMap<String, ImageSpec>,
    ) -> Result<BTreeMap<String, EnvSpec>, SpecError> {
        let mut out = BTreeMap::new();
        for (name, env) in &raw.env {
            check_name(
                &self.cx,
                name,
                self.header(&["env", name]),
                "environment name",
            )?;
            let merged = self.inherited(raw, name, env)?;
            out.insert(name.clone(), self.env(name, &merged, images)?);
        }
        self.subnets(raw, &mut out)?;
        for env in out.values() {
            self.capacity(env)?;
            self.balancers(env)?;
        }
        Ok(out)
    }

    /// Every server of an environment needs an address of its subnet.
    fn capacity(&self, env: &EnvSpec) -> Result<(), SpecError> {
        let capacity = u64::from(env.subnet.capacity());
        let mut total = 0u64;
        for role in env.roles.values() {
            if role.servers > MAX_SERVERS {
                return Err(self.cx.err(
                    self.cx.loc.inherited(&env.name, Some(&role.name), &["servers"]),
                    format!(
                        "role `{}` declares {} servers, more than one role can have ({MAX_SERVERS}: half of its 65,536 server ids, so that every server can be replaced at once)",
                        role.name, role.servers
                    ),
                ));
            }
            total += u64::from(role.servers);
            if total > capacity {
                return Err(self.cx.err(
                    self.cx.loc.inherited(&env.name, Some(&role.name), &["servers"]),
                    format!(
                        "role `{}` brings environment `{}` to {total} servers; its subnet {} holds at most {capacity}",
                        role.name, env.name, env.subnet
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Balancers of an environment listen on distinct addresses (a
    /// wildcard address takes its port on every address), each one this
    /// host has or the environment's own gateway.
    fn balancers(&self, env: &EnvSpec) -> Result<(), SpecError> {
        // Every address a balancer listens on: its front, and its admin
        // (metrics) listener if it has one.
        let mut seen: Vec<(std::net::SocketAddr, &str, &str)> = Vec::new();
        for role in env.roles.values() {
            let Some(b) = &role.balancer else { continue };
            let fronts = [("listen", Some(&b.listen)), ("admin", b.admin.as_ref())];
            for (key, addr) in fronts {
                let Some(addr) = addr else { continue };
                let at = || {
                    self.cx
                        .loc
                        .inherited(&env.name, Some(&role.name), &["balancer", key])
                };
                let addr: std::net::SocketAddr = addr.parse().map_err(|_| {
                    self.cx
                        .err(at(), format!("balancer {key} `{addr}` is not an address"))
                })?;
                check::port(addr.port(), &format!("balancer {key} port"))
                    .map_err(|m| self.cx.err(at(), m))?;
                if let Some((other, r, k)) = seen.iter().find(|(o, ..)| listen_clash(o, &addr)) {
                    return Err(self.cx.err(
                        at(),
                        format!("balancer {key} of role `{}` is {addr}, which the balancer {k} of role `{r}` takes ({other})", role.name),
                    ));
                }
                if addr.ip() != std::net::IpAddr::V4(env.subnet.gateway()) && !host_has(addr.ip()) {
                    return Err(self.cx.err(
                        at(),
                        format!("balancer {key} address {} is not an address of this host (no interface has it); expected a local address, 127.0.0.1 or 0.0.0.0", addr.ip()),
                    ));
                }
                seen.push((addr, &role.name, key));
            }
        }
        Ok(())
    }

    /// The environment with everything it inherits folded in, nearest first.
    fn inherited(&self, raw: &RawFile, name: &str, env: &RawEnv) -> Result<RawEnv, SpecError> {
        let mut merged = env.clone();
        let mut seen = BTreeSet::from([name.to_string()]);
        let mut next = env.inherit.clone();
        while let Some(parent) = next {
            let Some(p) = raw.env.get(parent.get_ref()) else {
                return Err(self.cx.err(
                    parent.span(),
                    format!(
                        "environment `{name}` inherits unknown environment `{}`",
                        parent.get_ref()
                    ),
                ));
            };
            if !seen.insert(parent.get_ref().clone()) {
                return Err(self.cx.err(
                    parent.span(),
                    format!("environment `{name}` inherits itself through a cycle"),
                ));
            }
            merged = merged.over(p);
            next = p.inherit.clone();
        }
        Ok(merged)
    }

    fn env(
        &self,
        name: &str,
        env: &RawEnv,
        images: &BTreeMap<String, ImageSpec>,
    ) -> Result<EnvSpec, SpecError> {
        let at = |keys: &[&str]| self.cx.loc.inherited(name, None, keys);
        let provider = match &env.provider {
            None => ProviderSpec::Local,
            Some(p) => self.provider(name, p)?,
        };
        if env.roles.len() > MAX_ROLES {
            return Err(self.cx.err(
                self.header(&["env", name]),
                format!(
                    "environment `{name}` has {} roles, more than kiln takes ({MAX_ROLES})",
                    env.roles.len()
                ),
            ));
        }
        if let Some(n) = env.approvals.filter(|n| *n > MAX_APPROVALS) {
            return Err(self.cx.err(
                at(&["approvals"]),
                format!("approvals = {n} is out of range; expected 0 to {MAX_APPROVALS}"),
            ));
        }
        if let Some(a) = &env.alarm {
            check::text(a, "alarm").map_err(|m| self.cx.err(at(&["alarm"]), m))?;
        }
        for (i, id) in env.pipeline_identities.iter().flatten().enumerate() {
            check::text(id, "pipeline identity")
                .map_err(|m| self.cx.err(at(&["pipeline_identities", &i.to_string()]), m))?;
        }
        if let Some(p) = env.replace_share {
            check::percent(p, "replace_share")
                .map_err(|m| self.cx.err(at(&["replace_share"]), m))?;
        }
        if let Some(t) = &env.ttl {
            self.ttl(t)?;
        }
        let subnet = match &env.subnet {
            Some(s) => s.get_ref().parse::<Subnet>().map_err(|e| {
                self.cx
                    .err(s.span(), format!("subnet `{}`: {e}", s.get_ref()))
            })?,
            // A placeholder: `subnets` gives every environment without one
            // its own once all are known.
            None => Subnet::new(std::net::Ipv4Addr::UNSPECIFIED, 16).expect("0.0.0.0/16"),
        };
        let mut roles = BTreeMap::new();
        for (rname, role) in &env.roles {
            check_name(
                &self.cx,
                rname,
                self.header(&["env", name, "roles", rname]),
                "role name",
            )?;
            roles.insert(rname.clone(), self.role(name, rname, role, env, images)?);
        }
        for (rname, role) in &env.roles {
            for dep in role.depends_on.iter().flatten() {
                if !roles.contains_key(dep.get_ref()) {
                    return Err(self.cx.err(
                        dep.span(),
                        format!("role `{rname}` depends on unknown role `{}`", dep.get_ref()),
                    ));
                }
            }
        }
        if let ProviderSpec::Swarm(_) = provider {
            for (rname, role) in &env.roles {
                self.swarm_role(name, rname, role, &roles[rname])?;
            }
        }
        if let Some(role) = dependency_cycle(&roles) {
            return Err(self.cx.err(
                self.header(&["env", name, "roles", &role]),
                format!("role `{role}` depends on itself through `depends_on`"),
            ));
        }
        Ok(EnvSpec {
            name: name.to_string(),
            provider,
            subnet,
            subnet_declared: env.subnet.is_some(),
            approvals: env.approvals.unwrap_or(0),
            pipeline_identities: env.pipeline_identities.clone().unwrap_or_default(),
            alarm: env.alarm.clone(),
            quarantine_secs: match &env.quarantine {
                Some(q) => self.secs(q.get_ref(), q.span(), "quarantine", Some("a quarantined server's evidence would be deleted at once; kill without quarantine is `drift = \"replace\"`"))?,
                None => 7 * 86_400,
            },
            dns_ttl_secs: match &env.dns {
                Some(d) => match &d.get_ref().ttl {
                    Some(t) => {
                        let ttl = parse_duration(t).map_err(|e| self.cx.err(d.span(), e))?;
                        if ttl.as_secs() > 3600 || ttl.subsec_nanos() != 0 {
                            return Err(self.cx.err(
                                d.span(),
                                format!("dns ttl `{t}` must be whole seconds, at most 1h"),
                            ));
                        }
                        ttl.as_secs() as u32
                    }
                    None => 1,
                },
                None => 1,
            },
            secrets: self.env_secrets(env)?,
            trust: self.trust(env)?,
            roles,
        })
    }

    fn role(
        &self,
        env_name: &str,
        name: &str,
        r: &RawRole,
        env: &RawEnv,
        images: &BTreeMap<String, ImageSpec>,
    ) -> Result<RoleSpec, SpecError> {
        let table = self.header(&["env", env_name, "roles", name]);
        let Some(image) = &r.image else {
            return Err(self.cx.err(table, format!("role `{name}` has no `image`")));
        };
        let Some(spec) = images.get(image.get_ref()) else {
            return Err(self.cx.err(
                image.span(),
                format!("role `{name}` runs unknown image `{}`", image.get_ref()),
            ));
        };
        let at = |keys: &[&str]| self.cx.loc.inherited(env_name, Some(name), keys);
        let key_at = |keys: &[&str]| self.cx.loc.inherited_key(env_name, Some(name), keys);
        let size = match &r.size {
            None => Size {
                cpus: 1.0,
                memory_bytes: 256 << 20,
            },
            Some(s) => {
                let memory_bytes = match &s.get_ref().memory {
                    None => 256 << 20,
                    Some(m) => parse_size(m)
                        .and_then(|b| check::memory(b, m).map(|()| b))
                        .map_err(|e| self.cx.err(at(&["size", "memory"]), e))?,
                };
                let cpus = s.get_ref().cpus.unwrap_or(1.0);
                check::cpus(cpus).map_err(|m| self.cx.err(at(&["size", "cpus"]), m))?;
                Size { cpus, memory_bytes }
            }
        };
        let health = match &r.health {
            Some(h) => Some(self.health(h, &|k| at(&[&["health"], k].concat()))?),
            None => spec.health.clone(),
        };
        if let Some(ports) = &r.ports {
            self.ports(ports, &|i| at(&["ports", &i.to_string()]))?;
        }
        if let Some(vars) = &r.env {
            check::env_vars(vars).map_err(|(k, m)| self.cx.err(key_at(&["env", k]), m))?;
        }
        let strategy = match &r.strategy {
            None => Strategy::Rolling {
                max_surge: 1,
                max_unavailable: 0,
                min_healthy_secs: 0,
            },
            Some(s) => self.strategy(s, &|k| at(&["strategy", k]))?,
        };
        let ttl = r.ttl.as_ref().or(env.ttl.as_ref());
        let ttl_secs = ttl.map(|t| self.ttl(t)).transpose()?;
        let drift = r.drift.as_ref().or(env.drift.as_ref());
        let drift = match drift.map(|d| (d.get_ref().as_str(), d.span())) {
            None | Some(("alarm", _)) => DriftPolicy::Alarm,
            Some(("replace", _)) => DriftPolicy::Replace,
            Some(("kill", _)) => DriftPolicy::Kill,
            Some((other, span)) => {
                return Err(self.cx.err(
                    span,
                    format!(
                    "unknown drift policy `{other}`; expected \"alarm\", \"replace\" or \"kill\""
                ),
                ))
            }
        };
        let unmanaged = r.unmanaged.as_ref().or(env.unmanaged.as_ref());
        let unmanaged = match unmanaged.map(|d| (d.get_ref().as_str(), d.span())) {
            None | Some(("alarm", _)) => UnmanagedPolicy::Alarm,
            Some(("kill", _)) => UnmanagedPolicy::Kill,
            Some((other, span)) => {
                return Err(self.cx.err(
                    span,
                    format!("unknown unmanaged policy `{other}`; expected \"alarm\" or \"kill\""),
                ))
            }
        };
        let balancer = match &r.balancer {
            None => None,
            Some(b) => {
                let rb = b.get_ref();
                let b_at = |k: &str| at(&["balancer", k]);
                let drain_timeout_secs = match &rb.drain_timeout {
                    Some(d) => self.secs(d, b_at("drain_timeout"), "drain_timeout", None)?,
                    None => 30,
                };
                let port = rb
                    .port
                    .or_else(|| r.ports.as_ref().and_then(|p| p.first().copied()))
                    .ok_or_else(|| {
                        self.cx.err(
                            b.span(),
                            "balancer has no `port` and the role declares no ports",
                        )
                    })?;
                check::port(port, "balancer port").map_err(|m| self.cx.err(b_at("port"), m))?;
                match rb.listen.parse::<std::net::SocketAddr>() {
                    Err(_) => {
                        return Err(self.cx.err(
                            b_at("listen"),
                            format!(
                                "balancer listen `{}` is not an address; expected \"IP:PORT\"",
                                rb.listen
                            ),
                        ))
                    }
                    Ok(a) => check::port(a.port(), "balancer listen port")
                        .map_err(|m| self.cx.err(b_at("listen"), m))?,
                }
                let interval = match &rb.check_interval {
                    Some(d) => {
                        let i = parse_duration(d)
                            .map_err(|e| self.cx.err(b_at("check_interval"), e))?;
                        if !i.is_zero() && i < MIN_CHECK_INTERVAL {
                            return Err(self.cx.err(
                                b_at("check_interval"),
                                format!("check_interval `{d}` is shorter than 100ms; expected \"100ms\" or more, or \"0s\" to turn checks off"),
                            ));
                        }
                        i
                    }
                    None => std::time::Duration::from_secs(1),
                };
                for (key, n) in [("fall", rb.fall), ("rise", rb.rise)] {
                    if let Some(n) = n {
                        check::streak(n, key).map_err(|m| self.cx.err(b_at(key), m))?;
                    }
                }
                let check = match &health {
                    Some(h @ (HealthCheck::Http { .. } | HealthCheck::Tcp { .. }))
                        if !interval.is_zero() =>
                    {
                        Some(BalancerCheck {
                            health: h.clone(),
                            // At most 100 years (MAX_DURATION): fits.
                            interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
                            fall: rb.fall.unwrap_or(2),
                            rise: rb.rise.unwrap_or(2),
                        })
                    }
                    _ => None,
                };
                let mode = match rb.mode.as_ref().map(|m| (m.get_ref().as_str(), m.span())) {
                    None => match &health {
                        Some(HealthCheck::Http { .. }) => BalancerMode::Http,
                        _ => BalancerMode::Tcp,
                    },
                    Some(("http", _)) => BalancerMode::Http,
                    Some(("tcp", _)) => BalancerMode::Tcp,
                    Some((other, span)) => {
                        return Err(self.cx.err(
                            span,
                            format!(
                                "unknown balancer mode `{other}`; expected \"http\" or \"tcp\""
                            ),
                        ))
                    }
                };
                let algorithm = match rb.algorithm.as_ref().map(|a| (a.get_ref().as_str(), a.span())) {
                    None | Some(("round_robin", _)) => BalancerAlgorithm::RoundRobin,
                    Some(("least_requests", _)) => BalancerAlgorithm::LeastRequests,
                    Some((other, span)) => return Err(self.cx.err(
                        span,
                        format!("unknown balancer algorithm `{other}`; expected \"round_robin\" or \"least_requests\""),
                    )),
                };
                let tls = rb.tls.as_ref().map(|t| self.balancer_tls(t)).transpose()?;
                let admin = match &rb.admin {
                    None => None,
                    Some(a) => {
                        let addr = a.get_ref();
                        if addr.parse::<std::net::SocketAddr>().is_err() {
                            return Err(self.cx.err(
                                a.span(),
                                format!("balancer admin `{addr}` is not an address; expected \"IP:PORT\""),
                            ));
                        }
                        if *addr == rb.listen {
                            return Err(self
                                .cx
                                .err(a.span(), "balancer admin must not be its listen address"));
                        }
                        Some(addr.clone())
                    }
                };
                let (max_requests, queue_timeout_ms) = self.queue_settings(rb, mode, &b_at)?;
                Some(Balancer {
                    listen: rb.listen.clone(),
                    port,
                    drain_timeout_secs,
                    check,
                    mode,
                    algorithm,
                    tls,
                    admin,
                    max_requests,
                    queue_timeout_ms,
                    nodes: rb.nodes.clone().unwrap_or_default(),
                })
            }
        };
        let mut placement = Vec::new();
        if let Some(p) = &r.placement {
            for c in p.get_ref() {
                placement.push(
                    c.parse::<Constraint>()
                        .map_err(|m| self.cx.err(p.span(), m))?,
                );
            }
        }
        let mut watch = Vec::new();
        if let Some(w) = &r.watch {
            for (i, p) in w.get_ref().iter().enumerate() {
                if !p.starts_with('/') || p.split('/').any(|c| c == "..") || p.contains('\0') {
                    return Err(self.cx.err(
                        at(&["watch", &i.to_string()]),
                        format!(
                            "watch path `{}` must be absolute, without `..`",
                            p.escape_debug()
                        ),
                    ));
                }
                watch.push(p.clone());
            }
        }
        let mut reach = Vec::new();
        if let Some(rs) = &r.reach {
            for item in rs.get_ref() {
                reach.push(parse_reach(item).map_err(|m| self.cx.err(rs.span(), m))?);
            }
        }
        let mut volumes = Vec::new();
        let mut mounts: BTreeMap<String, &str> = BTreeMap::new();
        for (vname, path) in r.volumes.iter().flatten() {
            check::volume_name(vname).map_err(|m| self.cx.err(key_at(&["volumes", vname]), m))?;
            let path_at = || at(&["volumes", vname]);
            check::abs_path(path, &format!("volume `{vname}` path"))
                .map_err(|m| self.cx.err(path_at(), m))?;
            let mount = check::normal_path(path);
            if mount == "/" {
                return Err(self.cx.err(
                    path_at(),
                    format!("volume `{vname}` is mounted on `/`, over the whole image; expected a directory such as \"/var/lib/{vname}\""),
                ));
            }
            if let Some(other) = mounts.insert(mount.clone(), vname) {
                return Err(self.cx.err(
                    path_at(),
                    format!("volumes `{other}` and `{vname}` are both mounted on `{mount}`"),
                ));
            }
            volumes.push(Volume {
                name: vname.clone(),
                path: path.clone(),
            });
        }
        let replace_share = match r.replace_share {
            Some(p) => {
                check::percent(p, "replace_share")
                    .map_err(|m| self.cx.err(at(&["replace_share"]), m))?;
                p
            }
            // Checked in `env`.
            None => env.replace_share.unwrap_or(25),
        };
        Ok(RoleSpec {
            name: name.to_string(),
            image: image.get_ref().clone(),
            servers: r.servers.unwrap_or(1),
            size,
            ports: r.ports.clone().unwrap_or_else(|| spec.ports.clone()),
            health,
            depends_on: r
                .depends_on
                .iter()
                .flatten()
                .map(|d| d.get_ref().clone())
                .collect(),
            cold_only: r.cold_only.unwrap_or(false),
            volumes,
            strategy,
            balancer,
            ttl_secs,
            replace_share,
            drift,
            unmanaged,
            env: r.env.clone().unwrap_or_default(),
            watch,
            reach,
            user: r
                .user
                .as_ref()
                .map(|u| {
                    u.get_ref().parse::<UserSpec>().map_err(|e| {
                        self.cx.err(
                            u.span(),
                            format!("bad `user`: {e}; expected \"NAME\", \"UID\", \"NAME:GROUP\" or \"UID:GID\""),
                        )
                    })
                })
                .transpose()?,
            capabilities: match &r.capabilities {
                Some(c) => self.capabilities(c)?,
                None => Capability::docker_default(),
            },
            secrets: self.role_secrets(env_name, name, r, env)?,
            placement,
        })
    }

    /// `provider = "local"` or `provider = { swarm = ... }`.
    fn provider(&self, env: &str, p: &Spanned<toml::Value>) -> Result<ProviderSpec, SpecError> {
        let expected = "expected \"local\" or { swarm = \"unix:///var/run/docker.sock\", registry = \"HOST:PORT/PATH\" }";
        let at = |m: String| self.cx.err(p.span(), m);
        let raw: RawSwarm = match p.get_ref() {
            toml::Value::String(n) if n == "local" => return Ok(ProviderSpec::Local),
            toml::Value::String(other) => {
                return Err(at(format!(
                    "environment `{env}` uses provider `{other}`; {expected}"
                )))
            }
            v @ toml::Value::Table(_) => v.clone().try_into().map_err(|e: toml::de::Error| {
                at(format!(
                    "bad `provider` table: {}; {expected}",
                    e.message().trim()
                ))
            })?,
            other => {
                return Err(at(format!(
                    "`provider` is a {}; {expected}",
                    other.type_str()
                )))
            }
        };
        check_endpoint(&raw.swarm).map_err(|m| at(format!("swarm endpoint {m}")))?;
        let Some(registry) = &raw.registry else {
            return Err(at(format!(
                "the swarm provider of `{env}` has no `registry`; expected registry = \"HOST[:PORT]/PATH\" (where the nodes pull images from)"
            )));
        };
        let (registry, insecure) = parse_registry(registry).map_err(at)?;
        let mut engines = BTreeMap::new();
        for (node, ep) in raw.engines.iter().flatten() {
            check_endpoint(ep).map_err(|m| at(format!("engine of node `{node}` {m}")))?;
            engines.insert(node.clone(), ep.clone());
        }
        let ports = match &raw.ports {
            None => SWARM_PORTS,
            Some(r) => parse_port_range(r).map_err(at)?,
        };
        Ok(ProviderSpec::Swarm(SwarmSpec {
            endpoint: raw.swarm.clone(),
            registry,
            registry_insecure: insecure,
            tls: raw.tls.as_ref().map(|t| self.dir.join(t)),
            engines,
            ports,
        }))
    }

    /// What a role of a swarm environment cannot ask for: a command health
    /// check (it would run inside the server), and balancer settings that
    /// name files on kiln's host.
    fn swarm_role(
        &self,
        env: &str,
        name: &str,
        raw: &RawRole,
        role: &RoleSpec,
    ) -> Result<(), SpecError> {
        let table = self.header(&["env", env, "roles", name]);
        if let Some(HealthCheck::Command { .. }) = role.health {
            let span = raw.health.as_ref().map_or(table.clone(), |h| h.span());
            return Err(self.cx.err(span, format!("role `{name}` of `{env}` has a command health check, which the swarm provider cannot run (it never execs into servers); use an http or tcp check")));
        }
        if let Some(first) = raw.secrets.iter().flatten().next() {
            return Err(self.cx.err(first.span(), format!("role `{name}` of `{env}` receives secrets, which the swarm provider does not deliver yet (they would need Docker secrets); use them on the local provider")));
        }
        if let (Some(b), Some(rb)) = (&role.balancer, &raw.balancer) {
            if b.tls.is_some() {
                return Err(self.cx.err(rb.span(), format!("the balancer of role `{name}` terminates TLS, which the swarm provider does not support yet (its certificate files and ACME state live on kiln's host)")));
            }
            if b.admin.is_some() {
                return Err(self.cx.err(rb.span(), format!("the balancer of role `{name}` has an `admin` listener, which the swarm provider does not publish")));
            }
            // It runs on the nodes and publishes the port on each of them.
            if let Some((ip, port)) = b.listen.rsplit_once(':') {
                if ip != "0.0.0.0" {
                    return Err(self.cx.err(rb.span(), format!("the balancer of role `{name}` of `{env}` runs on the swarm's nodes and is reached on port {port} of each: write listen = \"0.0.0.0:{port}\"")));
                }
            }
        }
        Ok(())
    }

    /// `at` locates a key of the strategy table.
    fn strategy(
        &self,
        s: &Spanned<toml::Value>,
        at: &dyn Fn(&str) -> Range<usize>,
    ) -> Result<Strategy, SpecError> {
        let expected = "expected \"rolling\", \"blue_green\", \"canary\", or a table with `kind` and its options";
        let opts: RawStrategyOpts = match s.get_ref() {
            toml::Value::String(kind) => RawStrategyOpts {
                kind: kind.clone(),
                ..Default::default()
            },
            v @ toml::Value::Table(_) => v.clone().try_into().map_err(|e: toml::de::Error| {
                self.cx.err(
                    s.span(),
                    format!("bad `strategy` table: {}; {expected}", e.message().trim()),
                )
            })?,
            other => {
                return Err(self.cx.err(
                    s.span(),
                    format!("`strategy` is a {}; {expected}", other.type_str()),
                ))
            }
        };
        let secs = |d: &Option<String>, key: &str, default: u64| -> Result<u64, SpecError> {
            match d {
                Some(d) => self.secs(d, at(key), key, None),
                None => Ok(default),
            }
        };
        match opts.kind.as_str() {
            "rolling" => {
                let max_surge = opts.max_surge.unwrap_or(1);
                let max_unavailable = opts.max_unavailable.unwrap_or(0);
                if u64::from(max_surge) + u64::from(max_unavailable) == 0 {
                    return Err(self.cx.err(
                        at(if opts.max_surge.is_some() { "max_surge" } else { "max_unavailable" }),
                        "max_surge and max_unavailable are both 0, so no server could ever be replaced; expected at least one of them above 0",
                    ));
                }
                Ok(Strategy::Rolling {
                    max_surge,
                    max_unavailable,
                    min_healthy_secs: secs(&opts.min_healthy, "min_healthy", 0)?,
                })
            }
            "blue_green" => Ok(Strategy::BlueGreen {
                rollback_window_secs: secs(&opts.rollback_window, "rollback_window", 300)?,
            }),
            "canary" => {
                let share_percent = opts.share.unwrap_or(10);
                check::percent(share_percent, "share").map_err(|m| self.cx.err(at("share"), m))?;
                let max_error_rate = opts.max_error_rate.unwrap_or(0.01);
                check::error_rate(max_error_rate)
                    .map_err(|m| self.cx.err(at("max_error_rate"), m))?;
                Ok(Strategy::Canary {
                    share_percent,
                    bake_secs: secs(&opts.bake, "bake", 60)?,
                    max_error_rate,
                })
            }
            other => Err(self
                .cx
                .err(s.span(), format!("unknown strategy `{other}`; {expected}"))),
        }
    }
}

/// A Docker Engine endpoint: `unix:///PATH` or `tcp://HOST:PORT`.
fn check_endpoint(ep: &str) -> Result<(), String> {
    if let Some(path) = ep.strip_prefix("unix://") {
        if path.starts_with('/') && path.len() > 1 {
            return Ok(());
        }
    } else if let Some(hostport) = ep.strip_prefix("tcp://") {
        if let Some((host, port)) = hostport.rsplit_once(':') {
            if !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok_and(|p| p > 0) {
                return Ok(());
            }
        }
    }
    Err(format!(
        "`{ep}` is not an endpoint; expected \"unix:///PATH\" or \"tcp://HOST:PORT\""
    ))
}

/// `[http://|https://]HOST[:PORT]/PATH` → (`HOST[:PORT]/PATH`, plain HTTP).
fn parse_registry(r: &str) -> Result<(String, bool), String> {
    let (rest, insecure) = match (r.strip_prefix("http://"), r.strip_prefix("https://")) {
        (Some(rest), _) => (rest, true),
        (_, Some(rest)) => (rest, false),
        _ => (r, false),
    };
    let rest = rest.trim_end_matches('/');
    let bad = || {
        format!("registry `{r}` is not a repository; expected \"HOST[:PORT]/PATH\" (\"http://HOST:PORT/PATH\" for a registry without TLS)")
    };
    let (host, path) = rest.split_once('/').ok_or_else(bad)?;
    let path_ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/".contains(c);
    if host.is_empty()
        || host.contains(['@', ' '])
        || path.is_empty()
        || !path.chars().all(path_ok)
        || path.split('/').any(str::is_empty)
    {
        return Err(bad());
    }
    Ok((rest.to_string(), insecure))
}

/// `"FIRST-LAST"`: host ports, at least 1024.
fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let bad = || {
        format!("ports `{s}` is not a range; expected \"FIRST-LAST\" of host ports from 1024 to 65535, e.g. \"30000-32767\"")
    };
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (a, b): (u16, u16) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if a < 1024 || b < a {
        return Err(bad());
    }
    Ok((a, b))
}

/// Networks a subnet may not be in: they are not for a bridge of servers.
const RESERVED: [(&str, [u8; 4], u8); 5] = [
    ("the \"this network\" range 0.0.0.0/8", [0, 0, 0, 0], 8),
    ("the loopback range 127.0.0.0/8", [127, 0, 0, 0], 8),
    ("the link-local range 169.254.0.0/16", [169, 254, 0, 0], 16),
    ("the multicast range 224.0.0.0/4", [224, 0, 0, 0], 4),
    ("the reserved range 240.0.0.0/4", [240, 0, 0, 0], 4),
];

/// 64-bit FNV-1a: a stable hash of names (the default subnet must not
/// change between kiln versions or machines).
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

impl Validator<'_> {
    /// Checks declared subnets (not reserved, no two overlapping) and gives
    /// every environment without one its own: derived from the project's
    /// and the environment's names, never from their order, and clear of
    /// every other environment's subnet.
    fn subnets(
        &self,
        raw: &RawFile,
        envs: &mut BTreeMap<String, EnvSpec>,
    ) -> Result<(), SpecError> {
        let mut declared: Vec<(&str, Subnet, Range<usize>)> = Vec::new();
        for (name, env) in envs.iter().filter(|(_, e)| e.subnet_declared) {
            let span = raw.env[name]
                .subnet
                .as_ref()
                .map(|s| s.span())
                .unwrap_or(0..0);
            let s = env.subnet;
            // Subnets are /16 or smaller and reserved ranges /16 or larger:
            // they overlap when the subnet starts inside the range.
            let first = u32::from(s.network());
            for (what, net, prefix) in RESERVED {
                let shift = 32 - u32::from(prefix);
                if first >> shift == u32::from_be_bytes(net) >> shift {
                    return Err(self.cx.err(span, format!("subnet {s} of environment `{name}` is in {what}; use a private range such as 10.0.0.0/8")));
                }
            }
            if let Some((other, o, _)) = declared.iter().find(|(_, o, _)| o.overlaps(&s)) {
                return Err(self.cx.err(span, format!("subnet {s} of environment `{name}` overlaps subnet {o} of environment `{other}`; every environment needs its own")));
            }
            declared.push((name, s, span));
        }
        let mut taken: Vec<Subnet> = declared.iter().map(|d| d.1).collect();
        let project = raw.project.name.get_ref();
        for (name, env) in envs.iter_mut().filter(|(_, e)| !e.subnet_declared) {
            let start = (fnv(&format!("{project}/{name}")) % u64::from(DEFAULT_POOL)) as u32;
            let pick = (0..DEFAULT_POOL)
                .map(|i| Subnet::default_pool(start + i))
                .find(|c| !taken.iter().any(|t| t.overlaps(c)))
                .ok_or_else(|| {
                    self.cx.err(
                        self.header(&["env", name]),
                        "no default subnet is free; declare `subnet`",
                    )
                })?;
            env.subnet = pick;
            taken.push(pick);
        }
        Ok(())
    }
}

/// Whether two listen addresses take the same port: the same address, or
/// a wildcard of one family and any address it covers (`[::]` covers
/// IPv4 too, as sockets are dual-stack by default).
fn listen_clash(a: &std::net::SocketAddr, b: &std::net::SocketAddr) -> bool {
    let covers = |w: &std::net::SocketAddr, o: &std::net::SocketAddr| {
        w.ip().is_unspecified() && (w.is_ipv6() || o.is_ipv4())
    };
    a.port() == b.port() && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

/// Whether this host has `ip` on an interface: binding a socket to it
/// (port 0, closed at once) fails with `EADDRNOTAVAIL` when none has.
/// Wildcards and loopback are always there; any other failure (such as
/// no permission) is not the spec's fault and passes.
fn host_has(ip: std::net::IpAddr) -> bool {
    if ip.is_unspecified() || ip.is_loopback() {
        return true;
    }
    match std::net::TcpListener::bind((ip, 0)) {
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::AddrNotAvailable,
    }
}

/// `host:5432`, `10.0.0.5:443` or `10.0.0.0/8:443`.
fn parse_reach(s: &str) -> Result<Reach, String> {
    let bad = || format!("reach `{s}` is not `host:PORT`, `A.B.C.D:PORT` or `A.B.C.D/N:PORT`");
    let (to, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?;
    let to = if to == "host" {
        ReachTarget::Host
    } else {
        let (addr, prefix) = to.split_once('/').unwrap_or((to, "32"));
        let addr: std::net::Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32).ok_or_else(bad)?;
        ReachTarget::Net { addr, prefix }
    };
    Ok(Reach { to, port })
}

fn check_name(cx: &Cx, n: &str, span: Range<usize>, what: &str) -> Result<(), SpecError> {
    let ok = !n.is_empty()
        && n.len() <= 40
        && n.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(cx.err(span, format!("{what} `{n}` is invalid; expected lowercase letters, digits, `-` or `_`, starting with a letter, at most 40 characters")))
    }
}

/// A role on a `depends_on` cycle, if there is one.
fn dependency_cycle(roles: &BTreeMap<String, RoleSpec>) -> Option<String> {
    fn visit(
        r: &str,
        roles: &BTreeMap<String, RoleSpec>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<String> {
        if path.iter().any(|p| p == r) {
            return Some(r.to_string());
        }
        if done.contains(r) {
            return None;
        }
        path.push(r.to_string());
        for d in &roles[r].depends_on {
            if let Some(c) = visit(d, roles, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(r.to_string());
        None
    }
    let mut done = BTreeSet::new();
    roles
        .keys()
        .find_map(|r| visit(r, roles, &mut Vec::new(), &mut done))
}

#[cfg(test)]
mod tests;
