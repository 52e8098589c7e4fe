//! Baking: turning an image recipe into a sealed, tested version.
//!
//! One image is built as: resolve the base (parent version, imported
//! tarball/OCI/debootstrap base, or nothing), compute the cache key over
//! every input, and if no version has that key: copy the base into a
//! temporary root, copy the image's files in, run its scripts in a build
//! sandbox over that root, seal the result, write the difference from the
//! base as one normalised layer, write config and manifest, move the root
//! into the store, run the tests in a read-only sandbox from the sealed
//! root, and finally write the version record.
//!
//! Build scripts run as root in a sandbox with Docker's default
//! capabilities and seccomp filter, a read-only cgroupfs, the image's
//! `limits` (pids, memory) and a time limit per script; tests run the same
//! way from the sealed root, as the image's `user`. Both die with `kiln`
//! (see `kiln-sandbox`).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead, Seek, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_model::{ImageSource, ImageSpec, Project, ResolvedUser};
use kiln_sandbox::{Limits, Network, Runtime, SandboxError, SandboxSpec};
use oci_spec::image::{
    ConfigBuilder, DescriptorBuilder, HistoryBuilder, ImageConfigurationBuilder,
    ImageManifestBuilder, MediaType, RootFsBuilder,
};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::error::{ImageError, IoContext, Result};
use crate::layer::{self, LayerChanges};
use crate::seal::{self, Kind, Seal};
use crate::store::{
    canonical_json, BaseRecord, Digest, Inputs, LayerRef, Outcome, Store, VersionRecord,
};

/// What a bake reports as it goes, for progress display.
#[derive(Debug, Clone)]
pub enum Event {
    /// Work on an image starts (after its parents).
    Begin { image: String },
    /// A step of the build: importing a base, running a script, sealing...
    Step { image: String, step: String },
    /// The latest line a running step printed.
    Output { image: String, line: String },
    /// The image was unchanged: an existing version is current.
    Cached {
        image: String,
        version: u32,
        digest: Digest,
    },
    /// Something the user must read that does not stop the build: a stale
    /// advisory cache, findings below the gate, an expired `ignore`.
    Warn { image: String, message: String },
    /// A new version was built, tested and made current.
    Built {
        image: String,
        version: u32,
        digest: Digest,
        elapsed: Duration,
    },
}

/// What building one image produced.
#[derive(Debug, Clone)]
pub struct Baked {
    pub record: VersionRecord,
    pub cached: bool,
}

/// Bakes the images of one project into one store.
pub struct Baker<'a> {
    pub project: &'a Project,
    pub store: &'a Store,
    pub runtime: Runtime,
    pub events: &'a (dyn Fn(Event) + Sync),
    /// Rebuild the named images even when the cache has them (repairs a
    /// root that no longer matches its seal).
    pub no_cache: bool,
    /// The project's secret values, to refuse a version that contains one.
    pub secrets: crate::leak::SecretCheck,
    /// The project's advisories, loaded on first use by a scan gate.
    advisories: std::sync::OnceLock<crate::scan::Advisories>,
}

/// Environment every build script and test gets unless the image overrides it.
const DEFAULT_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
    ("DEBIAN_FRONTEND", "noninteractive"),
    ("LANG", "C.UTF-8"),
];

/// Directories every image has, so that read-only servers can mount over them.
const SKELETON: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("run", 0o755),
];

/// Where build scripts are placed inside the root while they run.
const SCRIPTS_MOUNT: &str = ".kiln-build";

