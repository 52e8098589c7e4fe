//! Store self-repair: rewriting the blobs of a version whose content no
//! longer matches their digest, from what is still at hand: the unpacked
//! roots of the version and its ancestors (verified by their seals), the
//! project's recipes, and the sources of imported bases.
//!
//! Nothing is run: kiln's own layers are written again from the roots
//! (layers are a pure function of two seals, a root and the image's
//! `mtime`), seals are re-hashed from the roots, configs and manifests are
//! written again from the recipe, and an imported base is imported again
//! from its tarball or OCI layout. A rebuilt blob replaces the corrupt one
//! only if it hashes to the very digest it replaces; anything else is
//! reported as unrepairable, with the reason.

use serde::Serialize;

use crate::bake::{write_layer_blob, Baker};
use crate::error::{ImageError, Result};
use crate::layer::{self, LayerChanges};
use crate::seal::{self, Seal};
use crate::store::{BaseRecord, Digest, VersionRecord};

/// What a repair did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Repaired {
    /// Blobs that were corrupt and now hold their right content again.
    pub rewritten: Vec<Digest>,
    /// Blobs still corrupt, each with why it could not be rebuilt.
    pub unrepairable: Vec<(Digest, String)>,
}

/// Repairs the version `reference` (`NAME` or `NAME@N`) under the store's
/// writer lock.
pub fn repair_reference(baker: &Baker, reference: &str) -> Result<(VersionRecord, Repaired)> {
    let _lock = baker.store.lock()?;
    baker.store.clear_tmp()?;
    let record = crate::ops::resolve(baker.store, reference)?;
    let repaired = repair(baker, &record)?;
    Ok((record, repaired))
}

/// Repairs every blob of `record`, including the layers it shares with its
/// ancestors. The caller holds the store's lock.
pub(crate) fn repair(baker: &Baker, record: &VersionRecord) -> Result<Repaired> {
    let store = baker.store;
    let mut out = Repaired::default();
    let lineage = lineage(baker, record)?;
    let mut check = |d: &Digest, fix: &mut dyn FnMut() -> std::result::Result<(), String>| {
        if store.blob_intact(d) {
            return;
        }
        match fix() {
            Ok(()) if store.blob_intact(d) => out.rewritten.push(d.clone()),
            Ok(()) => out
                .unrepairable
                .push((d.clone(), "rebuilt, it no longer has the same bytes".into())),
            Err(why) => out.unrepairable.push((d.clone(), why)),
        }
    };
    // Seals first: layers are written from them.
    for rec in &lineage {
        check(&rec.seal, &mut || repair_seal(baker, rec));
    }
    for (i, l) in record.layers.iter().enumerate() {
        check(
            &l.digest,
            &mut || match lineage.iter().find(|r| r.layers.len() == i + 1) {
                Some(owner) => repair_layer(baker, owner, &lineage),
                None => reimport(baker, lineage.last().unwrap_or(record)),
            },
        );
    }
    // Config and manifest are written together: both are checked first.
    let corrupt: Vec<Digest> = [&record.config, &record.digest]
        .into_iter()
        .filter(|d| !store.blob_intact(d))
        .cloned()
        .collect();
    if !corrupt.is_empty() {
        let result = manifest_and_config(baker, record, &lineage);
        for d in corrupt {
            match &result {
                Ok(()) if store.blob_intact(&d) => out.rewritten.push(d),
                Ok(()) => out
                    .unrepairable
                    .push((d, "rebuilt, it no longer has the same bytes".into())),
                Err(why) => out.unrepairable.push((d, why.clone())),
            }
        }
    }
    Ok(out)
}

/// `record` and its ancestors, nearest first.
fn lineage(baker: &Baker, record: &VersionRecord) -> Result<Vec<VersionRecord>> {
    let mut out = vec![record.clone()];
    while let Some(parent) = out.last().and_then(|r| r.parent.clone()) {
        // Bounded: a parent is always an older image of the project's forest.
        if out.len() > baker.project.images.len() + 1 {
            return Err(ImageError::Corrupt(format!(
                "the lineage of {}@{} loops",
                record.name, record.version
            )));
        }
        out.push(crate::ops::resolve(baker.store, &parent)?);
    }
    Ok(out)
}

