//! Software bills of materials: what an image version is made of, as a
//! CycloneDX 1.5 JSON document built with the `cyclonedx-bom` crate and
//! stored in the store as an OCI artifact whose subject is the version's
//! image manifest.
//!
//! The packages come from the root's dpkg database
//! (`/var/lib/dpkg/status`): name, version, architecture and source
//! package, with a purl `pkg:deb/debian/NAME@VERSION?arch=..&distro=debian-12`.
//! A root without a dpkg database lists its regular files with their
//! BLAKE3 hashes (from the seal). The release comes from `/etc/os-release`.
//!
//! The stored SBOM is the one source of truth for what is installed: the
//! vulnerability scan and the package policy read it back with [`read`].

use std::collections::BTreeMap;
use std::fs;
use std::path::{Component as PathComponent, Path, PathBuf};

use cyclonedx_bom::external_models::date_time::DateTime;
use cyclonedx_bom::external_models::normalized_string::NormalizedString;
use cyclonedx_bom::external_models::uri::Purl;
use cyclonedx_bom::models::bom::{Bom, SpecVersion, UrnUuid};
use cyclonedx_bom::models::component::{Classification, Component, Components};
use cyclonedx_bom::models::hash::{Hash, HashAlgorithm, HashValue, Hashes};
use cyclonedx_bom::models::metadata::Metadata;
use cyclonedx_bom::models::property::{Properties, Property};
use cyclonedx_bom::models::tool::Tools;
use serde::Serialize;

use crate::error::{ImageError, IoContext, Result};
use crate::seal::{Kind, Seal};
use crate::store::{Digest, Referrer, Store, VersionRecord};

/// The artifact type (and layer media type) of a CycloneDX JSON SBOM.
pub const ARTIFACT_TYPE: &str = "application/vnd.cyclonedx+json";

/// Property names kiln writes into the SBOM and reads back.
const P_SOURCE: &str = "kiln:deb:source";
const P_SOURCE_VERSION: &str = "kiln:deb:source_version";
const P_ARCH: &str = "kiln:deb:architecture";
const P_OS_ID: &str = "kiln:os:id";
const P_OS_VERSION_ID: &str = "kiln:os:version_id";
const P_OS_CODENAME: &str = "kiln:os:version_codename";
const P_SEAL_ROOT: &str = "kiln:seal:root";
/// `dpkg` (components are packages) or `files` (components are files).
const P_INVENTORY: &str = "kiln:inventory";

/// The distribution of a root, from its `os-release`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Release {
    /// `ID`: `debian`, `ubuntu`...
    pub id: Option<String>,
    /// `VERSION_ID`: `12`. Absent on testing and unstable.
    pub version_id: Option<String>,
    /// `VERSION_CODENAME`: `bookworm`.
    pub codename: Option<String>,
}

impl Release {
    /// The OSV ecosystem of the release: `Debian:12`.
    pub fn ecosystem(&self) -> Option<String> {
        match (self.id.as_deref(), self.version_id.as_deref()) {
            (Some("debian"), Some(v)) => Some(format!("Debian:{v}")),
            (Some("ubuntu"), Some(v)) => Some(format!("Ubuntu:{v}")),
            _ => None,
        }
    }

    fn distro(&self) -> Option<String> {
        match (self.id.as_deref(), self.version_id.as_deref()) {
            (Some(id), Some(v)) => Some(format!("{id}-{v}")),
            _ => None,
        }
    }
}

/// An installed binary package, as dpkg records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub architecture: String,
    /// The source package it was built from (its own name when dpkg says none).
    pub source: String,
    /// The source package's version (differs from `version` for binNMUs).
    pub source_version: String,
    pub purl: String,
}

/// A file of a root without a package database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileItem {
    /// Absolute path in the image.
    pub path: String,
    pub blake3: String,
}

/// What an SBOM says, read back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Inventory {
    pub release: Release,
    /// Packages, when the root has a dpkg database.
    pub packages: Option<Vec<Package>>,
    /// Files with their hashes, when it has none.
    pub files: Vec<FileItem>,
}

/// A stored SBOM.
#[derive(Debug, Clone)]
pub struct Stored {
    pub referrer: Referrer,
    /// The CycloneDX JSON, as stored.
    pub json: Vec<u8>,
    pub inventory: Inventory,
}