impl<'a> Baker<'a> {
    pub fn new(
        project: &'a Project,
        store: &'a Store,
        events: &'a (dyn Fn(Event) + Sync),
    ) -> Baker<'a> {
        Baker {
            project,
            store,
            runtime: Runtime::new(&store.root().join("sandbox")),
            events,
            no_cache: false,
            secrets: crate::leak::SecretCheck::None,
            advisories: std::sync::OnceLock::new(),
        }
    }

    /// Builds `names` and every image they are built from, parents first.
    pub fn build(&self, names: &[String]) -> Result<Vec<Baked>> {
        for n in names {
            if !self.project.images.contains_key(n) {
                return Err(ImageError::UnknownImage(n.clone()));
            }
        }
        let wanted: std::collections::BTreeSet<String> =
            names.iter().flat_map(|n| self.project.lineage(n)).collect();
        let _lock = self.store.lock()?;
        // Build and test sandboxes only exist while a writer holds the lock:
        // any found now were left by a killed build.
        for stale in self.runtime.list().map_err(|source| ImageError::Sandbox {
            what: "stale build sandboxes".into(),
            source,
        })? {
            self.runtime
                .delete(&stale.id)
                .map_err(|source| ImageError::Sandbox {
                    what: format!("stale sandbox {}", stale.id),
                    source,
                })?;
        }
        self.store.clear_tmp()?;
        let mut out = Vec::new();
        for name in self.project.build_order() {
            if wanted.contains(&name) {
                let fresh = self.no_cache && names.contains(&name);
                out.push(self.build_one(&self.project.images[&name], fresh)?);
            }
        }
        Ok(out)
    }

    fn emit(&self, e: Event) {
        (self.events)(e)
    }

    fn build_one(&self, spec: &ImageSpec, no_cache: bool) -> Result<Baked> {
        let name = &spec.name;
        self.emit(Event::Begin {
            image: name.clone(),
        });
        let started = Instant::now();
        let base = self.resolve_base(spec, no_cache)?;
        let files = if spec.files_dir.is_dir() {
            seal::seal_tree(&spec.files_dir)?.entries
        } else {
            Vec::new()
        };
        let scripts = list_scripts(&spec.scripts_dir)?;
        let key = cache_key(spec, &base.key_part, &files, &scripts);

        if let Some(hit) = if no_cache {
            None
        } else {
            self.cached(name, &key)?
        } {
            // The gates depend on more than the bytes (new advisories, a
            // new policy, a new secret): a cached version passes them again.
            self.gates(spec, &hit)?;
            if self.store.current(name)? != Some(hit.version) {
                self.store.set_current(name, hit.version)?;
            }
            self.emit(Event::Cached {
                image: name.clone(),
                version: hit.version,
                digest: hit.digest.clone(),
            });
            return Ok(Baked {
                record: hit,
                cached: true,
            });
        }

        let work = self.store.temp_dir(&format!("build-{name}"))?;
        let result = self.bake(spec, &base, &files, &scripts, &key, &work, started);
        // Whatever happened, nothing of the build stays in tmp/.
        let _ = layer::remove_any(&work);
        let record = result?;
        if no_cache {
            // The bake rewrote the blobs it reproduced; the layers this
            // version shares with its parents were not part of it.
            let repaired = crate::repair::repair(self, &record)?;
            if let Some((digest, why)) = repaired.unrepairable.first() {
                return Err(ImageError::Corrupt(format!(
                    "blob {digest} of {name}@{} is corrupt and cannot be rebuilt: {why}",
                    record.version
                )));
            }
        }
        self.emit(Event::Built {
            image: name.clone(),
            version: record.version,
            digest: record.digest.clone(),
            elapsed: started.elapsed(),
        });
        Ok(Baked {
            record,
            cached: false,
        })
    }

    /// An existing successful version with this cache key whose blobs and root are all present.
    fn cached(&self, name: &str, key: &str) -> Result<Option<VersionRecord>> {
        for rec in self.store.versions(name)?.into_iter().rev() {
            if rec.outcome == Outcome::Ok
                && rec.inputs.cache_key == key
                && self.store.has_blob(&rec.digest)
                && rec.layers.iter().all(|l| self.store.has_blob(&l.digest))
                && self.store.root_path(&rec.digest).is_dir()
            {
                return Ok(Some(rec));
            }
        }
        Ok(None)
    }

    #[allow(clippy::too_many_arguments)]
    fn bake(
        &self,
        spec: &ImageSpec,
        base: &Base,
        files: &[seal::Entry],
        scripts: &[(String, PathBuf, String)],
        key: &str,
        work: &Path,
        started: Instant,
    ) -> Result<VersionRecord> {
        let name = &spec.name;
        let root = work.join("root");
        self.emit(Event::Step {
            image: name.clone(),
            step: format!("preparing root from {}", base.description),
        });
        let base_seal: Seal = match &base.origin {
            BaseOrigin::Scratch => {
                fs::create_dir(&root).ctx("create directory", &root)?;
                Seal::from_entries(Vec::new())
            }
            BaseOrigin::Parent(rec) => {
                copy_tree(&self.store.root_path(&rec.digest), &root)?;
                self.store.read_json_blob(&rec.seal)?
            }
            BaseOrigin::Imported(b) => {
                fs::create_dir(&root).ctx("create directory", &root)?;
                for l in &b.layers {
                    layer::apply_layer(
                        io::BufReader::new(
                            fs::File::open(self.store.blob_path(&l.digest))
                                .ctx("open", self.store.blob_path(&l.digest))?,
                        ),
                        &root,
                        &l.digest.0,
                        &mut layer::Budget::unlimited(),
                    )?;
                }
                self.store.read_json_blob(&b.seal)?
            }
        };
        for (dir, mode) in SKELETON {
            let p = root.join(dir);
            if fs::symlink_metadata(&p).is_err() {
                fs::create_dir(&p).ctx("create directory", &p)?;
                fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).ctx("chmod", &p)?;
            }
        }
        if !files.is_empty() {
            self.emit(Event::Step {
                image: name.clone(),
                step: format!(
                    "copying {} files",
                    files.iter().filter(|f| f.kind != Kind::Dir).count()
                ),
            });
            copy_files(name, &spec.files_dir, files, &root)?;
        }
        if !scripts.is_empty() {
            self.run_scripts(spec, &base.env, scripts, &root, work)?;
        }
        // Declared here, the user is resolved in this image's own files;
        // otherwise the parent's (as Docker inherits USER).
        let user =
            match &spec.user {
                Some(u) => Some(crate::user::resolve_user(&root, u).map_err(|source| {
                    ImageError::User {
                        image: name.clone(),
                        user: u.to_string(),
                        source,
                    }
                })?),
                None => base.user.clone(),
            };
        self.emit(Event::Step {
            image: name.clone(),
            step: "sealing".into(),
        });
        let sealed = seal::seal_tree(&root).map_err(|e| match e {
            ImageError::PathTooLong { path, limit, .. } => ImageError::Input {
                image: name.clone(),
                reason: format!("the build left /{path}…, a path longer than {limit} bytes; images may not hold paths that long"),
            },
            e => e,
        })?;
        if let Some(bad) = sealed
            .entries
            .iter()
            .find(|e| matches!(e.kind, Kind::CharDevice | Kind::BlockDevice | Kind::Socket))
        {
            return Err(ImageError::Input { image: name.clone(), reason: format!("the build left /{} ({:?}) in the root; images may not contain device nodes or sockets", bad.path, bad.kind) });
        }
        let changes = LayerChanges::between(&base_seal, &sealed);
        self.emit(Event::Step {
            image: name.clone(),
            step: format!(
                "writing layer ({} entries, {} deletions)",
                changes.write.len(),
                changes.delete.len()
            ),
        });
        let own = write_layer_blob(self.store, &root, &changes, spec.mtime, work)?;
        let (seal_digest, _) = self.store.put_json(&sealed)?;
        let mut layers = base.layers.clone();
        layers.push(own);
        let (config, manifest) = self.write_manifest(
            spec,
            &base.env,
            &base.description,
            &layers,
            &sealed,
            &seal_digest,
            user.as_ref(),
        )?;

        let final_root = self.store.root_path(&manifest);
        if final_root.exists() && !seal::verify_tree(&final_root, &sealed)?.is_empty() {
            // The stored root of these very bytes was tampered with: put the
            // fresh one in its place. Running servers keep the old one (they
            // hold its mount), so it is retired, not deleted; drift reports
            // them until they are replaced.
            let retired = self.store.root().join("retired");
            fs::create_dir_all(&retired).ctx("create directory", &retired)?;
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let to = retired.join(format!("{}-{nanos}", manifest.hex()));
            fs::rename(&final_root, &to).ctx("retire", &final_root)?;
            fs::rename(&root, &final_root).ctx("move root into", &final_root)?;
            self.emit(Event::Step {
                image: name.clone(),
                step: format!(
                    "replaced a tampered root; the old one is kept at {}",
                    to.display()
                ),
            });
        } else if final_root.exists() {
            // Same bytes built before (a different cache key with the same result).
            layer::remove_any(&root)?;
        } else {
            fs::rename(&root, &final_root).ctx("move root into", &final_root)?;
        }

        let versions = self.store.versions(name)?;
        let mut record = VersionRecord {
            name: name.clone(),
            version: versions.last().map(|r| r.version + 1).unwrap_or(1),
            digest: manifest.clone(),
            parent: base.parent.clone(),
            parent_digest: base.parent_digest.clone(),
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            size: sealed.content_size(),
            outcome: Outcome::Ok,
            error: None,
            seal_root: sealed.root.clone(),
            seal: seal_digest,
            config,
            layers,
            inputs: Inputs {
                source: base.description.clone(),
                files: files
                    .iter()
                    .filter(|f| f.kind != Kind::Dir)
                    .map(|f| format!("/{}", f.path))
                    .collect(),
                scripts: scripts.iter().map(|s| s.0.clone()).collect(),
                tests: spec.test.len(),
                cache_key: key.to_string(),
            },
            build_ms: 0,
            user: user.clone(),
        };
        self.emit(Event::Step {
            image: name.clone(),
            step: "writing the SBOM".into(),
        });
        let checked = crate::sbom::generate(self.store, &record)
            .and_then(|sbom| self.hardening_gates(spec, &record, &sealed, &sbom))
            .and_then(|()| self.run_tests(spec, &final_root, &base.env, user.as_ref(), work))
            .and_then(|()| self.scan_gate(spec, &record));
        if let Err(e) = checked {
            if matches!(e, ImageError::SecretInImage { .. }) {
                // A secret must not stay in the store: drop what holds the
                // version's bytes (its root, its own layer, its config),
                // keeping the record (and seal) that says why it failed.
                layer::remove_any(&final_root)?;
                for d in [
                    record.layers.last().map(|l| &l.digest),
                    Some(&record.config),
                ]
                .into_iter()
                .flatten()
                {
                    if self.store.has_blob(d) {
                        self.store.remove_blob(d)?;
                    }
                }
            }
            record.outcome = Outcome::Failed;
            record.error = Some(e.to_string());
            record.build_ms = started.elapsed().as_millis() as u64;
            self.store.put_version(&record)?;
            return Err(e);
        }
        record.build_ms = started.elapsed().as_millis() as u64;
        self.store.put_version(&record)?;
        self.store.set_current(name, record.version)?;
        Ok(record)
    }

    /// Every gate a version must pass to become current, for a version
    /// already built (a cache hit).
    fn gates(&self, spec: &ImageSpec, record: &VersionRecord) -> Result<()> {
        let sbom = match crate::sbom::read(self.store, record)? {
            Some(s) => s,
            None => crate::sbom::generate(self.store, record)?,
        };
        let sealed: Seal = self.store.read_json_blob(&record.seal)?;
        self.hardening_gates(spec, record, &sealed, &sbom)?;
        self.scan_gate(spec, record)
    }

    /// What stays current if `record` does not become current, in words.
    fn kept(&self, record: &VersionRecord) -> String {
        match self.store.current(&record.name) {
            Ok(Some(v)) if v != record.version => {
                format!("{}@{v} stays current", record.name)
            }
            Ok(Some(v)) => format!(
                "{}@{v} was current and stays so, but fails today's gates; rebuild it (`kiln image build --no-cache {}`)",
                record.name, record.name
            ),
            _ => format!("{} has no current version", record.name),
        }
    }

    /// The hardening policy and the secret check.
    fn hardening_gates(
        &self,
        spec: &ImageSpec,
        record: &VersionRecord,
        sealed: &Seal,
        sbom: &crate::sbom::Stored,
    ) -> Result<()> {
        let name = &spec.name;
        self.emit(Event::Step {
            image: name.clone(),
            step: "checking the hardening policy".into(),
        });
        let violations =
            crate::policy::check(&spec.hardening, sealed, sbom.inventory.packages.as_deref())
                .map_err(|e| match e {
                    ImageError::Input { reason, .. } => ImageError::Input {
                        image: name.clone(),
                        reason,
                    },
                    e => e,
                })?;
        if !violations.is_empty() {
            return Err(ImageError::Policy {
                image: name.clone(),
                version: record.version,
                kept: self.kept(record),
                violations: violations
                    .iter()
                    .map(|v| format!("  {v}"))
                    .collect::<Vec<_>>()
                    .join("\n"),
            });
        }
        if let crate::leak::SecretCheck::Values(needles) = &self.secrets {
            self.emit(Event::Step {
                image: name.clone(),
                step: format!("looking for {} secret values", needles.len()),
            });
            let config = self.store.read_blob(&record.config)?;
            let root = self.store.root_path(&record.digest);
            let leaks = crate::leak::find(&root, sealed, &config, needles)?;
            if !leaks.is_empty() {
                return Err(ImageError::SecretInImage {
                    image: name.clone(),
                    version: record.version,
                    kept: self.kept(record),
                    found: leaks
                        .iter()
                        .map(|l| format!("  {l}"))
                        .collect::<Vec<_>>()
                        .join("\n"),
                });
            }
            let short = crate::leak::too_short(needles);
            if !short.is_empty() {
                self.emit(Event::Warn {
                    image: name.clone(),
                    message: format!(
                        "secrets shorter than {} bytes were not searched for: {}",
                        crate::leak::MIN_LEN,
                        short.join(", ")
                    ),
                });
            }
        }
        Ok(())
    }

    /// The vulnerability gate, when the image has one.
    fn scan_gate(&self, spec: &ImageSpec, record: &VersionRecord) -> Result<()> {
        let (Some(policy), Some(source)) = (&spec.scan, &self.project.vulnerabilities) else {
            return Ok(());
        };
        let name = &spec.name;
        self.emit(Event::Step {
            image: name.clone(),
            step: "scanning for vulnerabilities".into(),
        });
        let advisories = match self.advisories.get() {
            Some(a) => a,
            None => {
                let loaded = crate::scan::Advisories::load(source, self.store)?;
                for w in &loaded.warnings {
                    self.emit(Event::Warn {
                        image: name.clone(),
                        message: w.clone(),
                    });
                }
                self.advisories.get_or_init(|| loaded)
            }
        };
        let report = crate::scan::scan_version(self.store, record, advisories, policy)?;
        for e in &report.expired_ignores {
            self.emit(Event::Warn {
                image: name.clone(),
                message: format!("scan ignore entry expired: {e}"),
            });
        }
        for w in report
            .warnings
            .iter()
            .filter(|w| !advisories.warnings.contains(w))
        {
            self.emit(Event::Warn {
                image: name.clone(),
                message: w.clone(),
            });
        }
        if report.fails() {
            return Err(ImageError::Vulnerable {
                image: name.clone(),
                version: record.version,
                fail_on: policy.fail_on.as_str().into(),
                kept: self.kept(record),
                findings: crate::scan::describe(&report),
            });
        }
        let below = report
            .findings
            .iter()
            .filter(|f| f.ignored.is_none())
            .count();
        if below > 0 {
            self.emit(Event::Warn {
                image: name.clone(),
                message: format!(
                    "{below} findings below fail_on = \"{}\" (`kiln image scan {}@{}` lists them)",
                    policy.fail_on.as_str(),
                    name,
                    record.version
                ),
            });
        }
        Ok(())
    }

    /// The environment of the image's processes: kiln's defaults, the
    /// base's, `HOME` of a user this image declares, then the image's own.
    pub(crate) fn env_of(
        &self,
        spec: &ImageSpec,
        base_env: &[String],
        user: Option<&ResolvedUser>,
    ) -> Vec<String> {
        let mut env: BTreeMap<String, String> = DEFAULT_ENV
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for kv in base_env {
            if let Some((k, v)) = kv.split_once('=') {
                env.insert(k.into(), v.into());
            }
        }
        if spec.user.is_some() {
            if let Some(home) = user.and_then(|u| u.home.clone()) {
                env.insert("HOME".into(), home);
            }
        }
        env.extend(spec.env.clone());
        env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
    }

    fn run_scripts(
        &self,
        spec: &ImageSpec,
        base_env: &[String],
        scripts: &[(String, PathBuf, String)],
        root: &Path,
        work: &Path,
    ) -> Result<()> {
        let name = &spec.name;
        let mount = root.join(SCRIPTS_MOUNT);
        if fs::symlink_metadata(&mount).is_ok() {
            return Err(ImageError::Input {
                image: name.clone(),
                reason: format!(
                    "the root already has /{SCRIPTS_MOUNT}, which kiln uses to run scripts"
                ),
            });
        }
        fs::create_dir(&mount).ctx("create directory", &mount)?;
        fs::set_permissions(&mount, fs::Permissions::from_mode(0o700)).ctx("chmod", &mount)?;
        for (i, (script, path, _)) in scripts.iter().enumerate() {
            self.emit(Event::Step {
                image: name.clone(),
                step: format!("script {}/{}: {script}", i + 1, scripts.len()),
            });
            let inside = mount.join(script);
            fs::copy(path, &inside).ctx("copy script", path)?;
            fs::set_permissions(&inside, fs::Permissions::from_mode(0o755))
                .ctx("chmod", &inside)?;
            let shebang = fs::read(path)
                .map(|b| b.starts_with(b"#!"))
                .unwrap_or(false);
            let target = format!("/{SCRIPTS_MOUNT}/{script}");
            let args = if shebang {
                vec![target]
            } else {
                vec!["/bin/sh".into(), "-e".into(), target]
            };
            if !shebang && fs::symlink_metadata(root.join("bin/sh")).is_err() {
                return Err(ImageError::Input {
                    image: name.clone(),
                    reason: format!(
                        "script {script} has no #! line and the root has no /bin/sh to run it"
                    ),
                });
            }
            let log = work.join(format!("{script}.log"));
            let sb = SandboxSpec {
                id: format!("kiln-build-{name}-{}-{i}", std::process::id()),
                rootfs: root.to_path_buf(),
                args,
                env: self.env_of(spec, base_env, None),
                cwd: "/".into(),
                readonly_root: false,
                tmpfs: false,
                network: if spec.build_network {
                    Network::Host
                } else {
                    Network::Isolated
                },
                hostname: format!("build-{name}"),
                binds: Vec::new(),
                limits: Some(build_limits(spec)),
                capabilities: kiln_sandbox::docker_default_capabilities(),
                seccomp: true,
                user: None,
                log: log.clone(),
                labels: vec![("dev.kiln.build".into(), name.clone())],
            };
            let secs = spec.build_limits.script_timeout_secs;
            let status = match self.run_watched(name, &sb, Some(Duration::from_secs(secs))) {
                Ok(status) => status,
                Err(SandboxError::Timeout { .. }) => {
                    return Err(ImageError::ScriptTimedOut {
                        image: name.clone(),
                        script: script.clone(),
                        secs,
                        tail: tail(&log, 20),
                    })
                }
                Err(source) => {
                    return Err(ImageError::Sandbox {
                        what: format!("script {script} of image `{name}`"),
                        source,
                    })
                }
            };
            if status != 0 {
                return Err(ImageError::ScriptFailed {
                    image: name.clone(),
                    script: script.clone(),
                    status,
                    tail: tail(&log, 20),
                });
            }
        }
        layer::remove_any(&mount)?;
        Ok(())
    }

    /// Runs a sandbox while relaying the last line of its output as events.
    fn run_watched(
        &self,
        image: &str,
        sb: &SandboxSpec,
        timeout: Option<Duration>,
    ) -> std::result::Result<i32, SandboxError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let runtime = self.runtime.clone();
        let spec = sb.clone();
        let handle = std::thread::spawn(move || {
            let r = runtime.run_to_exit(&spec, timeout);
            let _ = tx.send(());
            r
        });
        let mut last = String::new();
        loop {
            let done = rx.recv_timeout(Duration::from_millis(100)).is_ok();
            let line = tail(&sb.log, 1);
            if !line.is_empty() && line != last {
                self.emit(Event::Output {
                    image: image.to_string(),
                    line: line.clone(),
                });
                last = line;
            }
            if done {
                break;
            }
        }
        handle.join().unwrap_or_else(|_| {
            Err(SandboxError::Control {
                id: sb.id.clone(),
                detail: "the thread running it panicked".into(),
            })
        })
    }

    fn run_tests(
        &self,
        spec: &ImageSpec,
        root: &Path,
        base_env: &[String],
        user: Option<&ResolvedUser>,
        work: &Path,
    ) -> Result<()> {
        for (i, command) in spec.test.iter().enumerate() {
            self.emit(Event::Step {
                image: spec.name.clone(),
                step: format!("test {}/{}: {}", i + 1, spec.test.len(), command.join(" ")),
            });
            let log = work.join(format!("test-{i}.log"));
            let mut sb = SandboxSpec::readonly(
                &format!("kiln-test-{}-{}-{i}", spec.name, std::process::id()),
                root,
                command.clone(),
                &log,
            );
            sb.env = self.env_of(spec, base_env, user);
            sb.cwd = spec.workdir.clone().unwrap_or_else(|| "/".into());
            sb.hostname = format!("test-{}", spec.name);
            sb.user = user.cloned();
            sb.limits = Some(build_limits(spec));
            let secs = spec.build_limits.test_timeout_secs;
            let status = match self.run_watched(&spec.name, &sb, Some(Duration::from_secs(secs))) {
                Ok(status) => status,
                Err(SandboxError::Timeout { .. }) => {
                    return Err(ImageError::TestTimedOut {
                        image: spec.name.clone(),
                        command: command.clone(),
                        secs,
                        output: tail(&log, 40),
                    })
                }
                Err(source) => {
                    return Err(ImageError::Sandbox {
                        what: format!("test {command:?} of image `{}`", spec.name),
                        source,
                    })
                }
            };
            if status != 0 {
                return Err(ImageError::TestFailed {
                    image: spec.name.clone(),
                    command: command.clone(),
                    status,
                    output: tail(&log, 40),
                });
            }
        }
        Ok(())
    }

    /// Writes the OCI config and manifest of a version; returns their digests.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn write_manifest(
        &self,
        spec: &ImageSpec,
        base_env: &[String],
        base_description: &str,
        layers: &[LayerRef],
        sealed: &Seal,
        seal_digest: &Digest,
        user: Option<&ResolvedUser>,
    ) -> Result<(Digest, Digest)> {
        let oci = |e: oci_spec::OciSpecError| {
            ImageError::Corrupt(format!("cannot build OCI document: {e}"))
        };
        let created = chrono::DateTime::from_timestamp(spec.mtime as i64, 0)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let mut config = ConfigBuilder::default()
            .env(self.env_of(spec, base_env, user))
            .labels(
                spec.labels
                    .clone()
                    .into_iter()
                    .collect::<std::collections::HashMap<_, _>>(),
            );
        if !spec.entrypoint.is_empty() {
            config = config.entrypoint(spec.entrypoint.clone());
        }
        if !spec.cmd.is_empty() {
            config = config.cmd(spec.cmd.clone());
        }
        if let Some(w) = &spec.workdir {
            config = config.working_dir(w.clone());
        }
        // Numeric, so that any runtime runs the same ids without reading the
        // image's passwd; the version record keeps the supplementary groups.
        if let Some(u) = user {
            config = config.user(format!("{}:{}", u.uid, u.gid));
        }
        if !spec.ports.is_empty() {
            config = config.exposed_ports(
                spec.ports
                    .iter()
                    .map(|p| format!("{p}/tcp"))
                    .collect::<Vec<_>>(),
            );
        }
        let history = HistoryBuilder::default()
            .created(created.clone())
            .created_by(format!("kiln bake {} ({base_description})", spec.name))
            .build()
            .map_err(oci)?;
        let image_config = ImageConfigurationBuilder::default()
            .architecture(oci_spec::image::Arch::Amd64)
            .os(oci_spec::image::Os::Linux)
            .created(created)
            .config(config.build().map_err(oci)?)
            .rootfs(
                RootFsBuilder::default()
                    .typ("layers")
                    .diff_ids(
                        layers
                            .iter()
                            .map(|l| l.digest.0.clone())
                            .collect::<Vec<_>>(),
                    )
                    .build()
                    .map_err(oci)?,
            )
            .history(vec![history])
            .build()
            .map_err(oci)?;
        let (config_digest, config_size) = self.store.put_json(&image_config)?;
        let descriptor =
            |mt: MediaType, d: &Digest, size: u64| -> Result<oci_spec::image::Descriptor> {
                let digest: oci_spec::image::Digest =
                    d.0.parse().map_err(|e: oci_spec::OciSpecError| oci(e))?;
                DescriptorBuilder::default()
                    .media_type(mt)
                    .digest(digest)
                    .size(size)
                    .build()
                    .map_err(oci)
            };
        let annotations: std::collections::HashMap<String, String> = [
            ("dev.kiln.image".to_string(), spec.name.clone()),
            ("dev.kiln.seal.root".to_string(), sealed.root.clone()),
            ("dev.kiln.seal".to_string(), seal_digest.0.clone()),
        ]
        .into_iter()
        .collect();
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(descriptor(
                MediaType::ImageConfig,
                &config_digest,
                config_size,
            )?)
            .layers(
                layers
                    .iter()
                    .map(|l| descriptor(MediaType::ImageLayer, &l.digest, l.size))
                    .collect::<Result<Vec<_>>>()?,
            )
            .annotations(annotations)
            .build()
            .map_err(oci)?;
        let (manifest_digest, _) = self.store.put_json(&manifest)?;
        Ok((config_digest, manifest_digest))
    }

    /// The base of an image; `fresh`: an imported base whose blobs no
    /// longer match their digests is imported again (repairing them).
    fn resolve_base(&self, spec: &ImageSpec, fresh: bool) -> Result<Base> {
        match &spec.from {
            ImageSource::Scratch => Ok(Base {
                origin: BaseOrigin::Scratch,
                layers: vec![],
                key_part: "scratch".into(),
                description: "scratch".into(),
                parent: None,
                parent_digest: None,
                env: vec![],
                user: None,
            }),
            ImageSource::Image(p) => {
                let rec = self.store.current_record(p)?;
                let cfg: oci_spec::image::ImageConfiguration =
                    self.store.read_json_blob(&rec.config)?;
                let env = cfg
                    .config()
                    .as_ref()
                    .and_then(|c| c.env().clone())
                    .unwrap_or_default();
                Ok(Base {
                    layers: rec.layers.clone(),
                    key_part: format!("image:{}", rec.digest),
                    description: format!("image {p}@{}", rec.version),
                    parent: Some(format!("{p}@{}", rec.version)),
                    parent_digest: Some(rec.digest.clone()),
                    env,
                    user: rec.user.clone(),
                    origin: BaseOrigin::Parent(Box::new(rec)),
                })
            }
            source => {
                let b = crate::source::import(
                    self,
                    &spec.name,
                    source,
                    spec.import_limit_bytes,
                    fresh,
                )?;
                Ok(Base {
                    layers: b.layers.clone(),
                    key_part: format!("base:{}", b.key),
                    description: b.source.clone(),
                    parent: None,
                    parent_digest: None,
                    env: b.env.clone(),
                    user: None,
                    origin: BaseOrigin::Imported(b),
                })
            }
        }
    }

    pub(crate) fn emit_step(&self, image: &str, step: String) {
        self.emit(Event::Step {
            image: image.to_string(),
            step,
        })
    }

    pub(crate) fn emit_output(&self, image: &str, line: String) {
        self.emit(Event::Output {
            image: image.to_string(),
            line,
        })
    }
}

