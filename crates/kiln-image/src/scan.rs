//! The vulnerability gate: an image version's packages (from its SBOM)
//! matched against OSV advisories for its Debian release.
//!
//! - **Advisories** are OSV JSON records in the ecosystem exports' format
//!   (`Debian/all.zip`: one `ID.json` per advisory), read from a directory
//!   (recursively), a `.zip`, or an HTTP(S) URL of a `.zip`. A URL is cached
//!   under the store (`cache/osv/<key>/`, with its fetch time and ETag):
//!   every load revalidates it; if the URL cannot be reached, the cached
//!   copy is used with a warning that says how old it is, and without a
//!   cache that is an error.
//! - **Matching**: Debian advisories name *source* packages, so a binary
//!   package is matched through its `Source:` (and compared at the source
//!   version) against the affected entries of the image's ecosystem
//!   (`Debian:12`, from `/etc/os-release`). Versions are compared with
//!   Debian's ordering (`debversion`), never as strings. `ECOSYSTEM` ranges
//!   follow the OSV evaluation (introduced / fixed / last_affected), and
//!   explicit `versions` lists are honoured.
//! - **Severity**, first that applies: the highest CVSS v4/v3/v2 base
//!   score in the affected entry's or the advisory's `severity` (0.1-3.9
//!   low, 4.0-6.9 medium, 7.0-8.9 high, 9.0-10 critical); else a
//!   `database_specific.severity` word (LOW, MODERATE/MEDIUM,
//!   HIGH/IMPORTANT, CRITICAL); else Debian's `ecosystem_specific.urgency`
//!   (unimportant/low, medium, high; a trailing `*` ignored); else the
//!   policy's `unknown` severity (high unless set), marked as assumed.
//! - **Gate**: findings at or above `fail_on`, not ignored (an `ignore`
//!   entry matches the advisory id or an alias, through its `until` day
//!   inclusive), and, with `ignore_unfixed`, having a fixed version.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use debversion::Version;
use kiln_model::{AdvisorySource, ScanPolicy, Severity};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{ImageError, IoContext, Result};
use crate::sbom::{Inventory, Package};
use crate::store::{Digest, Store, VersionRecord};

/// The policy used when an image declares none (`kiln image scan` still
/// reports, and exits 2 on findings at or above high).
pub fn default_policy() -> ScanPolicy {
    ScanPolicy {
        fail_on: Severity::High,
        unknown: Severity::High,
        ignore_unfixed: false,
        ignore: Vec::new(),
    }
}

/// The gate of one image of a project: its own `scan` (or the project's
/// default, already folded in by the spec), else [`default_policy`].
pub fn policy_for(project: &kiln_model::Project, image: &str) -> ScanPolicy {
    project
        .images
        .get(image)
        .and_then(|i| i.scan.clone())
        .unwrap_or_else(default_policy)
}

// ---------------------------------------------------------------- OSV records

