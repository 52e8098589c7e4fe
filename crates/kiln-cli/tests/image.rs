//! End-to-end tests of baking: the real `kiln` binary, real libcontainer
//! sandboxes, real tarballs and OCI layouts, and a busybox userland.
//! They need root (CI runs as root) and busybox-static.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use support::*;

/// base (rootfs tarball) → app (files + scripts) → worker: a three-image chain.
fn chain_project() -> Project {
    let p = Project::new();
    p.busybox_tarball("base.tar.gz");
    p.write(
        "kiln.toml",
        r#"
[project]
name = "chain"

[images.base]
from = { rootfs = "base.tar.gz" }
env = { GREETING = "hello" }

[images.app]
from = "base"
entrypoint = ["/bin/sh", "-c", "cat /srv/index.html"]
ports = [8080]
test = [["/bin/test", "-f", "/opt/app/built-by-script"]]

[images.worker]
from = "app"
test = [["/bin/sh", "-c", "test \"$(cat /opt/worker)\" = hello"]]
"#,
    );
    p.write("images/app/files/srv/index.html", "<h1>hi</h1>\n");
    p.script("app", "10_setup.sh", "mkdir -p /opt/app\necho \"$GREETING from $(hostname)\" > /opt/app/built-by-script\ntouch /kiln-was-here");
    p.script("worker", "10_worker.sh", "echo $GREETING > /opt/worker");
    p
}