/// The base an image is built on, resolved.
struct Base {
    origin: BaseOrigin,
    layers: Vec<LayerRef>,
    key_part: String,
    description: String,
    parent: Option<String>,
    parent_digest: Option<Digest>,
    env: Vec<String>,
    /// The parent's resolved user, inherited when the image declares none.
    user: Option<ResolvedUser>,
}

// One value per build, never in a collection: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum BaseOrigin {
    Scratch,
    Parent(Box<VersionRecord>),
    Imported(BaseRecord),
}

/// `NN_name.sh` scripts (any regular file, really) in lexical order, with content hashes.
fn list_scripts(dir: &Path) -> Result<Vec<(String, PathBuf, String)>> {
    let mut out = Vec::new();
    let Ok(items) = fs::read_dir(dir) else {
        return Ok(out);
    };
    for item in items {
        let item = item.ctx("read directory", dir)?;
        let path = item.path();
        if !path.is_file() {
            continue;
        }
        let name = item.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name.ends_with('~') {
            continue;
        }
        let hash = blake3::hash(&fs::read(&path).ctx("read", &path)?)
            .to_hex()
            .to_string();
        out.push((name, path, hash));
    }
    out.sort();
    Ok(out)
}

/// One file of a cache key: path, kind, mode, content hash, link target.
type KeyFile<'a> = (&'a str, Kind, u32, Option<&'a str>, Option<&'a str>);

