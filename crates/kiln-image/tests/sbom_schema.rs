//! The SBOMs kiln writes validate against the CycloneDX 1.5 JSON schema,
//! with a package database and without one.

#[path = "schema/cyclonedx.rs"]
mod cyclonedx;

use std::fs;

use kiln_image::sbom;
use kiln_image::store::{Digest, Inputs, Outcome, VersionRecord};

fn record() -> VersionRecord {
    VersionRecord {
        name: "web".into(),
        version: 1,
        digest: Digest::of(b"manifest"),
        parent: None,
        parent_digest: None,
        created: "2026-11-22T10:00:00Z".into(),
        size: 0,
        outcome: Outcome::Ok,
        error: None,
        seal_root: "r".into(),
        seal: Digest::of(b"seal"),
        config: Digest::of(b"config"),
        layers: vec![],
        inputs: Inputs {
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

fn json_of(root: &std::path::Path) -> serde_json::Value {
    let seal = kiln_image::seal::seal_tree(root).unwrap();
    let bom = sbom::bom(&record(), root, &seal).unwrap();
    let mut out = Vec::new();
    bom.output_as_json_v1_5(&mut out).unwrap();
    serde_json::from_slice(&out).unwrap()
}

#[test]
fn a_dpkg_sbom_is_valid_cyclonedx_1_5() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::create_dir_all(root.join("var/lib/dpkg")).unwrap();
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(
        root.join("etc/os-release"),
        "ID=debian\nVERSION_ID=\"12\"\n",
    )
    .unwrap();
    fs::write(
        root.join("var/lib/dpkg/status"),
        "Package: libc6\nStatus: install ok installed\nArchitecture: amd64\nSource: glibc\nVersion: 2.36-9+deb12u4\n\nPackage: tzdata\nStatus: install ok installed\nArchitecture: all\nVersion: 2024a-0+deb12u1\n",
    )
    .unwrap();
    let v = json_of(root);
    assert_eq!(v["components"].as_array().unwrap().len(), 2);
    let errors = cyclonedx::cyclonedx_1_5_errors(&v);
    assert!(errors.is_empty(), "{errors:#?}\n{v:#}");
    // The validator does catch a broken document.
    let mut broken = v.clone();
    broken["components"][0]["type"] = "gadget".into();
    assert!(!cyclonedx::cyclonedx_1_5_errors(&broken).is_empty());
}

#[test]
fn a_files_sbom_is_valid_cyclonedx_1_5() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("bin")).unwrap();
    fs::write(dir.path().join("bin/busybox"), b"\x7fELF").unwrap();
    let v = json_of(dir.path());
    assert_eq!(v["components"][0]["hashes"][0]["alg"], "BLAKE3");
    let errors = cyclonedx::cyclonedx_1_5_errors(&v);
    assert!(errors.is_empty(), "{errors:#?}\n{v:#}");
}