/// The fields of an OSV record the gate uses; everything else is ignored.
#[derive(Debug, Clone, Deserialize)]
struct OsvRecord {
    id: String,
    #[serde(default)]
    aliases: Vec<String>,
    #[serde(default)]
    summary: Option<String>,
    #[serde(default)]
    severity: Vec<OsvSeverity>,
    #[serde(default)]
    affected: Vec<OsvAffected>,
    #[serde(default)]
    database_specific: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
struct OsvSeverity {
    #[serde(rename = "type")]
    kind: String,
    score: String,
}

#[derive(Debug, Clone, Deserialize)]
struct OsvAffected {
    #[serde(default)]
    package: Option<OsvPackage>,
    #[serde(default)]
    ranges: Vec<OsvRange>,
    #[serde(default)]
    versions: Vec<String>,
    #[serde(default)]
    severity: Vec<OsvSeverity>,
    #[serde(default)]
    ecosystem_specific: Option<serde_json::Value>,
    #[serde(default)]
    database_specific: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
struct OsvPackage {
    ecosystem: String,
    name: String,
}

#[derive(Debug, Clone, Deserialize)]
struct OsvRange {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    events: Vec<OsvEvent>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct OsvEvent {
    introduced: Option<String>,
    fixed: Option<String>,
    last_affected: Option<String>,
    limit: Option<String>,
}

/// How an advisory's severity was decided.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "from")]
pub enum SeverityBasis {
    /// A CVSS vector's base score.
    Cvss { vector: String, score: f64 },
    /// A severity word in `database_specific`.
    Database { value: String },
    /// Debian's urgency in `ecosystem_specific`.
    Urgency { value: String },
    /// None stated: the policy's `unknown` severity.
    Assumed,
}

/// One advisory's entry for one package of one ecosystem.
#[derive(Debug, Clone)]
struct Entry {
    advisory: usize,
    ranges: Vec<Vec<OsvEvent>>,
    versions: Vec<String>,
    severity: Option<(Severity, SeverityBasis)>,
}

/// One advisory, as much as the report shows.
#[derive(Debug, Clone)]
struct Advisory {
    id: String,
    aliases: Vec<String>,
    summary: Option<String>,
}

/// A loaded advisory database, indexed by ecosystem and package.
#[derive(Debug, Default)]
pub struct Advisories {
    advisories: Vec<Advisory>,
    by_package: HashMap<(String, String), Vec<Entry>>,
    /// Where they came from (path or URL), for reports.
    pub origin: String,
    /// When a URL's copy was fetched (RFC 3339), for reports.
    pub fetched: Option<String>,
    /// Problems that did not stop the load: a stale cache used.
    pub warnings: Vec<String>,
}

impl Advisories {
    /// Number of advisories loaded.
    pub fn len(&self) -> usize {
        self.advisories.len()
    }

    pub fn is_empty(&self) -> bool {
        self.advisories.is_empty()
    }

    /// Loads the advisories of a project's source; a URL is fetched (or
    /// revalidated) into the store's cache.
    pub fn load(source: &AdvisorySource, store: &Store) -> Result<Advisories> {
        match source {
            AdvisorySource::Path(p) => Advisories::from_path(p),
            AdvisorySource::Url(u) => {
                let cache = store.root().join("cache/osv");
                let fetched = fetch(u, &cache, Duration::from_secs(30))?;
                let mut a = Advisories::from_path(&fetched.path)?;
                a.origin = u.clone();
                a.fetched = Some(fetched.fetched);
                a.warnings.extend(fetched.warning);
                Ok(a)
            }
        }
    }

    /// Loads a directory of `*.json` (recursively) or a `.zip` of them.
    pub fn from_path(path: &Path) -> Result<Advisories> {
        let origin = path.display().to_string();
        let meta = fs::metadata(path).map_err(|e| ImageError::Advisories {
            origin: origin.clone(),
            reason: format!("cannot read it: {e}"),
        })?;
        let files = if meta.is_dir() {
            read_dir_json(path)?
        } else {
            read_zip_json(path)?
        };
        Advisories::from_documents(files, origin)
    }