/// The imported base a root-most version was built on, by its layers.
fn base_of(baker: &Baker, rec: &VersionRecord) -> std::result::Result<BaseRecord, String> {
    let below = &rec.layers[..rec.layers.len().saturating_sub(1)];
    baker
        .store
        .bases()
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|b| b.layers == below)
        .ok_or_else(|| "the base it was imported from is no longer in the store".to_string())
}

fn repair_seal(baker: &Baker, rec: &VersionRecord) -> std::result::Result<(), String> {
    let root = baker.store.root_path(&rec.digest);
    let sealed = seal::seal_tree(&root).map_err(|e| e.to_string())?;
    if sealed.root != rec.seal_root {
        return Err(format!(
            "the root of {}@{} no longer matches its seal",
            rec.name, rec.version
        ));
    }
    baker.store.put_json(&sealed).map_err(|e| e.to_string())?;
    Ok(())
}

/// Writes again the layer `owner` added to its parent (or base).
fn repair_layer(
    baker: &Baker,
    owner: &VersionRecord,
    lineage: &[VersionRecord],
) -> std::result::Result<(), String> {
    let store = baker.store;
    let spec = baker
        .project
        .images
        .get(&owner.name)
        .ok_or_else(|| format!("image `{}` is no longer in kiln.toml", owner.name))?;
    let below: Seal = match lineage
        .iter()
        .find(|r| Some(&r.digest) == owner.parent_digest.as_ref())
    {
        Some(parent) => store
            .read_json_blob(&parent.seal)
            .map_err(|e| e.to_string())?,
        None if owner.inputs.source == "scratch" => Seal::from_entries(Vec::new()),
        None => store
            .read_json_blob(&base_of(baker, owner)?.seal)
            .map_err(|e| e.to_string())?,
    };
    let own: Seal = store
        .read_json_blob(&owner.seal)
        .map_err(|e| e.to_string())?;
    let root = store.root_path(&owner.digest);
    if !root.is_dir() {
        return Err(format!(
            "the root of {}@{} is gone",
            owner.name, owner.version
        ));
    }
    let work = store.temp_dir("repair").map_err(|e| e.to_string())?;
    let written = write_layer_blob(
        store,
        &root,
        &LayerChanges::between(&below, &own),
        spec.mtime,
        &work,
    );
    let _ = layer::remove_any(&work);
    written.map(|_| ()).map_err(|e| e.to_string())
}

/// Imports again the base the root-most version of the lineage was built on.
fn reimport(baker: &Baker, root_most: &VersionRecord) -> std::result::Result<(), String> {
    let spec = baker
        .project
        .images
        .get(&root_most.name)
        .ok_or_else(|| format!("image `{}` is no longer in kiln.toml", root_most.name))?;
    crate::source::import(baker, &spec.name, &spec.from, spec.import_limit_bytes, true)
        .map(|_| ())
        .map_err(|e| format!("importing its base again failed: {e}"))
}

/// Writes again the config and manifest of `record` from its recipe.
fn manifest_and_config(
    baker: &Baker,
    record: &VersionRecord,
    lineage: &[VersionRecord],
) -> std::result::Result<(), String> {
    let store = baker.store;
    let spec = baker
        .project
        .images
        .get(&record.name)
        .ok_or_else(|| format!("image `{}` is no longer in kiln.toml", record.name))?;
    let base_env = match lineage.get(1) {
        Some(parent) => {
            let cfg: oci_spec::image::ImageConfiguration = store
                .read_json_blob(&parent.config)
                .map_err(|e| e.to_string())?;
            cfg.config()
                .as_ref()
                .and_then(|c| c.env().clone())
                .unwrap_or_default()
        }
        None if record.inputs.source == "scratch" => Vec::new(),
        None => base_of(baker, record)?.env,
    };
    let sealed: Seal = store
        .read_json_blob(&record.seal)
        .map_err(|e| e.to_string())?;
    let (config, manifest) = baker
        .write_manifest(
            spec,
            &base_env,
            &record.inputs.source,
            &record.layers,
            &sealed,
            &record.seal,
            record.user.as_ref(),
        )
        .map_err(|e| e.to_string())?;
    if config != record.config || manifest != record.digest {
        return Err("kiln.toml no longer gives this version's config".into());
    }
    Ok(())
}