/// Reads a regular file inside `root` at the absolute image path `path`,
/// resolving symlinks inside the root (never on the host), at most a few
/// levels deep. `None` if it does not exist.
pub(crate) fn read_in_root(root: &Path, path: &str) -> Result<Option<Vec<u8>>> {
    let mut rel = PathBuf::from(path.trim_start_matches('/'));
    for _ in 0..8 {
        let full = root.join(&rel);
        let meta = match fs::symlink_metadata(&full) {
            Ok(m) => m,
            Err(_) => return Ok(None),
        };
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&full).ctx("read link", &full)?;
            let joined = if target.is_absolute() {
                target
            } else {
                Path::new("/")
                    .join(rel.parent().unwrap_or(Path::new("")))
                    .join(target)
            };
            // Normalise `..` lexically, clamped at the image's `/`.
            let mut clean = PathBuf::new();
            for c in joined.components() {
                match c {
                    PathComponent::ParentDir => {
                        clean.pop();
                    }
                    PathComponent::Normal(n) => clean.push(n),
                    _ => {}
                }
            }
            rel = clean;
            continue;
        }
        if !meta.is_file() {
            return Ok(None);
        }
        return fs::read(&full).ctx("read", &full).map(Some);
    }
    Ok(None)
}

/// The release of a root, from `/etc/os-release` (or `/usr/lib/os-release`).
pub fn release(root: &Path) -> Result<Release> {
    let text = match read_in_root(root, "/etc/os-release")? {
        Some(t) => t,
        None => read_in_root(root, "/usr/lib/os-release")?.unwrap_or_default(),
    };
    let text = String::from_utf8_lossy(&text);
    let mut out = Release::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"').trim_matches('\'').to_string();
        match k.trim() {
            "ID" => out.id = Some(v),
            "VERSION_ID" => out.version_id = Some(v),
            "VERSION_CODENAME" => out.codename = Some(v),
            _ => {}
        }
    }
    Ok(out)
}

/// Installed packages of a root's dpkg database, by name; `None` if the
/// root has no `/var/lib/dpkg/status`.
pub fn dpkg_packages(root: &Path, release: &Release) -> Result<Option<Vec<Package>>> {
    let path = root.join("var/lib/dpkg/status");
    match fs::symlink_metadata(&path) {
        Ok(m) if m.is_file() => {}
        _ => return Ok(None),
    }
    let text = fs::read(&path).ctx("read", &path)?;
    parse_status(&String::from_utf8_lossy(&text), release)
        .map(Some)
        .map_err(|reason| ImageError::Corrupt(format!("{}: {reason}", path.display())))
}

/// Parses a dpkg `status` file (deb822 paragraphs); only packages whose
/// status is `installed` are kept.
pub fn parse_status(text: &str, release: &Release) -> std::result::Result<Vec<Package>, String> {
    let mut out = Vec::new();
    for para in text.split("\n\n") {
        let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
        for line in para.lines() {
            if line.starts_with([' ', '\t']) || line.is_empty() {
                continue;
            }
            if let Some((k, v)) = line.split_once(':') {
                fields.insert(k.trim(), v.trim());
            }
        }
        let Some(name) = fields.get("Package") else {
            continue;
        };
        let installed = fields
            .get("Status")
            .is_some_and(|s| s.split_whitespace().last() == Some("installed"));
        if !installed {
            continue;
        }
        let version = fields
            .get("Version")
            .ok_or_else(|| format!("package `{name}` has no Version"))?
            .to_string();
        let architecture = fields.get("Architecture").unwrap_or(&"all").to_string();
        // `Source: name` or `Source: name (version)` (binNMUs and the like).
        let (source, source_version) = match fields.get("Source") {
            None => (name.to_string(), version.clone()),
            Some(s) => match s.split_once('(') {
                Some((n, v)) => (
                    n.trim().to_string(),
                    v.trim_end_matches(')').trim().to_string(),
                ),
                None => (s.trim().to_string(), version.clone()),
            },
        };
        let purl = deb_purl(name, &version, &architecture, release)?;
        out.push(Package {
            name: name.to_string(),
            version,
            architecture,
            source,
            source_version,
            purl,
        });
    }
    out.sort_by(|a, b| (&a.name, &a.architecture).cmp(&(&b.name, &b.architecture)));
    Ok(out)
}