    /// Builds the database from `(name, bytes)` OSV documents; a malformed
    /// one is an error naming it.
    fn from_documents(files: Vec<(String, Vec<u8>)>, origin: String) -> Result<Advisories> {
        let records: Vec<OsvRecord> = files
            .par_iter()
            .map(|(name, bytes)| {
                serde_json::from_slice::<OsvRecord>(bytes).map_err(|e| ImageError::Advisories {
                    origin: origin.clone(),
                    reason: format!("{name} is not an OSV record: {e}"),
                })
            })
            .collect::<Result<_>>()?;
        let mut out = Advisories {
            origin,
            ..Default::default()
        };
        for rec in records {
            let index = out.advisories.len();
            let record_severity = severity_of(&rec.severity, rec.database_specific.as_ref(), None);
            for a in &rec.affected {
                let Some(pkg) = &a.package else { continue };
                let severity = severity_of(
                    &a.severity,
                    a.database_specific.as_ref(),
                    a.ecosystem_specific.as_ref(),
                )
                .or_else(|| record_severity.clone());
                out.by_package
                    .entry((pkg.ecosystem.clone(), pkg.name.clone()))
                    .or_default()
                    .push(Entry {
                        advisory: index,
                        ranges: a
                            .ranges
                            .iter()
                            .filter(|r| r.kind == "ECOSYSTEM")
                            .map(|r| r.events.clone())
                            .collect(),
                        versions: a.versions.clone(),
                        severity,
                    });
            }
            out.advisories.push(Advisory {
                id: rec.id,
                aliases: rec.aliases,
                summary: rec.summary,
            });
        }
        Ok(out)
    }
}

fn read_dir_json(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for item in fs::read_dir(&d).ctx("read directory", &d)? {
            let p = item.ctx("read directory", &d)?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "json") {
                let bytes = fs::read(&p).ctx("read", &p)?;
                out.push((p.display().to_string(), bytes));
            }
        }
    }
    Ok(out)
}

fn read_zip_json(path: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let bad = |reason: String| ImageError::Advisories {
        origin: path.display().to_string(),
        reason,
    };
    let f = fs::File::open(path).ctx("open", path)?;
    let mut zip = zip::ZipArchive::new(io::BufReader::new(f))
        .map_err(|e| bad(format!("not a directory or a zip of OSV JSON: {e}")))?;
    let mut out = Vec::with_capacity(zip.len());
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| bad(format!("zip entry {i}: {e}")))?;
        if !entry.is_file() || !entry.name().ends_with(".json") {
            continue;
        }
        let name = entry.name().to_string();
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry
            .read_to_end(&mut bytes)
            .map_err(|e| bad(format!("{name}: {e}")))?;
        out.push((name, bytes));
    }
    Ok(out)
}

/// The severity stated by `severity` entries, else by a
/// `database_specific.severity` word, else by Debian's urgency.
fn severity_of(
    scores: &[OsvSeverity],
    database: Option<&serde_json::Value>,
    ecosystem: Option<&serde_json::Value>,
) -> Option<(Severity, SeverityBasis)> {
    let best = scores
        .iter()
        .filter(|s| s.kind.starts_with("CVSS_"))
        .filter_map(|s| {
            let score = cvss::Cvss::from_str(&s.score).ok()?.score();
            Some((score, s.score.clone()))
        })
        .max_by(|a, b| a.0.total_cmp(&b.0));
    if let Some((score, vector)) = best {
        let sev = match score {
            s if s >= 9.0 => Severity::Critical,
            s if s >= 7.0 => Severity::High,
            s if s >= 4.0 => Severity::Medium,
            _ => Severity::Low,
        };
        return Some((sev, SeverityBasis::Cvss { vector, score }));
    }
    if let Some(word) = database.and_then(|d| d["severity"].as_str()) {
        let sev = match word.to_ascii_lowercase().as_str() {
            "critical" => Some(Severity::Critical),
            "high" | "important" => Some(Severity::High),
            "moderate" | "medium" => Some(Severity::Medium),
            "low" | "negligible" | "unimportant" => Some(Severity::Low),
            _ => None,
        };
        if let Some(sev) = sev {
            return Some((
                sev,
                SeverityBasis::Database {
                    value: word.to_string(),
                },
            ));
        }
    }
    if let Some(urgency) = ecosystem.and_then(|e| e["urgency"].as_str()) {
        let sev = match urgency.trim_end_matches('*') {
            "unimportant" | "low" => Some(Severity::Low),
            "medium" => Some(Severity::Medium),
            "high" => Some(Severity::High),
            _ => None,
        };
        if let Some(sev) = sev {
            return Some((
                sev,
                SeverityBasis::Urgency {
                    value: urgency.to_string(),
                },
            ));
        }
    }
    None
}

// ----------------------------------------------------------------- fetching

/// A URL's advisories, fetched or from the cache.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The cached `.zip`.
    pub path: PathBuf,
    /// When it was fetched (RFC 3339).
    pub fetched: String,
    /// Set when the URL could not be reached and the cache was used.
    pub warning: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CacheMeta {
    url: String,
    fetched: String,
    etag: Option<String>,
    last_modified: Option<String>,
}

