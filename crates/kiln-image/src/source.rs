//! Bases from outside kiln: rootfs tarballs, OCI image layouts and
//! `debootstrap` of a Debian suite. Each is imported once per source (the
//! tarball's bytes, the OCI manifest digest, or suite + mirror + variant),
//! validated entry by entry, flattened and normalised into one layer, and
//! sealed; later builds reuse the cached base record.
//!
//! An import may not expand past the image's `import_limit`: archives are
//! refused at the first entry that would exceed it, a debootstrap root is
//! measured once debootstrap is done. Either way nothing of the import is
//! kept.

use std::fs;
use std::io::{self, BufRead};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use kiln_model::ImageSource;
use sha2::{Digest as _, Sha256};

use crate::bake::{write_layer_blob, Baker};
use crate::error::{ImageError, IoContext, Result};
use crate::layer::{self, Budget, LayerChanges};
use crate::seal::{self, Seal};
use crate::store::BaseRecord;

/// Imports (or finds cached) the base of `image`, expanding to at most
/// `limit` bytes. `fresh`: a cached base with a corrupt blob is imported
/// again, which rewrites the blob if the source still gives its bytes.
pub(crate) fn import(
    baker: &Baker,
    image: &str,
    source: &ImageSource,
    limit: u64,
    fresh: bool,
) -> Result<BaseRecord> {
    let store = baker.store;
    let (key, description) = match source {
        ImageSource::Rootfs(path) => {
            let mut h = Sha256::new();
            let mut f = fs::File::open(path).ctx("open", path)?;
            io::copy(&mut f, &mut h).ctx("read", path)?;
            (
                format!("rootfs-{}", hex::encode(h.finalize())),
                format!(
                    "rootfs {}",
                    path.file_name().unwrap_or_default().to_string_lossy()
                ),
            )
        }
        ImageSource::Oci { dir, tag } => {
            let (digest, _) = find_manifest(dir, tag)?;
            (
                format!("oci-{}", digest.trim_start_matches("sha256:")),
                format!(
                    "oci {}:{tag}",
                    dir.file_name().unwrap_or_default().to_string_lossy()
                ),
            )
        }
        ImageSource::Debootstrap {
            suite,
            mirror,
            variant,
        } => {
            let k = blake3::hash(format!("{suite}\n{mirror}\n{variant}").as_bytes()).to_hex();
            (
                format!("debootstrap-{suite}-{}", &k[..16]),
                format!("debootstrap {suite} ({variant}, {mirror})"),
            )
        }
        ImageSource::Scratch | ImageSource::Image(_) => unreachable!("not an imported base"),
    };
    if let Some(rec) = store.base(&key)? {
        let intact = || {
            rec.layers.iter().all(|l| store.blob_intact(&l.digest)) && store.blob_intact(&rec.seal)
        };
        if !fresh || intact() {
            return Ok(rec);
        }
    }
    baker.emit_step(image, format!("importing {description}"));
    let work = store.temp_dir("import")?;
    let root = work.join("root");
    fs::create_dir(&root).ctx("create directory", &root)?;
    let result = (|| -> Result<BaseRecord> {
        let mut env = Vec::new();
        let mut budget = Budget::new(limit);
        match source {
            ImageSource::Rootfs(path) => layer::apply_layer(
                layer::open_archive(path)?,
                &root,
                &path.display().to_string(),
                &mut budget,
            )?,
            ImageSource::Oci { dir, tag } => env = unpack_oci(dir, tag, &root, &mut budget)?,
            ImageSource::Debootstrap {
                suite,
                mirror,
                variant,
            } => debootstrap(baker, image, suite, mirror, variant, &root, &work)?,
            _ => unreachable!(),
        }
        let sealed = seal::seal_tree(&root)?;
        // Archives were measured as they expanded; debootstrap only now.
        let size = sealed
            .content_size()
            .saturating_add(512 * sealed.entries.len() as u64);
        if size > limit {
            return Err(ImageError::ImportTooLarge {
                archive: description.clone(),
                limit,
            });
        }
        let changes = LayerChanges::between(&Seal::from_entries(Vec::new()), &sealed);
        baker.emit_step(
            image,
            format!("normalising base layer ({} entries)", changes.write.len()),
        );
        let layer = write_layer_blob(store, &root, &changes, 0, &work)?;
        let (seal, _) = store.put_json(&sealed)?;
        let rec = BaseRecord {
            key: key.clone(),
            source: description.clone(),
            layers: vec![layer],
            seal,
            env,
        };
        store.put_base(&rec)?;
        Ok(rec)
    })();
    let _ = layer::remove_any(&work);
    result
}

/// The manifest digest and path tagged `tag` in an OCI image layout.
fn find_manifest(dir: &Path, tag: &str) -> Result<(String, std::path::PathBuf)> {
    let oci = |reason: String| ImageError::Oci {
        dir: dir.to_path_buf(),
        reason,
    };
    let index_path = dir.join("index.json");
    let index = oci_spec::image::ImageIndex::from_file(&index_path)
        .map_err(|e| oci(format!("unreadable index.json: {e}")))?;
    let mut tags = Vec::new();
    for m in index.manifests() {
        let name = m
            .annotations()
            .as_ref()
            .and_then(|a| a.get("org.opencontainers.image.ref.name"))
            .cloned()
            .unwrap_or_default();
        if name == tag || name.rsplit_once(':').is_some_and(|(_, t)| t == tag) {
            let digest = m.digest().to_string();
            let path = blob_path(dir, &digest)
                .ok_or_else(|| oci(format!("manifest digest `{digest}` is malformed")))?;
            return Ok((digest, path));
        }
        tags.push(name);
    }
    Err(oci(format!(
        "no manifest tagged `{tag}`; tags: {}",
        if tags.is_empty() {
            "none".into()
        } else {
            tags.join(", ")
        }
    )))
}