#[derive(Serialize)]
struct KeyInputs<'a> {
    kiln: &'static str,
    name: &'a str,
    base: &'a str,
    files: Vec<KeyFile<'a>>,
    scripts: Vec<(&'a str, &'a str)>,
    entrypoint: &'a [String],
    cmd: &'a [String],
    env: &'a BTreeMap<String, String>,
    workdir: &'a Option<String>,
    ports: &'a [u16],
    labels: &'a BTreeMap<String, String>,
    mtime: u64,
    test: &'a [Vec<String>],
    network: bool,
    /// Absent when undeclared, so that keys of images without a user are
    /// the ones earlier versions of kiln computed.
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<String>,
}

/// Hash of everything that determines a build's result.
fn cache_key(
    spec: &ImageSpec,
    base: &str,
    files: &[seal::Entry],
    scripts: &[(String, PathBuf, String)],
) -> String {
    let inputs = KeyInputs {
        kiln: "bake-v1",
        name: &spec.name,
        base,
        // Owners in the checkout do not matter: files land owned by root.
        files: files
            .iter()
            .map(|f| {
                (
                    f.path.as_str(),
                    f.kind,
                    f.mode,
                    f.hash.as_deref(),
                    f.target.as_deref(),
                )
            })
            .collect(),
        scripts: scripts
            .iter()
            .map(|(n, _, h)| (n.as_str(), h.as_str()))
            .collect(),
        entrypoint: &spec.entrypoint,
        cmd: &spec.cmd,
        env: &spec.env,
        workdir: &spec.workdir,
        ports: &spec.ports,
        labels: &spec.labels,
        mtime: spec.mtime,
        test: &spec.test,
        network: spec.build_network,
        user: spec.user.as_ref().map(|u| u.to_string()),
    };
    blake3::hash(&canonical_json(&inputs)).to_hex().to_string()
}