/// Fetches `url` into `cache_dir/<key>/advisories.zip`, revalidating a
/// cached copy with its ETag / Last-Modified; falls back to the cache
/// (with a warning naming its age) when the URL cannot be reached.
pub fn fetch(url: &str, cache_dir: &Path, timeout: Duration) -> Result<Fetched> {
    let dir = cache_dir.join(&blake3::hash(url.as_bytes()).to_hex()[..16]);
    let data = dir.join("advisories.zip");
    let meta_path = dir.join("meta.json");
    let cached: Option<CacheMeta> = fs::read(&meta_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(|_| data.is_file());
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        // No limit on the whole download (exports are large); a stalled
        // connection still fails: every step and every read is bounded.
        .timeout_connect(Some(timeout))
        .timeout_per_read(Some(timeout))
        .build()
        .into();
    let mut req = agent.get(url);
    if let Some(c) = &cached {
        if let Some(e) = &c.etag {
            req = req.header("If-None-Match", e);
        }
        if let Some(l) = &c.last_modified {
            req = req.header("If-Modified-Since", l);
        }
    }
    let now = chrono::Utc::now();
    let fail = |reason: String| -> Result<Fetched> {
        match &cached {
            Some(c) => {
                let age = chrono::DateTime::parse_from_rfc3339(&c.fetched)
                    .map(|t| now.signed_duration_since(t))
                    .map(|d| format_age(d.num_seconds()))
                    .unwrap_or_else(|_| "an unknown time".into());
                Ok(Fetched {
                    path: data.clone(),
                    fetched: c.fetched.clone(),
                    warning: Some(format!(
                        "cannot fetch advisories from {url} ({reason}); using the copy fetched {age} ago ({})",
                        c.fetched
                    )),
                })
            }
            None => Err(ImageError::AdvisoriesUnreachable {
                url: url.to_string(),
                reason,
            }),
        }
    };
    let resp = match req.call() {
        Ok(r) => r,
        Err(e) => return fail(e.to_string()),
    };
    let status = resp.status().as_u16();
    if status == 304 {
        if let Some(mut c) = cached {
            c.fetched = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            let _ = fs::write(
                &meta_path,
                serde_json::to_vec_pretty(&c).unwrap_or_default(),
            );
            return Ok(Fetched {
                path: data,
                fetched: c.fetched,
                warning: None,
            });
        }
    }
    if !(200..300).contains(&status) {
        return fail(format!("HTTP status {status}"));
    }
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (etag, last_modified) = (header("etag"), header("last-modified"));
    fs::create_dir_all(&dir).ctx("create directory", &dir)?;
    let tmp = dir.join(format!(".part-{}", std::process::id()));
    let copied = (|| -> io::Result<()> {
        let mut out = fs::File::create(&tmp)?;
        io::copy(&mut resp.into_body().into_reader(), &mut out)?;
        out.sync_all()
    })();
    if let Err(e) = copied {
        let _ = fs::remove_file(&tmp);
        return fail(format!("download interrupted: {e}"));
    }
    fs::rename(&tmp, &data).ctx("rename into", &data)?;
    let meta = CacheMeta {
        url: url.to_string(),
        fetched: now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        etag,
        last_modified,
    };
    fs::write(
        &meta_path,
        serde_json::to_vec_pretty(&meta).unwrap_or_default(),
    )
    .ctx("write", &meta_path)?;
    Ok(Fetched {
        path: data,
        fetched: meta.fetched,
        warning: None,
    })
}

fn format_age(secs: i64) -> String {
    match secs.max(0) {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}

// ----------------------------------------------------------------- matching

/// Why a finding does not count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ignored {
    pub reason: String,
    pub until: Option<String>,
}

/// One advisory affecting one installed package.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    /// Advisory id: `DSA-5555-1`, `DEBIAN-CVE-2024-1234`, `CVE-...`.
    pub id: String,
    pub aliases: Vec<String>,
    /// The installed binary package.
    pub package: String,
    /// Its installed version.
    pub installed: String,
    /// The source package the advisory names.
    pub source: String,
    pub source_version: String,
    /// The first version that fixes it, if any.
    pub fixed: Option<String>,
    pub severity: Severity,
    pub severity_basis: SeverityBasis,
    pub summary: Option<String>,
    /// Set when an `ignore` entry in force covers it.
    pub ignored: Option<Ignored>,
    /// Whether it fails the gate.
    pub blocking: bool,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} in {} {} (source {} {}), fixed in {}",
            self.id,
            self.severity.as_str(),
            self.package,
            self.installed,
            self.source,
            self.source_version,
            self.fixed.as_deref().unwrap_or("no version yet")
        )?;
        if matches!(self.severity_basis, SeverityBasis::Assumed) {
            write!(f, " [severity not stated; assumed]")?;
        }
        Ok(())
    }
}

