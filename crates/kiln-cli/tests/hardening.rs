//! End-to-end tests of host safety around baking: a private store, build
//! sandboxes under seccomp with limits and time limits that die with
//! `kiln`, deep trees, import caps, image users, and store self-repair.
//! Real `kiln` binary, real sandboxes; they need root and busybox-static.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::*;

/// A busybox base from a tarball (with extra files staged by `stage`) and
/// `kiln.toml` made of `images`, which may use `base`.
fn project(stage: impl Fn(&Path), images: &str) -> Project {
    let p = Project::new();
    let staging = p.path().join(".stage");
    make_busybox_root(&staging);
    for applet in ["unshare", "mount", "seq", "mv"] {
        std::os::unix::fs::symlink("busybox", staging.join("bin").join(applet)).unwrap();
    }
    stage(&staging);
    let st = Command::new("tar")
        .arg("-C")
        .arg(&staging)
        .args(["--numeric-owner", "-czf"])
        .arg(p.path().join("base.tar.gz"))
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    fs::remove_dir_all(&staging).unwrap();
    p.write(
        "kiln.toml",
        &format!(
            "[project]\nname = \"hard\"\n[images.base]\nfrom = {{ rootfs = \"base.tar.gz\" }}\n{images}"
        ),
    );
    p
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn the_store_is_private_so_a_setuid_binary_in_a_root_is_no_way_to_root() {
    let p = project(
        |root| {
            let suid = root.join("bin/suidbox");
            fs::copy(BUSYBOX, &suid).unwrap();
            fs::set_permissions(&suid, fs::Permissions::from_mode(0o4755)).unwrap();
        },
        "",
    );
    // Only the store's own mode may stand between other users and it.
    fs::set_permissions(p.path(), fs::Permissions::from_mode(0o755)).unwrap();
    p.kiln(&["image", "build", "base"]).ok();
    let suid = p.root_of("base").join("bin/suidbox");
    assert_eq!(mode(&suid), 0o4755, "the image keeps its setuid binary");
    assert_eq!(mode(&p.store()), 0o700);
    assert_eq!(mode(&p.store().join("roots")), 0o700);
    // runuser, not setpriv: setpriv keeps root's capabilities until it
    // has executed the command, so it can reach anything.
    let as_nobody = |path: &Path| {
        Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .arg(path)
            .args(["id", "-u"])
            .output()
            .unwrap()
    };
    let out = as_nobody(&suid);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "nobody ran the store's setuid binary: {out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );
    // A store made before this rule (or chmod-ed since) is made private again.
    fs::set_permissions(p.store(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(p.store().join("roots"), fs::Permissions::from_mode(0o755)).unwrap();
    p.kiln(&["image", "list"]).ok();
    assert_eq!(mode(&p.store()), 0o700);
    assert_eq!(mode(&p.store().join("roots")), 0o700);
    assert!(!as_nobody(&suid).status.success());
}

/// The value of a cgroup limit file as the sandbox sees it, written by the
/// script below into `/report`.
fn reported<'a>(report: &'a str, key: &str) -> &'a str {
    report
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key} in the report:\n{report}"))
}

#[test]
fn build_scripts_run_under_seccomp_with_limits_and_a_read_only_cgroupfs() {
    let p = project(
        |_| {},
        r#"[images.probe]
from = "base"
limits = { pids = 123, memory = "300M" }
test = [["/bin/sh", "-c", "grep -q '^Seccomp:[[:space:]]*2' /proc/self/status && grep -q '^NoNewPrivs:[[:space:]]*1' /proc/self/status"]]
"#,
    );
    p.script(
        "probe",
        "10_probe.sh",
        r#"exec > /report 2>&1
set +e
grep -E '^(Seccomp|NoNewPrivs|CapBnd):' /proc/self/status
for f in /sys/fs/cgroup/pids.max /sys/fs/cgroup/pids/pids.max; do [ -e $f ] && echo "pids $(cat $f)"; done
for f in /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory/memory.limit_in_bytes; do [ -e $f ] && echo "memory $(cat $f)"; done
for f in /sys/fs/cgroup/pids.max /sys/fs/cgroup/pids/pids.max; do [ -e $f ] && echo max > $f && echo "WROTE $f"; done
unshare -U -r -m sh -c 'mount -t tmpfs none /mnt' && echo UNSHARED
mount -t tmpfs none /mnt && echo MOUNTED
echo 1 > /proc/sys/kernel/panic && echo WROTE /proc/sys
echo end"#,
    );
    p.kiln(&["image", "build", "probe"]).ok();
    let report = fs::read_to_string(p.root_of("probe").join("report")).unwrap();
    assert_eq!(reported(&report, "Seccomp:"), "2", "{report}");
    assert_eq!(reported(&report, "NoNewPrivs:"), "1", "{report}");
    // Docker's default set: CHOWN .. SETFCAP, nothing else.
    assert_eq!(reported(&report, "CapBnd:"), "00000000a80425fb", "{report}");
    assert_eq!(reported(&report, "pids"), "123", "{report}");
    assert_eq!(
        reported(&report, "memory"),
        (300u64 << 20).to_string(),
        "{report}"
    );
    assert!(report.contains("end"), "{report}");
    for refused in ["WROTE", "UNSHARED", "MOUNTED"] {
        assert!(!report.contains(refused), "{refused}:\n{report}");
    }
}