/// `pkg:deb/debian/NAME@VERSION?arch=ARCH&distro=debian-12`, encoded by the purl crate.
fn deb_purl(
    name: &str,
    version: &str,
    arch: &str,
    release: &Release,
) -> std::result::Result<String, String> {
    let mut b = purl::GenericPurlBuilder::new("deb".to_string(), name)
        .with_namespace(release.id.clone().unwrap_or_else(|| "debian".into()))
        .with_version(version)
        .with_qualifier("arch", arch)
        .map_err(|e| format!("purl of `{name}`: {e}"))?;
    if let Some(d) = release.distro() {
        b = b
            .with_qualifier("distro", d)
            .map_err(|e| format!("purl of `{name}`: {e}"))?;
    }
    b.build()
        .map(|p| p.to_string())
        .map_err(|e| format!("purl of `{name}`: {e}"))
}

/// The CycloneDX 1.5 document of a version whose root is `root` and seal `seal`.
pub fn bom(record: &VersionRecord, root: &Path, seal: &Seal) -> Result<Bom> {
    let release = release(root)?;
    let packages = dpkg_packages(root, &release)?;
    let mut image = Component::new(
        Classification::Container,
        &record.name,
        &record.digest.0,
        Some(record.digest.0.clone()),
    );
    let mut image_props = vec![
        Property::new(
            P_INVENTORY,
            if packages.is_some() { "dpkg" } else { "files" },
        ),
        Property::new(P_SEAL_ROOT, &record.seal_root),
        Property::new("kiln:image:version", &record.version.to_string()),
    ];
    for (k, v) in [
        (P_OS_ID, &release.id),
        (P_OS_VERSION_ID, &release.version_id),
        (P_OS_CODENAME, &release.codename),
    ] {
        if let Some(v) = v {
            image_props.push(Property::new(k, v));
        }
    }
    image.properties = Some(Properties(image_props));
    let mut tool = Component::new(
        Classification::Application,
        "kiln",
        env!("CARGO_PKG_VERSION"),
        None,
    );
    tool.description = Some(NormalizedString::new("kiln image baker"));
    let components: Vec<Component> = match &packages {
        Some(pkgs) => pkgs
            .iter()
            .map(|p| {
                let mut c = Component::new(
                    Classification::Library,
                    &p.name,
                    &p.version,
                    Some(p.purl.clone()),
                );
                c.purl = p.purl.parse::<Purl>().ok();
                c.properties = Some(Properties(vec![
                    Property::new(P_ARCH, &p.architecture),
                    Property::new(P_SOURCE, &p.source),
                    Property::new(P_SOURCE_VERSION, &p.source_version),
                ]));
                c
            })
            .collect(),
        None => seal
            .entries
            .iter()
            .filter(|e| e.kind == Kind::File)
            .map(|e| {
                let path = format!("/{}", e.path);
                let mut c = Component::new(Classification::File, &path, "", Some(path.clone()));
                c.version = None;
                c.hashes = Some(Hashes(vec![Hash {
                    alg: HashAlgorithm::BLAKE3,
                    content: HashValue(e.hash.clone().unwrap_or_default()),
                }]));
                c
            })
            .collect(),
    };
    let serial = {
        // A name-based UUID from the manifest digest: one image, one serial.
        let h = blake3::hash(record.digest.0.as_bytes());
        let mut b: [u8; 16] = h.as_bytes()[..16].try_into().expect("16 bytes");
        b[6] = (b[6] & 0x0f) | 0x80; // version 8: custom
        b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
        let hexed = hex::encode(b);
        UrnUuid::new(format!(
            "urn:uuid:{}-{}-{}-{}-{}",
            &hexed[..8],
            &hexed[8..12],
            &hexed[12..16],
            &hexed[16..20],
            &hexed[20..]
        ))
        .map_err(|e| ImageError::Corrupt(format!("SBOM serial: {e:?}")))?
    };
    let metadata = Metadata {
        timestamp: DateTime::try_from(record.created.clone()).ok(),
        tools: Some(Tools::Object {
            services: None,
            components: Some(Components(vec![tool])),
        }),
        component: Some(image),
        ..Default::default()
    };
    Ok(Bom {
        version: 1,
        serial_number: Some(serial),
        metadata: Some(metadata),
        components: Some(Components(components)),
        spec_version: SpecVersion::V1_5,
        ..Bom::default()
    })
}