/// The result of scanning one version.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub image: String,
    pub version: u32,
    pub digest: Digest,
    /// The OSV ecosystem matched (`Debian:12`); none if the release is unknown.
    pub ecosystem: Option<String>,
    pub packages: usize,
    pub advisories: usize,
    pub source: String,
    pub fetched: Option<String>,
    pub fail_on: Severity,
    pub findings: Vec<Finding>,
    /// `ignore` entries whose `until` day has passed.
    pub expired_ignores: Vec<String>,
    /// Problems that did not stop the scan.
    pub warnings: Vec<String>,
}

impl Report {
    /// Whether any finding fails the gate.
    pub fn fails(&self) -> bool {
        self.findings.iter().any(|f| f.blocking)
    }

    pub fn blocking(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.blocking)
    }
}

/// Whether `v` falls in the OSV `ECOSYSTEM` range `events`, and the first
/// fixed version above it. Unparseable event versions are skipped and
/// reported through `bad`.
fn in_range(v: &Version, events: &[OsvEvent], bad: &mut Vec<String>) -> (bool, Option<String>) {
    let parse = |s: &str, bad: &mut Vec<String>| match Version::from_str(s) {
        Ok(v) => Some(v),
        Err(_) => {
            bad.push(s.to_string());
            None
        }
    };
    // (version, kind, text); "0" is below every version.
    let mut points: Vec<(Option<Version>, u8, &str)> = Vec::new();
    for e in events {
        if let Some(i) = &e.introduced {
            let at = if i == "0" { None } else { parse(i, bad) };
            if i == "0" || at.is_some() {
                points.push((at, 0, i));
            }
        }
        if let Some(x) = &e.fixed {
            if let Some(at) = parse(x, bad) {
                points.push((Some(at), 1, x));
            }
        }
        if let Some(x) = &e.last_affected {
            if let Some(at) = parse(x, bad) {
                points.push((Some(at), 2, x));
            }
        }
        if let Some(x) = &e.limit {
            if let Some(at) = parse(x, bad) {
                points.push((Some(at), 3, x));
            }
        }
    }
    points.sort_by(|a, b| a.0.cmp(&b.0));
    let mut affected = false;
    for (at, kind, _) in &points {
        match (kind, at) {
            (0, None) => affected = true,
            (0, Some(at)) if v >= at => affected = true,
            (1, Some(at)) if v >= at => affected = false,
            (2, Some(at)) if v > at => affected = false,
            (3, Some(at)) if v >= at => affected = false,
            _ => {}
        }
    }
    let fixed = affected
        .then(|| {
            points
                .iter()
                .find(|(at, kind, _)| *kind == 1 && at.as_ref().is_some_and(|at| at > v))
                .map(|(_, _, text)| text.to_string())
        })
        .flatten();
    (affected, fixed)
}