#[test]
fn scripts_and_tests_past_their_timeout_are_killed_and_named() {
    let p = project(
        |_| {},
        "[images.slow]\nfrom = \"base\"\ntimeout = { script = \"1s\" }\n[images.stuck]\nfrom = \"base\"\ntimeout = { test = \"1s\" }\ntest = [[\"/bin/sleep\", \"99911\"]]\n",
    );
    p.script("slow", "10_wait.sh", "echo waiting forever\nsleep 99910");
    let run = p.kiln(&["image", "build", "slow"]).expect(1);
    assert!(
        run.stderr.contains(
            "script 10_wait.sh of image `slow` timed out after 1s and was killed (raise `timeout` in kiln.toml if it needs longer)"
        ),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("waiting forever"), "{}", run.stderr);
    let run = p.kiln(&["image", "build", "stuck"]).expect(1);
    assert!(
        run.stderr.contains(
            "test [\"/bin/sleep\", \"99911\"] of image `stuck` timed out after 1s and was killed"
        ),
        "{}",
        run.stderr
    );
    assert!(build_processes("sleep 9991").is_empty());
    assert!(entries(&p.store().join("sandbox/state")).is_empty());
    assert!(entries(&p.store().join("tmp")).is_empty());
}

/// Pids of every process on the host whose command line starts with `cmd`.
fn build_processes(cmd: &str) -> Vec<i32> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .starts_with(cmd)
            }) && !dead(*pid)
        })
        .collect()
}