/// Builds a version's SBOM from its root and seal and stores it as an
/// artifact referring to the image. Callers hold the store lock.
pub fn generate(store: &Store, record: &VersionRecord) -> Result<Stored> {
    let seal: Seal = store.read_json_blob(&record.seal)?;
    let root = store.root_path(&record.digest);
    let bom = bom(record, &root, &seal)?;
    let mut json = Vec::new();
    bom.output_as_json_v1_5(&mut json)
        .map_err(|e| ImageError::Corrupt(format!("cannot write the SBOM as JSON: {e}")))?;
    let annotations = BTreeMap::from([
        ("dev.kiln.image".to_string(), record.name.clone()),
        (
            "org.opencontainers.image.created".to_string(),
            record.created.clone(),
        ),
    ]);
    let referrer = store.put_artifact(&record.digest, ARTIFACT_TYPE, &json, annotations)?;
    let inventory = inventory(&json)?;
    Ok(Stored {
        referrer,
        json,
        inventory,
    })
}

/// The stored SBOM of a version, if it has one.
pub fn read(store: &Store, record: &VersionRecord) -> Result<Option<Stored>> {
    let Some(referrer) = store
        .referrers(&record.digest)?
        .into_iter()
        .rev()
        .find(|r| r.artifact_type == ARTIFACT_TYPE)
    else {
        return Ok(None);
    };
    let json = store.read_blob(&referrer.payload)?;
    if Digest::of(&json) != referrer.payload {
        return Err(ImageError::Corrupt(format!(
            "the SBOM of {}@{} does not match its digest",
            record.name, record.version
        )));
    }
    let inventory = inventory(&json)?;
    Ok(Some(Stored {
        referrer,
        json,
        inventory,
    }))
}

/// The stored SBOM of a version, generating it (for versions baked before
/// SBOMs existed) under the store lock if it has none.
pub fn read_or_generate(store: &Store, record: &VersionRecord) -> Result<Stored> {
    if let Some(s) = read(store, record)? {
        return Ok(s);
    }
    let _lock = store.lock()?;
    match read(store, record)? {
        Some(s) => Ok(s),
        None => generate(store, record),
    }
}