/// Matches an inventory against advisories under a policy, on day `today`.
pub fn scan(
    record: &VersionRecord,
    inventory: &Inventory,
    advisories: &Advisories,
    policy: &ScanPolicy,
    today: chrono::NaiveDate,
) -> Report {
    let ecosystem = inventory.release.ecosystem();
    let empty = Vec::new();
    let packages: &[Package] = inventory.packages.as_deref().unwrap_or(&empty);
    let mut warnings = advisories.warnings.clone();
    if ecosystem.is_none() && !packages.is_empty() {
        warnings.push(format!(
            "the image's release ({}) has no OSV ecosystem kiln knows; no advisory was matched",
            inventory.release.id.as_deref().unwrap_or("unknown")
        ));
    }
    let mut expired = Vec::new();
    let mut active = Vec::new();
    for i in &policy.ignore {
        let in_force = match i.until.as_deref() {
            None => true,
            Some(u) => match chrono::NaiveDate::parse_from_str(u, "%Y-%m-%d") {
                Ok(d) => today <= d,
                Err(_) => false,
            },
        };
        if in_force {
            active.push(i);
        } else {
            expired.push(format!(
                "{} (until {}: {})",
                i.id,
                i.until.as_deref().unwrap_or("-"),
                i.reason
            ));
        }
    }
    let mut findings = Vec::new();
    if let Some(eco) = &ecosystem {
        for p in packages {
            let Some(entries) = advisories.by_package.get(&(eco.clone(), p.source.clone())) else {
                continue;
            };
            let Ok(v) = Version::from_str(&p.source_version) else {
                warnings.push(format!(
                    "package {} has version `{}`, which is not a Debian version; not scanned",
                    p.name, p.source_version
                ));
                continue;
            };
            for e in entries {
                let adv = &advisories.advisories[e.advisory];
                let mut bad = Vec::new();
                let mut hit = e.versions.iter().any(|x| x == &p.source_version);
                let mut fixed: Option<String> = None;
                for r in &e.ranges {
                    let (a, f) = in_range(&v, r, &mut bad);
                    if a {
                        hit = true;
                        if fixed.is_none() {
                            fixed = f;
                        }
                    }
                }
                for b in bad {
                    warnings.push(format!(
                        "advisory {} gives `{b}`, which is not a Debian version; that event was skipped",
                        adv.id
                    ));
                }
                if !hit {
                    continue;
                }
                let (severity, severity_basis) = e
                    .severity
                    .clone()
                    .unwrap_or((policy.unknown, SeverityBasis::Assumed));
                let ignored = active
                    .iter()
                    .find(|i| i.id == adv.id || adv.aliases.contains(&i.id))
                    .map(|i| Ignored {
                        reason: i.reason.clone(),
                        until: i.until.clone(),
                    });
                let blocking = ignored.is_none()
                    && severity >= policy.fail_on
                    && !(policy.ignore_unfixed && fixed.is_none());
                findings.push(Finding {
                    id: adv.id.clone(),
                    aliases: adv.aliases.clone(),
                    package: p.name.clone(),
                    installed: p.version.clone(),
                    source: p.source.clone(),
                    source_version: p.source_version.clone(),
                    fixed,
                    severity,
                    severity_basis,
                    summary: adv.summary.clone(),
                    ignored,
                    blocking,
                });
            }
        }
    }
    findings.sort_by(|a, b| {
        (b.blocking, b.severity, &a.id, &a.package)
            .cmp(&(a.blocking, a.severity, &b.id, &b.package))
    });
    warnings.dedup();
    Report {
        image: record.name.clone(),
        version: record.version,
        digest: record.digest.clone(),
        ecosystem,
        packages: packages.len(),
        advisories: advisories.len(),
        source: advisories.origin.clone(),
        fetched: advisories.fetched.clone(),
        fail_on: policy.fail_on,
        findings,
        expired_ignores: expired,
        warnings,
    }
}

/// Scans a stored version with current advisories: its SBOM (generated
/// if the version predates SBOMs) against `advisories`, under `policy`
/// (the image's `scan`, or [`default_policy`]). This is the question
/// drift asks: "does version X fail a scan now?" (`report.fails()`).
pub fn scan_version(
    store: &Store,
    record: &VersionRecord,
    advisories: &Advisories,
    policy: &ScanPolicy,
) -> Result<Report> {
    let sbom = crate::sbom::read_or_generate(store, record)?;
    Ok(scan(
        record,
        &sbom.inventory,
        advisories,
        policy,
        chrono::Utc::now().date_naive(),
    ))
}

/// Renders blocking findings one per line, for errors and the bake output.
pub fn describe(report: &Report) -> String {
    let mut lines: Vec<String> = report.blocking().map(|f| format!("  {f}")).collect();
    lines.sort();
    lines.dedup();
    lines.join("\n")
}

/// Counts of findings by severity (blocking or not), highest first.
pub fn counts(report: &Report) -> BTreeMap<Severity, usize> {
    let mut out = BTreeMap::new();
    for f in &report.findings {
        *out.entry(f.severity).or_insert(0) += 1;
    }
    out
}

#[cfg(test)]
mod tests;