/// The cgroup limits of an image's build scripts and tests.
fn build_limits(spec: &ImageSpec) -> Limits {
    Limits {
        memory_bytes: Some(i64::try_from(spec.build_limits.memory_bytes).unwrap_or(i64::MAX)),
        cpus: None,
        pids: Some(i64::from(spec.build_limits.pids)),
    }
}

/// Copies an image's `files/` into the root, owned by root, refusing to
/// write through symlinks the root already has.
fn copy_files(image: &str, src: &Path, files: &[seal::Entry], root: &Path) -> Result<()> {
    for f in files {
        let rel = Path::new(&f.path);
        let dest = root.join(rel);
        let parent = rel.parent().unwrap_or(Path::new(""));
        let mut cur = root.to_path_buf();
        for c in parent.components() {
            cur.push(c);
            if fs::symlink_metadata(&cur)
                .map(|m| m.file_type().is_symlink())
                .unwrap_or(false)
            {
                return Err(ImageError::Input {
                    image: image.into(),
                    reason: format!("files/{} would be written through the symlink /{} in the root; use the real path", f.path, cur.strip_prefix(root).unwrap_or(&cur).display()),
                });
            }
        }
        match f.kind {
            Kind::Dir => {
                match fs::symlink_metadata(&dest) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        layer::remove_any(&dest)?;
                        fs::create_dir(&dest).ctx("create directory", &dest)?;
                    }
                    Err(_) => fs::create_dir(&dest).ctx("create directory", &dest)?,
                }
                fs::set_permissions(&dest, fs::Permissions::from_mode(f.mode))
                    .ctx("chmod", &dest)?;
            }
            Kind::File => {
                layer::remove_any(&dest)?;
                fs::copy(src.join(rel), &dest).ctx("copy", src.join(rel))?;
                fs::set_permissions(&dest, fs::Permissions::from_mode(f.mode))
                    .ctx("chmod", &dest)?;
            }
            Kind::Symlink => {
                layer::remove_any(&dest)?;
                std::os::unix::fs::symlink(f.target.as_deref().unwrap_or(""), &dest)
                    .ctx("create symlink", &dest)?;
            }
            other => {
                return Err(ImageError::Input { image: image.into(), reason: format!("files/{} is a {other:?}; only files, directories and symlinks can be copied", f.path) });
            }
        }
        nix::unistd::fchownat(
            None,
            &dest,
            Some(0.into()),
            Some(0.into()),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| ImageError::Io {
            op: "chown",
            path: dest.clone(),
            source: e.into(),
        })?;
    }
    Ok(())
}