fn digests(p: &Project) -> Vec<(String, String)> {
    let list = p.kiln(&["image", "list", "--json"]).ok().json();
    list.as_array()
        .unwrap()
        .iter()
        .filter(|i| i["status"] == "current")
        .map(|i| {
            (
                i["name"].as_str().unwrap().to_string(),
                i["digest"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn builds_a_layered_chain_with_scripts_in_a_sandbox() {
    let p = chain_project();
    let run = p.kiln(&["image", "build", "--all"]).ok();
    // Plain progress lines without a TTY.
    assert!(
        run.stderr.contains("app: script 1/1: 10_setup.sh"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("+ worker v1"), "{}", run.stderr);
    let app = p.root_of("app");
    // The script ran inside the sandbox, over the image root, with the spec's env.
    assert_eq!(
        fs::read_to_string(app.join("opt/app/built-by-script")).unwrap(),
        "hello from build-app\n"
    );
    assert!(app.join("kiln-was-here").exists());
    assert!(
        !std::path::Path::new("/kiln-was-here").exists(),
        "a build script wrote to the host's root"
    );
    // Files are copied at their relative paths; build scaffolding is gone.
    assert_eq!(
        fs::read_to_string(app.join("srv/index.html")).unwrap(),
        "<h1>hi</h1>\n"
    );
    assert!(!app.join(".kiln-build").exists());
    assert!(p.root_of("worker").join("opt/worker").exists());
    assert!(
        !p.root_of("base").join("opt").exists(),
        "a child's build changed its parent's root"
    );

    // One layer per image on top of its parent's layers.
    let show = p.kiln(&["image", "show", "worker", "--json"]).ok().json();
    assert_eq!(
        show["lineage"],
        serde_json::json!(["base@1", "app@1", "worker@1"])
    );
    assert_eq!(
        show["layers"].as_array().unwrap().len(),
        4,
        "base import + base + app + worker"
    );
    let app_show = p.kiln(&["image", "show", "app@1", "--json"]).ok().json();
    assert_eq!(
        show["layers"].as_array().unwrap()[..3],
        app_show["layers"].as_array().unwrap()[..3]
    );
    assert_eq!(
        app_show["inputs"]["scripts"],
        serde_json::json!(["10_setup.sh"])
    );

    // The store is an OCI image layout whose index names every version.
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(p.store().join("oci/index.json")).unwrap()).unwrap();
    // Tagged entries are versions; untagged ones are their artifacts (SBOMs).
    let refs: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str())
        .collect();
    assert!(index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["artifactType"] == "application/vnd.cyclonedx+json"));
    assert!(
        refs.contains(&"worker:1") && refs.contains(&"app:latest"),
        "{refs:?}"
    );
    let manifest: serde_json::Value = serde_json::from_slice(
        &fs::read(
            p.store().join("oci/blobs/sha256").join(
                show["digest"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("sha256:"),
            ),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        manifest["annotations"]["dev.kiln.seal.root"],
        show["seal_root"]
    );
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 4);
}

#[test]
fn same_inputs_same_digests_in_fresh_stores() {
    let p = chain_project();
    p.kiln(&["image", "build", "--all"]).ok();
    let first = digests(&p);
    assert_eq!(first.len(), 3);
    fs::remove_dir_all(p.store()).unwrap();
    p.kiln(&["image", "build", "--all"]).ok();
    assert_eq!(
        digests(&p),
        first,
        "rebuilding in a fresh store changed digests"
    );
    // A second store elsewhere, through --store, agrees too.
    let other = tempfile::tempdir().unwrap();
    p.kiln(&[
        "--store",
        other.path().to_str().unwrap(),
        "image",
        "build",
        "--all",
    ])
    .ok();
    let list = p
        .kiln(&[
            "--store",
            other.path().to_str().unwrap(),
            "image",
            "list",
            "--json",
        ])
        .ok()
        .json();
    let again: Vec<(String, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap().into(),
                i["digest"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(again, first);
}

#[test]
fn layers_replay_to_the_sealed_root() {
    // Extracting the OCI layers in order (as any consumer would) gives a
    // tree whose files equal the unpacked, sealed root.
    let p = chain_project();
    p.script(
        "worker",
        "20_delete.sh",
        "rm /srv/index.html\nrm -r /opt/app",
    );
    p.kiln(&["image", "build", "--all"]).ok();
    let show = p.kiln(&["image", "show", "worker", "--json"]).ok().json();
    let out = tempfile::tempdir().unwrap();
    for l in show["layers"].as_array().unwrap() {
        let blob = p
            .store()
            .join("oci/blobs/sha256")
            .join(l["digest"].as_str().unwrap().trim_start_matches("sha256:"));
        // GNU tar does not apply OCI whiteouts; apply them by hand after.
        let st = std::process::Command::new("tar")
            .arg("-C")
            .arg(out.path())
            .arg("-xpf")
            .arg(&blob)
            .status()
            .unwrap();
        assert!(st.success());
        apply_whiteouts(out.path());
    }
    let root = p.root_of("worker");
    assert!(!root.join("srv/index.html").exists() && !root.join("opt/app").exists());
    let diff = std::process::Command::new("diff")
        .arg("-r")
        .arg("--no-dereference")
        .arg(out.path())
        .arg(&root)
        .output()
        .unwrap();
    assert!(
        diff.status.success(),
        "layers differ from the root:\n{}",
        String::from_utf8_lossy(&diff.stdout)
    );
}

fn apply_whiteouts(dir: &std::path::Path) {
    for e in fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let ft = e.file_type().unwrap();
        if let Some(hidden) = name.strip_prefix(".wh.") {
            let victim = dir.join(hidden);
            if victim.is_dir() && !victim.is_symlink() {
                fs::remove_dir_all(&victim).unwrap()
            } else {
                let _ = fs::remove_file(&victim);
            }
            fs::remove_file(e.path()).unwrap();
        } else if ft.is_dir() {
            apply_whiteouts(&e.path());
        }
    }
}

#[test]
fn cache_rebuilds_exactly_what_changed() {
    let p = chain_project();
    p.kiln(&["image", "build", "--all"]).ok();
    let v1 = digests(&p);
    // Unchanged: everything cached, nothing rebuilt.
    let run = p.kiln(&["image", "build", "--all"]).ok();
    assert_eq!(run.stderr.matches("(cached)").count(), 3, "{}", run.stderr);
    // One script of `worker` changed: only worker rebuilds.
    p.script(
        "worker",
        "10_worker.sh",
        "echo $GREETING > /opt/worker\necho changed > /opt/changed",
    );
    let run = p.kiln(&["image", "build", "--all"]).ok();
    assert!(
        run.stderr.contains("= base v1")
            && run.stderr.contains("= app v1")
            && run.stderr.contains("+ worker v2"),
        "{}",
        run.stderr
    );
    // A file of `app` changed: app and its child rebuild, base does not.
    p.write("images/app/files/srv/index.html", "<h1>v2</h1>\n");
    let run = p.kiln(&["image", "build", "worker"]).ok();
    assert!(
        run.stderr.contains("= base v1")
            && run.stderr.contains("+ app v2")
            && run.stderr.contains("+ worker v3"),
        "{}",
        run.stderr
    );
    let v3 = digests(&p);
    assert_eq!(v1[1], v3[1], "base digest is stable"); // sorted by name: app, base, worker
    assert_ne!(v1[0], v3[0]);
    // Going back to the old inputs is a cache hit on the old version.
    p.write("images/app/files/srv/index.html", "<h1>hi</h1>\n");
    let run = p.kiln(&["image", "build", "app"]).ok();
    assert!(run.stderr.contains("= app v1"), "{}", run.stderr);
    let list = p.kiln(&["image", "list", "app", "--json"]).ok().json();
    let statuses: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["current", "previous"]);
}

#[test]
fn verify_names_every_tampered_file() {
    let p = chain_project();
    p.kiln(&["image", "build", "--all"]).ok();
    let ok = p.kiln(&["image", "verify", "app"]).ok();
    assert!(ok.stdout.contains("matches its seal"), "{}", ok.stdout);
    let root = p.root_of("app");
    fs::write(root.join("srv/index.html"), "<h1>defaced</h1>\n").unwrap();
    fs::write(root.join("opt/app/backdoor"), "x").unwrap();
    fs::remove_file(root.join("kiln-was-here")).unwrap();
    fs::set_permissions(root.join("bin/busybox"), fs::Permissions::from_mode(0o4755)).unwrap();
    let bad = p.kiln(&["image", "verify", "app@1"]).expect(2);
    for want in [
        "changed  /srv/index.html (content)",
        "added    /opt/app/backdoor",
        "removed  /kiln-was-here",
        "changed  /bin/busybox (mode)",
    ] {
        assert!(
            bad.stdout.contains(want),
            "missing {want:?} in:\n{}",
            bad.stdout
        );
    }
    let json = p
        .kiln(&["image", "verify", "app", "--json"])
        .expect(2)
        .json();
    assert_eq!(json["differences"].as_array().unwrap().len(), 4);
    // The parent is untouched and still verifies.
    p.kiln(&["image", "verify", "base"]).ok();
}

#[test]
fn failing_test_keeps_previous_version_current() {
    let p = chain_project();
    p.kiln(&["image", "build", "app"]).ok();
    p.write("kiln.toml", &fs::read_to_string(p.path().join("kiln.toml")).unwrap().replace(r#"test = [["/bin/test", "-f", "/opt/app/built-by-script"]]"#, r#"test = [["/bin/sh", "-c", "echo probing; echo root is $(touch /x 2>&1 || echo read-only); exit 7"]]"#));
    let run = p.kiln(&["image", "build", "app"]).expect(1);
    assert!(
        run.stderr.contains("exited with status 7"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("probing"),
        "test output is shown: {}",
        run.stderr
    );
    // Tests run in the sealed image with a read-only root.
    assert!(
        run.stderr.contains("Read-only file system"),
        "{}",
        run.stderr
    );
    let list = p.kiln(&["image", "list", "app", "--json"]).ok().json();
    let rows: Vec<(u64, &str)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["version"].as_u64().unwrap(),
                i["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(rows, [(1, "current"), (2, "failed")]);
    // gc removes the failed version and its unshared blobs.
    let gc = p.kiln(&["image", "gc", "--json"]).ok().json();
    assert_eq!(gc["versions"], serde_json::json!(["app@2"]));
    p.kiln(&["image", "verify", "app"]).ok();
}

#[test]
fn list_and_show_json_fields() {
    let p = chain_project();
    p.kiln(&["image", "build", "--all"]).ok();
    let list = p.kiln(&["image", "list", "--json"]).ok().json();
    for item in list.as_array().unwrap() {
        for field in [
            "name", "version", "digest", "parent", "created", "size", "status",
        ] {
            assert!(item.get(field).is_some(), "list item lacks {field}: {item}");
        }
        assert!(item["digest"].as_str().unwrap().starts_with("sha256:"));
    }
    let app = list
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "app")
        .unwrap();
    assert_eq!(app["parent"], "base@1");
    assert!(
        app["size"].as_u64().unwrap() > 1_000_000,
        "busybox is in the root"
    );
    let text = p.kiln(&["image", "list"]).ok();
    assert!(
        text.stdout.lines().next().unwrap().starts_with("NAME"),
        "{}",
        text.stdout
    );
    let show = p.kiln(&["image", "show", "app"]).ok();
    assert!(
        show.stdout.contains("lineage    base@1 → app@1"),
        "{}",
        show.stdout
    );
}

#[test]
fn bases_from_tar_zst_and_oci_layouts() {
    let p = Project::new();
    p.busybox_tarball("plain.tar");
    p.busybox_tarball("small.tar.zst");
    // An OCI image layout, as skopeo or buildah would write it: one gzip
    // layer with the userland, one that deletes a file with a whiteout.
    let layout = p.path().join("layout");
    make_oci_layout(&p, &layout);
    p.write(
        "kiln.toml",
        r#"
[project]
name = "sources"
[images.plain]
from = { rootfs = "plain.tar" }
[images.zst]
from = { rootfs = "small.tar.zst" }
[images.fromoci]
from = { oci = "layout:v1" }
test = [["/bin/sh", "-c", "test ! -e /etc/os-release && test \"$FROM_OCI\" = yes"]]
"#,
    );
    p.kiln(&["image", "build", "--all"]).ok();
    assert!(p.root_of("zst").join("bin/busybox").is_file());
    assert!(p.root_of("plain").join("etc/os-release").is_file());
    let oci_root = p.root_of("fromoci");
    assert!(oci_root.join("bin/busybox").is_file());
    assert!(
        !oci_root.join("etc/os-release").exists(),
        "the OCI whiteout was applied"
    );
    // The same userland from .tar and .tar.zst normalises to the same base layer.
    let a = p.kiln(&["image", "show", "plain", "--json"]).ok().json();
    let b = p.kiln(&["image", "show", "zst", "--json"]).ok().json();
    assert_eq!(a["layers"][0], b["layers"][0]);
    // A missing tag is a clear error.
    p.write(
        "kiln.toml",
        "[project]\nname = \"s\"\n[images.x]\nfrom = { oci = \"layout:v9\" }\n",
    );
    let run = p.kiln(&["image", "build", "x"]).expect(1);
    assert!(
        run.stderr.contains("no manifest tagged `v9`; tags: v1"),
        "{}",
        run.stderr
    );
}

fn make_oci_layout(p: &Project, layout: &std::path::Path) {
    use sha2::Digest;
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| -> (String, usize) {
        let hex = hex::encode(sha2::Sha256::digest(bytes));
        fs::write(blobs.join(&hex), bytes).unwrap();
        (format!("sha256:{hex}"), bytes.len())
    };
    let l1 = p.busybox_tarball("l1.tar.gz");
    let (d1, s1) = put(&fs::read(&l1).unwrap());
    let l2 = p.path().join("l2.tar");
    python_tar(&l2, "add('etc/.wh.os-release', b'')");
    let (d2, s2) = put(&fs::read(&l2).unwrap());
    let config = serde_json::json!({"architecture": "amd64", "os": "linux", "config": {"Env": ["FROM_OCI=yes"]}, "rootfs": {"type": "layers", "diff_ids": []}});
    let (dc, sc) = put(config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": dc, "size": sc},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d1, "size": s1},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d2, "size": s2}
        ]
    });
    let (dm, sm) = put(manifest.to_string().as_bytes());
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": dm, "size": sm, "annotations": {"org.opencontainers.image.ref.name": "v1"}}]});
    fs::write(layout.join("index.json"), index.to_string()).unwrap();
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
}

#[test]
fn scratch_image_with_a_static_binary() {
    let p = Project::new();
    p.write("kiln.toml", "[project]\nname = \"s\"\n[images.tiny]\nfrom = \"scratch\"\nentrypoint = [\"/busybox\", \"true\"]\ntest = [[\"/busybox\", \"true\"]]\n");
    fs::create_dir_all(p.path().join("images/tiny/files")).unwrap();
    fs::copy(BUSYBOX, p.path().join("images/tiny/files/busybox")).unwrap();
    p.kiln(&["image", "build", "tiny"]).ok();
    let root = p.root_of("tiny");
    let mut names: Vec<String> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect();
    names.sort();
    assert_eq!(names, ["busybox", "dev", "proc", "run", "sys", "tmp"]);
}

// ---- bad input -------------------------------------------------------------

#[test]
fn malformed_spec_points_at_file_line_column() {
    let p = Project::new();
    p.write(
        "kiln.toml",
        "[project]\nname = \"x\"\n\n[images.app]\nfrom = \"scratch\"\nports = [\"http\"]\n",
    );
    let run = p.kiln(&["image", "build", "--all"]).expect(1);
    assert!(
        run.stderr
            .contains("kiln.toml:6:10: invalid type: string \"http\", expected u16"),
        "{}",
        run.stderr
    );
    p.write(
        "kiln.toml",
        "[project]\nname = \"x\"\n[images.app]\nfrom = \"base\"\n[images.base]\nfrom = \"app\"\n",
    );
    let run = p.kiln(&["image", "build", "--all"]).expect(1);
    assert!(
        run.stderr
            .contains("kiln.toml:4:8: image `app` is built from itself through a cycle"),
        "{}",
        run.stderr
    );
    p.write(
        "kiln.toml",
        "[project]\nname = \"x\"\n[images.app]\nfrom = { rootfs = \"missing.tar\" }\nwhat = 1\n",
    );
    let run = p.kiln(&["image", "build", "--all"]).expect(1);
    assert!(
        run.stderr.contains("kiln.toml:5:1: unknown field `what`"),
        "{}",
        run.stderr
    );
    assert!(!p.store().join("images").exists() || entries(&p.store().join("images")).is_empty());
}

/// Builds an image from a hostile tarball and checks it is refused, naming
/// the entry, with nothing written outside the store and no version made.
fn refuses(script: &str, entry: &str, reason: &str) {
    let p = Project::new();
    let outside = p.path().join("outside");
    python_tar(
        &p.path().join("evil.tar"),
        &script.replace("OUTSIDE", outside.to_str().unwrap()),
    );
    p.write(
        "kiln.toml",
        "[project]\nname = \"x\"\n[images.evil]\nfrom = { rootfs = \"evil.tar\" }\n",
    );
    let run = p.kiln(&["image", "build", "evil"]).expect(1);
    let entry = entry.replace("OUTSIDE", outside.to_str().unwrap());
    assert!(
        run.stderr.contains(&format!("entry `{entry}` {reason}")),
        "wanted entry `{entry}` {reason}:\n{}",
        run.stderr
    );
    assert!(!outside.exists(), "something was written outside the root");
    assert!(
        entries(&p.store().join("images")).is_empty(),
        "a version was recorded"
    );
    assert!(
        entries(&p.store().join("roots")).is_empty(),
        "a root was left"
    );
    assert!(
        entries(&p.store().join("tmp")).is_empty(),
        "temporary files were left"
    );
}

#[test]
fn hostile_tarballs_are_refused() {
    refuses(
        "add('ok')\nadd('../../outside/escape')",
        "../../outside/escape",
        "climbs out of the root with `..`",
    );
    refuses("add('OUTSIDE/abs')", "OUTSIDE/abs", "has an absolute path");
    refuses(
        "add('link', type=tarfile.SYMTYPE, linkname='OUTSIDE')\nadd('link/pwned')",
        "link/pwned",
        "would be written through the symlink `link`",
    );
    refuses(
        "add('dev/sda', type=tarfile.BLKTYPE, devmajor=8, devminor=0)",
        "dev/sda",
        "is a device node",
    );
    refuses(
        "add('etc/passwd')\nadd('hl', type=tarfile.LNKTYPE, linkname='../outside')",
        "hl",
        "links to a path that climbs out of the root with `..`",
    );
}

#[test]
fn failing_script_shows_status_and_tail_and_leaves_nothing() {
    let p = chain_project();
    p.kiln(&["image", "build", "base"]).ok();
    p.script(
        "app",
        "10_setup.sh",
        "echo step one\necho about to fail >&2\nexit 42",
    );
    let run = p.kiln(&["image", "build", "app"]).expect(1);
    assert!(
        run.stderr
            .contains("script 10_setup.sh of image `app` exited with status 42"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("step one") && run.stderr.contains("about to fail"),
        "{}",
        run.stderr
    );
    assert!(
        p.kiln(&["image", "list", "app", "--json"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .is_empty(),
        "no version of app"
    );
    assert!(
        entries(&p.store().join("tmp")).is_empty(),
        "{:?}",
        entries(&p.store().join("tmp"))
    );
    assert_eq!(
        entries(&p.store().join("roots")).len(),
        1,
        "only base's root"
    );
    assert!(
        entries(&p.store().join("sandbox/state")).is_empty(),
        "no sandbox left"
    );
}

#[test]
fn killed_build_reruns_to_a_correct_build() {
    let p = chain_project();
    p.script("app", "05_slow.sh", "echo slow; sleep 3");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("-C")
        .arg(p.path())
        .args(["image", "build", "--all"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the slow script is running, then SIGKILL kiln.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while entries(&p.store().join("sandbox/state")).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the build never started its script"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The state directory appears before libcontainer writes state.json, so
    // the kill lands anywhere from half-created to mid-script.
    let killed = child.id();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        p.kiln(&["image", "list", "app", "--json"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .is_empty(),
        "a killed build made a version"
    );
    p.kiln(&["image", "build", "--all"]).ok();
    p.kiln(&["image", "verify", "worker"]).ok();
    p.kiln(&["image", "verify", "app"]).ok();
    assert!(entries(&p.store().join("tmp")).is_empty());
    assert!(entries(&p.store().join("sandbox/state")).is_empty());
    // Nor any cgroup of the killed build's sandboxes (their ids carry its pid).
    let prefix = format!("kiln-build-app-{killed}-");
    let mut cgroups: Vec<std::path::PathBuf> = vec!["/sys/fs/cgroup/kiln".into()];
    cgroups.extend(
        std::fs::read_dir("/sys/fs/cgroup")
            .unwrap()
            .flatten()
            .map(|c| c.path().join("kiln")),
    );
    let left: Vec<String> = cgroups
        .iter()
        .flat_map(|d| entries(d))
        .filter(|n| {
            std::path::Path::new(n)
                .file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with(&prefix))
        })
        .collect();
    assert!(
        left.is_empty(),
        "cgroups left by the killed build: {left:?}"
    );
}

#[test]
fn init_scaffold_builds_from_debootstrap() {
    // The scaffold's real base: debootstrap bookworm (about a minute), then
    // apt-get inside the build sandbox, then the app layered on it.
    let p = Project::new();
    p.kiln(&["init", "--name", "shop"]).ok();
    assert!(p
        .path()
        .join("images/base/scripts/10_packages.sh")
        .is_file());
    let run = p.kiln(&["image", "build", "--all"]).ok();
    assert!(
        run.stderr.contains("+ base v1") && run.stderr.contains("+ app v1"),
        "{}",
        run.stderr
    );
    let app = p.root_of("app");
    assert!(app.join("etc/kiln-base").is_file() && app.join("srv/www/healthz").is_file());
    assert!(
        app.join("bin/busybox").exists(),
        "busybox was installed by the build script"
    );
    p.kiln(&["image", "verify", "app"]).ok();
    // A second build is entirely cached, debootstrap included.
    let again = p.kiln(&["image", "build", "--all"]).ok();
    assert_eq!(
        again.stderr.matches("(cached)").count(),
        2,
        "{}",
        again.stderr
    );
    // The scaffold's staging environment deploys and serves.
    let applied = p.kiln(&["apply", "staging", "--yes"]).ok();
    let list = p.kiln(&["server", "list", "staging", "--json"]).ok().json();
    let _ = applied;
    assert_eq!(list.as_array().unwrap().len(), 2);
    for s in list.as_array().unwrap() {
        assert_eq!(s["health"], "healthy", "{s}");
    }
    p.kiln(&["destroy", "staging", "--yes"]).ok();
    // Running init again refuses to overwrite.
    let twice = p.kiln(&["init"]).expect(1);
    assert!(
        twice.stderr.contains("already has a kiln.toml"),
        "{}",
        twice.stderr
    );
    // The debootstrap import is reproducible: a fresh store importing the
    // same suite from the same mirror writes the same base layer, byte for
    // byte (ldconfig's cache dropped, debootstrap's clock fixed).
    let fresh = Project::new();
    fresh.write(
        "kiln.toml",
        "[project]\nname = \"again\"\n[images.base]\nfrom = { debootstrap = \"bookworm\" }\n",
    );
    fresh.kiln(&["image", "build", "base"]).ok();
    let first_layer = |p: &Project| {
        p.kiln(&["image", "show", "base", "--json"]).ok().json()["layers"][0]["digest"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(first_layer(&fresh), first_layer(&p));
}