/// What a CycloneDX JSON document written by [`generate`] lists.
pub fn inventory(json: &[u8]) -> Result<Inventory> {
    let bad = |m: String| ImageError::Corrupt(format!("SBOM: {m}"));
    let v: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| bad(format!("not JSON: {e}")))?;
    let props = |c: &serde_json::Value| -> BTreeMap<String, String> {
        c["properties"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| Some((p["name"].as_str()?.into(), p["value"].as_str()?.into())))
            .collect()
    };
    let meta = props(&v["metadata"]["component"]);
    let release = Release {
        id: meta.get(P_OS_ID).cloned(),
        version_id: meta.get(P_OS_VERSION_ID).cloned(),
        codename: meta.get(P_OS_CODENAME).cloned(),
    };
    let mut packages = Vec::new();
    let mut files = Vec::new();
    for c in v["components"].as_array().into_iter().flatten() {
        let name = c["name"].as_str().unwrap_or_default().to_string();
        match c["type"].as_str() {
            Some("file") => files.push(FileItem {
                path: name,
                blake3: c["hashes"][0]["content"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            }),
            _ => {
                let p = props(c);
                let version = c["version"].as_str().unwrap_or_default().to_string();
                packages.push(Package {
                    source: p.get(P_SOURCE).cloned().unwrap_or_else(|| name.clone()),
                    source_version: p
                        .get(P_SOURCE_VERSION)
                        .cloned()
                        .unwrap_or_else(|| version.clone()),
                    architecture: p.get(P_ARCH).cloned().unwrap_or_default(),
                    purl: c["purl"].as_str().unwrap_or_default().to_string(),
                    name,
                    version,
                });
            }
        }
    }
    let has_db = match meta.get(P_INVENTORY).map(String::as_str) {
        Some("dpkg") => true,
        Some(_) => false,
        None => !packages.is_empty(),
    };
    Ok(Inventory {
        release,
        packages: has_db.then_some(packages),
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Package: bash
Status: install ok installed
Priority: required
Architecture: amd64
Version: 5.2.15-2+b2
Source: bash (5.2.15-2)
Description: GNU Bourne Again SHell
 Bash is an sh-compatible command language interpreter.

Package: libssl3
Status: install ok installed
Architecture: amd64
Source: openssl
Version: 3.0.11-1~deb12u2

Package: gone
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0-1

Package: tzdata
Status: install ok installed
Architecture: all
Version: 2024a-0+deb12u1
";

    fn bookworm() -> Release {
        Release {
            id: Some("debian".into()),
            version_id: Some("12".into()),
            codename: Some("bookworm".into()),
        }
    }

    #[test]
    fn parses_the_dpkg_database() {
        let pkgs = parse_status(STATUS, &bookworm()).unwrap();
        let names: Vec<&str> = pkgs.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            ["bash", "libssl3", "tzdata"],
            "config-files only is not installed"
        );
        let bash = &pkgs[0];
        assert_eq!(bash.version, "5.2.15-2+b2");
        assert_eq!(bash.source, "bash");
        assert_eq!(
            bash.source_version, "5.2.15-2",
            "binNMU: the source version is in parentheses"
        );
        assert_eq!(
            bash.purl,
            "pkg:deb/debian/bash@5.2.15-2+b2?arch=amd64&distro=debian-12"
        );
        assert_eq!(pkgs[1].source, "openssl");
        assert_eq!(pkgs[1].source_version, "3.0.11-1~deb12u2");
        assert_eq!(pkgs[2].architecture, "all");
    }

    #[test]
    fn release_is_read_through_symlinks_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("usr/lib")).unwrap();
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(
            root.join("usr/lib/os-release"),
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nVERSION_ID=\"12\"\nVERSION_CODENAME=bookworm\n",
        )
        .unwrap();
        // Absolute, as some images have it: must resolve inside the root.
        std::os::unix::fs::symlink("/usr/lib/os-release", root.join("etc/os-release")).unwrap();
        let r = release(root).unwrap();
        assert_eq!(r, bookworm());
        assert_eq!(r.ecosystem().as_deref(), Some("Debian:12"));
        // A link that climbs out of the root stays inside it.
        fs::remove_file(root.join("etc/os-release")).unwrap();
        std::os::unix::fs::symlink(
            "../../../../../../etc/hostname",
            root.join("etc/os-release"),
        )
        .unwrap();
        assert_eq!(read_in_root(root, "/etc/os-release").unwrap(), None);
    }

    fn record(root_hash: &str) -> VersionRecord {
        VersionRecord {
            name: "web".into(),
            version: 3,
            digest: Digest::of(b"manifest"),
            parent: None,
            parent_digest: None,
            created: "2026-11-22T10:00:00Z".into(),
            size: 0,
            outcome: crate::store::Outcome::Ok,
            error: None,
            seal_root: root_hash.into(),
            seal: Digest::of(b"seal"),
            config: Digest::of(b"config"),
            layers: vec![],
            inputs: crate::store::Inputs {
                source: "scratch".into(),
                files: vec![],
                scripts: vec![],
                tests: 0,
                cache_key: String::new(),
            },
            build_ms: 0,
            user: None,
        }
    }

    #[test]
    fn packages_round_trip_through_cyclonedx() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("var/lib/dpkg")).unwrap();
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("var/lib/dpkg/status"), STATUS).unwrap();
        fs::write(
            root.join("etc/os-release"),
            "ID=debian\nVERSION_ID=\"12\"\nVERSION_CODENAME=bookworm\n",
        )
        .unwrap();
        let seal = crate::seal::seal_tree(root).unwrap();
        let bom = bom(&record(&seal.root), root, &seal).unwrap();
        use cyclonedx_bom::validation::Validate;
        let validation = bom.validate_version(SpecVersion::V1_5);
        assert!(validation.passed(), "{validation:?}");
        let mut json = Vec::new();
        bom.output_as_json_v1_5(&mut json).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["bomFormat"], "CycloneDX");
        assert_eq!(v["specVersion"], "1.5");
        let inv = inventory(&json).unwrap();
        assert_eq!(inv.release, bookworm());
        assert_eq!(
            inv.packages.unwrap(),
            parse_status(STATUS, &bookworm()).unwrap()
        );
        assert!(inv.files.is_empty());
    }

    #[test]
    fn a_root_without_dpkg_lists_files_with_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::write(root.join("bin/app"), b"binary").unwrap();
        std::os::unix::fs::symlink("app", root.join("bin/alias")).unwrap();
        let seal = crate::seal::seal_tree(root).unwrap();
        let bom = bom(&record(&seal.root), root, &seal).unwrap();
        let mut json = Vec::new();
        bom.output_as_json_v1_5(&mut json).unwrap();
        let inv = inventory(&json).unwrap();
        assert_eq!(inv.packages, None);
        assert_eq!(
            inv.files,
            vec![FileItem {
                path: "/bin/app".into(),
                blake3: blake3::hash(b"binary").to_hex().to_string()
            }]
        );
    }
}