/// Copies a whole tree, preserving everything (cp -a keeps owners, modes,
/// links and special files exactly, and reflinks where the filesystem can).
pub(crate) fn copy_tree(src: &Path, dest: &Path) -> Result<()> {
    let out = Command::new("cp")
        .arg("-a")
        .arg("--reflink=auto")
        .arg(src)
        .arg(dest)
        .output()
        .ctx("run cp for", src)?;
    if !out.status.success() {
        return Err(ImageError::Io {
            op: "copy",
            path: src.to_path_buf(),
            source: io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        });
    }
    Ok(())
}

/// Writes a layer of `changes` to a temporary file, hashing as it goes,
/// and moves it into the store's blobs.
pub(crate) fn write_layer_blob(
    store: &Store,
    root: &Path,
    changes: &LayerChanges,
    mtime: u64,
    work: &Path,
) -> Result<LayerRef> {
    let tmp = work.join(format!("layer-{}.tar", std::process::id()));
    let file = fs::File::create(&tmp).ctx("create", &tmp)?;
    let writer = HashingWriter {
        inner: io::BufWriter::with_capacity(1 << 20, file),
        hasher: Sha256::new(),
        size: 0,
    };
    let mut writer = layer::write_layer(root, changes, mtime, writer)?;
    writer.flush().ctx("write", &tmp)?;
    let digest = Digest(format!(
        "sha256:{}",
        hex::encode(writer.hasher.finalize_reset())
    ));
    let size = writer.size;
    let mut file = writer.inner.into_inner().map_err(|e| ImageError::Io {
        op: "write",
        path: tmp.clone(),
        source: e.into_error(),
    })?;
    file.sync_all().ctx("sync", &tmp)?;
    file.rewind().ctx("rewind", &tmp)?;
    store.adopt_blob(&tmp, &digest)?;
    Ok(LayerRef { digest, size })
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The last `n` lines of a log file (lossy UTF-8).
pub fn tail(path: &Path, n: usize) -> String {
    let Ok(f) = fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut r = io::BufReader::new(f);
    // Only the end matters; skip most of a large log.
    let _ = r.seek(io::SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let lines: Vec<String> = r
        .split(b'\n')
        .map_while(|l| l.ok())
        .map(|l| String::from_utf8_lossy(&l).trim_end().to_string())
        .collect();
    let lines: Vec<&String> = lines.iter().filter(|l| !l.is_empty()).collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}