/// `blobs/<alg>/<hex>` for a digest, refusing anything that is not a plain digest.
fn blob_path(dir: &Path, digest: &str) -> Option<std::path::PathBuf> {
    let (alg, hex) = digest.split_once(':')?;
    let ok = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric());
    (ok(alg) && ok(hex)).then(|| dir.join("blobs").join(alg).join(hex))
}

/// Applies every layer of the tagged manifest to `root`, all of them
/// within one budget; returns the image's environment.
fn unpack_oci(dir: &Path, tag: &str, root: &Path, budget: &mut Budget) -> Result<Vec<String>> {
    let oci = |reason: String| ImageError::Oci {
        dir: dir.to_path_buf(),
        reason,
    };
    let (_, manifest_path) = find_manifest(dir, tag)?;
    let manifest = oci_spec::image::ImageManifest::from_file(&manifest_path)
        .map_err(|e| oci(format!("unreadable manifest: {e}")))?;
    for l in manifest.layers() {
        let digest = l.digest().to_string();
        let path = blob_path(dir, &digest)
            .ok_or_else(|| oci(format!("layer digest `{digest}` is malformed")))?;
        if !path.is_file() {
            return Err(oci(format!("layer blob {digest} is missing")));
        }
        layer::apply_layer(
            layer::open_archive(&path)?,
            root,
            &format!("{} layer {digest}", dir.display()),
            budget,
        )?;
    }
    let config_path = blob_path(dir, manifest.config().digest().as_ref())
        .ok_or_else(|| oci("config digest is malformed".into()))?;
    let env = oci_spec::image::ImageConfiguration::from_file(&config_path)
        .ok()
        .and_then(|c| c.config().as_ref().and_then(|c| c.env().clone()))
        .unwrap_or_default();
    Ok(env)
}

/// The time debootstrap's tools see as "now" (shadow's `lastchg` in
/// `/etc/shadow` is the only date a minbase root records): a fixed day, so
/// that the same mirror state (a snapshot.debian.org URL, or the same day)
/// gives the same bytes. Day 1, not day 0: `lastchg = 0` means "must change
/// password at next login".
const DEBOOTSTRAP_EPOCH: &str = "86400";

/// Runs `debootstrap` on the host into `root`, then strips what makes a
/// root host-specific (device nodes, logs, package caches, ldconfig's
/// inode cache).
fn debootstrap(
    baker: &Baker,
    image: &str,
    suite: &str,
    mirror: &str,
    variant: &str,
    root: &Path,
    work: &Path,
) -> Result<()> {
    let fail = |detail: String| ImageError::Debootstrap {
        suite: suite.into(),
        mirror: mirror.into(),
        detail,
    };
    let log_path = work.join("debootstrap.log");
    let mut command = Command::new("debootstrap");
    // SAFETY: between fork and exec the child only makes the prctl system
    // call, which is async-signal-safe; it takes no lock and allocates nothing.
    // It makes debootstrap die with kiln rather than keep writing into a
    // temporary root that the next build removes.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(io::Error::from)
        });
    }
    let mut child = command
        .arg(format!("--variant={variant}"))
        .arg(suite)
        .arg(root)
        .arg(mirror)
        .env("SOURCE_DATE_EPOCH", DEBOOTSTRAP_EPOCH)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            fail(format!(
                "cannot run debootstrap ({e}); install it with `apt-get install debootstrap`"
            ))
        })?;
    let stderr = child.stderr.take().expect("piped");
    let err_thread = std::thread::spawn(move || io::read_to_string(stderr).unwrap_or_default());
    let mut log = String::new();
    for line in io::BufReader::new(child.stdout.take().expect("piped"))
        .lines()
        .map_while(|l| l.ok())
    {
        baker.emit_output(image, line.clone());
        log.push_str(&line);
        log.push('\n');
    }
    let status = child.wait().map_err(|e| fail(e.to_string()))?;
    let err = err_thread.join().unwrap_or_default();
    let _ = fs::write(&log_path, format!("{log}{err}"));
    if !status.success() {
        let all = format!("{log}{err}");
        let tail: Vec<&str> = all.lines().rev().take(15).collect();
        return Err(fail(format!(
            "{status}; last output:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )));
    }
    for dir in [
        "dev",
        "var/cache/apt/archives",
        "var/log",
        "var/lib/apt/lists",
        "tmp",
        "run",
    ] {
        let p = root.join(dir);
        if let Ok(items) = fs::read_dir(&p) {
            for item in items.flatten() {
                let keep = item.file_name() == "partial" || item.file_name() == "lock";
                if !keep {
                    layer::remove_any(&item.path())?;
                }
            }
        }
    }
    // ldconfig's cache of inode numbers and times: rebuilt when missing.
    let aux = root.join("var/cache/ldconfig/aux-cache");
    if aux.exists() {
        layer::remove_any(&aux)?;
    }
    Ok(())
}