#[test]
fn a_killed_build_leaves_no_process_behind() {
    let p = project(|_| {}, "[images.slow]\nfrom = \"base\"\n");
    p.kiln(&["image", "build", "base"]).ok();
    p.script(
        "slow",
        "10_wait.sh",
        "sleep 99920 &\nsleep 99921 | cat\nwait",
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("-C")
        .arg(p.path())
        .args(["image", "build", "slow"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the build script's processes", || {
        build_processes("sleep 99920").len() == 1 && build_processes("sleep 99921").len() == 1
    });
    child.kill().unwrap();
    child.wait().unwrap();
    wait_until("every process of the killed build to die", || {
        build_processes("sleep 9992").is_empty()
    });
    // The next build clears what the killed one left and succeeds.
    p.script("slow", "10_wait.sh", "true");
    p.kiln(&["image", "build", "slow"]).ok();
    assert!(entries(&p.store().join("sandbox/state")).is_empty());
}

#[test]
fn ten_thousand_nested_directories_fail_the_build_cleanly() {
    let p = project(|_| {}, "[images.deep]\nfrom = \"base\"\n");
    p.kiln(&["image", "build", "base"]).ok();
    // 100 levels at a time, each chain moved under the next by a rename of
    // short paths: 10,000 levels, a path of 20,000 bytes, and no command
    // ever names more than 200 of them.
    p.script(
        "deep",
        "10_deep.sh",
        "step=d\nfor i in $(seq 99); do step=$step/d; done\nmkdir -p /deep/$step\nfor i in $(seq 99); do mkdir -p /next/$step; mv /deep /next/$step/deep; mv /next /deep; done\necho built",
    );
    let run = p.kiln(&["image", "build", "deep"]).expect(1);
    assert!(
        run.stderr
            .contains("image `deep`: the build left /deep/d/d/d")
            && run.stderr.contains("a path longer than 3072 bytes"),
        "{}",
        run.stderr
    );
    assert!(
        entries(&p.store().join("tmp")).is_empty(),
        "{:?}",
        entries(&p.store().join("tmp"))
    );
    assert!(p
        .kiln(&["image", "list", "deep", "--json"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn an_import_past_its_limit_is_refused_and_leaves_nothing() {
    let p = Project::new();
    // 1 MiB of gzip holding 64 MiB of zeros.
    let st = Command::new("python3")
        .arg("-c")
        .arg("import tarfile, io, sys\nt = tarfile.open(sys.argv[1], 'w:gz')\ni = tarfile.TarInfo('zeros')\ni.size = 64 << 20\nt.addfile(i, io.BytesIO(bytes(64 << 20)))\nt.close()\n")
        .arg(p.path().join("bomb.tar.gz"))
        .status()
        .unwrap();
    assert!(st.success());
    assert!(fs::metadata(p.path().join("bomb.tar.gz")).unwrap().len() < 1 << 20);
    p.write(
        "kiln.toml",
        "[project]\nname = \"bomb\"\nimport_limit = \"8M\"\n[images.base]\nfrom = { rootfs = \"bomb.tar.gz\" }\n",
    );
    let run = p.kiln(&["image", "build", "base"]).expect(1);
    assert!(
        run.stderr.contains(
            "bomb.tar.gz: it expands past the import limit of 8 MiB (`import_limit` in kiln.toml)"
        ),
        "{}",
        run.stderr
    );
    for dir in ["tmp", "bases", "roots", "oci/blobs/sha256"] {
        assert!(
            entries(&p.store().join(dir)).is_empty(),
            "{dir}: {:?}",
            entries(&p.store().join(dir))
        );
    }
    // Raised per image, the same tarball imports.
    p.write(
        "kiln.toml",
        "[project]\nname = \"bomb\"\nimport_limit = \"8M\"\n[images.base]\nfrom = { rootfs = \"bomb.tar.gz\" }\nimport_limit = \"65M\"\n",
    );
    p.kiln(&["image", "build", "base"]).ok();
}

/// The OCI config of an image's current version.
fn config_of(p: &Project, image: &str) -> serde_json::Value {
    let rec: serde_json::Value = serde_json::from_slice(
        &fs::read(p.store().join(format!("images/{image}/1.json"))).unwrap(),
    )
    .unwrap();
    let hex = rec["config"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    serde_json::from_slice(&fs::read(p.store().join("oci/blobs/sha256").join(hex)).unwrap())
        .unwrap()
}

#[test]
fn the_image_user_is_resolved_in_the_image_and_tests_run_as_it() {
    let p = project(
        |root| {
            fs::write(
                root.join("etc/passwd"),
                "root:x:0:0:root:/root:/bin/sh\napp:x:1234:2345:app:/home/app:/bin/sh\n",
            )
            .unwrap();
            fs::write(
                root.join("etc/group"),
                "root:x:0:\napp:x:2345:\nextra:x:3456:app\n",
            )
            .unwrap();
        },
        r#"[images.app]
from = "base"
user = "app"
test = [["/bin/sh", "-c", "[ $(id -u) = 1234 ] && [ $(id -g) = 2345 ] && id -G | grep -qw 3456 && [ \"$HOME\" = /home/app ] && ! grep -q '^CapEff:.*[1-9a-f]' /proc/self/status"]]
[images.child]
from = "app"
test = [["/bin/sh", "-c", "[ $(id -u) = 1234 ]"]]
[images.bad]
from = "base"
user = "nginx"
"#,
    );
    p.script("app", "10_as_root.sh", "[ $(id -u) = 0 ]");
    p.kiln(&["image", "build", "app", "child"]).ok();
    let cfg = config_of(&p, "app");
    assert_eq!(cfg["config"]["User"], "1234:2345", "{cfg}");
    assert!(
        cfg["config"]["Env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == "HOME=/home/app"),
        "{cfg}"
    );
    // A child image runs as its parent's user, as with Docker's USER.
    assert_eq!(config_of(&p, "child")["config"]["User"], "1234:2345");
    let run = p.kiln(&["image", "build", "bad"]).expect(1);
    assert!(
        run.stderr
            .contains("image `bad` cannot run as user `nginx`")
            && run
                .stderr
                .contains("user `nginx` is not defined in the image's /etc/passwd"),
        "{}",
        run.stderr
    );
}

/// Flips one byte in the middle of a blob.
fn corrupt(p: &Project, digest: &str) -> PathBuf {
    let path = p
        .store()
        .join("oci/blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    let mut bytes = fs::read(&path).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x55;
    fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn a_no_cache_build_and_verify_repair_rewrite_corrupt_blobs() {
    let p = project(
        |_| {},
        "[images.app]\nfrom = \"base\"\nentrypoint = [\"/bin/sh\"]\n",
    );
    p.write("images/app/files/srv/index.html", "hello\n");
    p.script(
        "app",
        "10_setup.sh",
        "mkdir -p /opt/app\necho built > /opt/app/x",
    );
    p.kiln(&["image", "build", "app"]).ok();
    let show = p.kiln(&["image", "show", "app", "--json"]).ok().json();
    let layers: Vec<String> = show["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(layers.len(), 3, "import + base + app");

    // Its own layer and the imported base's layer, one byte each.
    corrupt(&p, &layers[2]);
    corrupt(&p, &layers[0]);
    let bad = p
        .kiln(&["image", "verify", "app", "--json"])
        .expect(2)
        .json();
    assert_eq!(bad["corrupt_blobs"].as_array().unwrap().len(), 2, "{bad}");
    p.kiln(&["image", "build", "--no-cache", "app"]).ok();
    p.kiln(&["image", "verify", "app"]).ok();
    p.kiln(&["image", "verify", "base"]).ok();

    // verify --repair does the same from what is at hand, without a build.
    corrupt(&p, &layers[1]);
    corrupt(&p, &layers[2]);
    corrupt(&p, show["digest"].as_str().unwrap());
    let config: String = serde_json::from_slice::<serde_json::Value>(
        &fs::read(p.store().join("images/app/2.json")).unwrap(),
    )
    .unwrap()["config"]
        .as_str()
        .unwrap()
        .into();
    corrupt(&p, &config);
    p.kiln(&["image", "verify", "app"]).expect(2);
    let run = p.kiln(&["image", "verify", "--repair", "app"]).ok();
    assert_eq!(
        run.stderr.matches("repaired blob").count(),
        4,
        "{}",
        run.stderr
    );
    p.kiln(&["image", "verify", "app"]).ok();
}
