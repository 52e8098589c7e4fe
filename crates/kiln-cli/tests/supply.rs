//! End-to-end tests of the supply chain: SBOMs of a real Debian image with
//! real packages, the OSV vulnerability gate, the hardening policy, SSH
//! signatures with the real `ssh-keygen`, and age secrets that never get
//! into an image. The real `kiln` binary, real sandboxes; root, busybox,
//! debootstrap and openssh-client needed.

mod support;

#[path = "../../kiln-image/tests/schema/cyclonedx.rs"]
mod cyclonedx;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use support::*;

/// Writes `kiln.toml` for the Debian project; `site_scan` is the `scan`
/// value of the `site` image.
fn debian_toml(p: &Project, site_scan: &str) {
    let base = debian::debian_rootfs();
    p.write(
        "kiln.toml",
        &format!(
            r#"
[project]
name = "supply"
vulnerabilities = {{ osv = "osv" }}

[images.base]
from = {{ rootfs = "{}" }}

[images.web]
from = "base"

[images.site]
from = "web"
scan = {site_scan}

[images.locked]
from = "web"
forbid = ["/bin/bash", "/usr/bin/wget", "/usr/bin/ssh*"]

[images.nosuid]
from = "web"
setuid = "deny"
"#,
            base.display()
        ),
    );
}

/// An OSV record in the Debian export's shape.
fn advisory(id: &str, alias: &str, source: &str, fixed: &str, cvss: &str) -> String {
    serde_json::json!({
        "schema_version": "1.6.0",
        "id": id,
        "modified": "2026-11-01T00:00:00Z",
        "published": "2026-10-30T00:00:00Z",
        "aliases": [alias],
        "summary": format!("{source} security update"),
        "details": "A remote attacker can do bad things.",
        "severity": [{ "type": "CVSS_V3", "score": cvss }],
        "affected": [{
            "package": { "ecosystem": "Debian:12", "name": source, "purl": format!("pkg:deb/debian/{source}?arch=source") },
            "ranges": [{ "type": "ECOSYSTEM", "events": [{ "introduced": "0" }, { "fixed": fixed }] }],
            "database_specific": { "source": format!("https://security-tracker.debian.org/tracker/{id}") }
        }],
        "references": [{ "type": "ADVISORY", "url": format!("https://www.debian.org/security/{id}") }]
    })
    .to_string()
}

const CRITICAL: &str = "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H";

#[test]
fn debian_sbom_vulnerability_gate_and_hardening_policy() {
    let p = Project::new();
    // An advisory for a package the image does not have: the gate passes.
    p.write(
        "osv/DSA-9000-1.json",
        &advisory(
            "DSA-9000-1",
            "CVE-2026-90000",
            "no-such-package",
            "1.0-1",
            CRITICAL,
        ),
    );
    debian_toml(&p, r#"{ fail_on = "high" }"#);
    p.script(
        "web",
        "10_nginx.sh",
        "apt-get update -qq\n\
         apt-get install -y -qq --no-install-recommends nginx-light wget >/dev/null\n\
         dpkg-query -W -f='${Version}' nginx-light > /nginx-light.version\n\
         dpkg-query -W -f='${source:Package} ${source:Version}' nginx-light > /nginx.source\n\
         apt-get clean\nrm -rf /var/lib/apt/lists/*",
    );
    p.write("images/site/files/srv/www/index.html", "v1\n");
    p.kiln(&["image", "build", "site"]).ok();
    let web_root = p.root_of("web");
    let installed = fs::read_to_string(web_root.join("nginx-light.version")).unwrap();
    let source = fs::read_to_string(web_root.join("nginx.source")).unwrap();
    let (source_name, source_version) = source.split_once(' ').unwrap();
    assert_eq!(source_name, "nginx");

    // SBOM: nginx-light at the version dpkg-query reports, valid CycloneDX 1.5.
    let bom = p.kiln(&["image", "sbom", "web", "--json"]).ok().json();
    assert_eq!(bom["specVersion"], "1.5");
    let errors = cyclonedx::cyclonedx_1_5_errors(&bom);
    assert!(errors.is_empty(), "{errors:#?}");
    let nginx = bom["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "nginx-light")
        .expect("nginx-light is in the SBOM");
    assert_eq!(nginx["version"].as_str().unwrap(), installed);
    assert!(
        nginx["purl"]
            .as_str()
            .unwrap()
            .starts_with("pkg:deb/debian/nginx-light@"),
        "{nginx}"
    );
    assert!(nginx["purl"].as_str().unwrap().contains("distro=debian-12"));
    let text = p.kiln(&["image", "sbom", "site"]).ok();
    assert!(text.stdout.contains("debian 12"), "{}", text.stdout);
    assert!(text.stdout.contains("nginx-light"), "{}", text.stdout);
    // The SBOM is an OCI artifact whose subject is the image manifest.
    let show = p.kiln(&["image", "show", "web", "--json"]).ok().json();
    let sbom_digest = show["sbom"].as_str().unwrap().trim_start_matches("sha256:");
    let artifact: serde_json::Value = serde_json::from_slice(
        &fs::read(p.store().join("oci/blobs/sha256").join(sbom_digest)).unwrap(),
    )
    .unwrap();
    assert_eq!(artifact["artifactType"], "application/vnd.cyclonedx+json");
    assert_eq!(artifact["subject"]["digest"], show["digest"]);
    // show lists setuid files (passwd is setuid in Debian) and world-writable ones.
    assert!(show["setuid"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["path"] == "/usr/bin/passwd" && f["mode"] == "4755"));
    assert!(show["world_writable"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["path"] == "/tmp"));

    // An advisory for nginx, fixed above the installed source version.
    let fixed = format!("{source_version}.1");
    p.write(
        "osv/DSA-9999-1.json",
        &advisory("DSA-9999-1", "CVE-2026-99999", "nginx", &fixed, CRITICAL),
    );
    p.write("images/site/files/srv/www/index.html", "v2\n");
    let failed = p.kiln(&["image", "build", "site"]).expect(1);
    for needle in [
        "DSA-9999-1",
        "nginx-light",
        installed.as_str(),
        fixed.as_str(),
        "critical",
        "site@1 stays current",
    ] {
        assert!(
            failed.stderr.contains(needle),
            "no `{needle}` in:\n{}",
            failed.stderr
        );
    }
    let list = p.kiln(&["image", "list", "site", "--json"]).ok().json();
    let status: Vec<(u64, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["version"].as_u64().unwrap(),
                i["status"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(status, [(1, "current".into()), (2, "failed".into())]);
    // On demand: exit 2 and the finding.
    let scan = p
        .kiln(&["image", "scan", "site@1", "--json"])
        .expect(2)
        .json();
    let f = scan["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["id"] == "DSA-9999-1" && f["package"] == "nginx-light")
        .expect("the finding");
    assert_eq!(f["installed"].as_str().unwrap(), installed);
    assert_eq!(f["fixed"].as_str().unwrap(), fixed);
    assert_eq!(f["blocking"], true);
    assert_eq!(scan["ecosystem"], "Debian:12");

    // An ignore entry (by alias) until a future day lets it through...
    debian_toml(
        &p,
        r#"{ fail_on = "high", ignore = [{ id = "CVE-2026-99999", until = "2999-12-31", reason = "nginx is not exposed" }] }"#,
    );
    p.write("images/site/files/srv/www/index.html", "v3\n");
    p.kiln(&["image", "build", "site"]).ok();
    assert_eq!(
        p.kiln(&["image", "show", "site", "--json"]).ok().json()["version"],
        3
    );
    // ...one whose day has passed does not.
    debian_toml(
        &p,
        r#"{ fail_on = "high", ignore = [{ id = "CVE-2026-99999", until = "2020-01-01", reason = "expired" }] }"#,
    );
    p.write("images/site/files/srv/www/index.html", "v4\n");
    let failed = p.kiln(&["image", "build", "site"]).expect(1);
    assert!(
        failed
            .stderr
            .contains("CVE-2026-99999 (until 2020-01-01: expired)"),
        "{}",
        failed.stderr
    );
    assert!(
        failed.stderr.contains("site@3 stays current"),
        "{}",
        failed.stderr
    );

    // Hardening: bash and wget are both named; passwd is setuid.
    let locked = p.kiln(&["image", "build", "locked"]).expect(1);
    assert!(
        locked
            .stderr
            .contains("forbidden file /usr/bin/bash (as /bin/bash, matches `/bin/bash`)"),
        "{}",
        locked.stderr
    );
    assert!(
        locked
            .stderr
            .contains("forbidden file /usr/bin/wget (matches `/usr/bin/wget`)"),
        "{}",
        locked.stderr
    );
    assert!(
        locked.stderr.contains("locked has no current version"),
        "{}",
        locked.stderr
    );
    let nosuid = p.kiln(&["image", "build", "nosuid"]).expect(1);
    assert!(
        nosuid
            .stderr
            .contains("setuid/setgid file /usr/bin/passwd (mode 4755"),
        "{}",
        nosuid.stderr
    );
}

/// A busybox project with one image, `app`, and an environment `staging`
/// whose secrets are encrypted to `recipient`.
fn busybox_project(recipient: &str) -> Project {
    let p = Project::new();
    p.busybox_tarball("base.tar.gz");
    p.write(
        "kiln.toml",
        &format!(
            r#"
[project]
name = "secrets"
[images.base]
from = {{ rootfs = "base.tar.gz" }}
[images.app]
from = "base"
[env.staging]
secrets = {{ recipients = ["{recipient}"] }}
[env.staging.roles.app]
image = "app"
secrets = ["db_password"]
"#
        ),
    );
    p.write("images/app/files/srv/index.html", "hello\n");
    p
}

fn run_with_stdin(
    p: &Project,
    args: &[&str],
    env: &[(&str, &str)],
    stdin: &[u8],
) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("-C")
        .arg(p.path())
        .args(args)
        .env_remove("KILN_AGE_IDENTITY")
        .envs(env.iter().copied())
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn secrets_are_encrypted_listed_by_fingerprint_and_never_baked() {
    const VALUE: &str = "hunter2-is-the-db-password";
    let alice = kiln_secrets::Identity::generate();
    let alice_key = alice.to_secret_string().to_string();
    let mallory_key = kiln_secrets::Identity::generate()
        .to_secret_string()
        .to_string();
    let p = busybox_project(&alice.recipients()[0]);

    let (code, out, err) = run_with_stdin(
        &p,
        &["secret", "set", "staging", "db_password"],
        &[],
        format!("{VALUE}\n").as_bytes(),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains(VALUE) && !err.contains(VALUE));
    let file = p.path().join("secrets/staging/db_password.age");
    assert!(fs::read(&file)
        .unwrap()
        .starts_with(b"age-encryption.org/v1"));
    assert!(files_containing(&p.path().join("secrets"), VALUE.as_bytes()).is_empty());
    // The trailing newline of `echo` is not part of the value.
    assert_eq!(
        kiln_secrets::decrypt(p.path(), "staging", "db_password", &alice)
            .unwrap()
            .expose(),
        VALUE.as_bytes()
    );

    // list: names, and fingerprints with the identity; never the value.
    let listed = p
        .kiln_env(
            &["secret", "list", "staging", "--json"],
            &[("KILN_AGE_IDENTITY", &alice_key)],
        )
        .ok();
    assert!(!listed.stdout.contains(VALUE));
    let rows = listed.json();
    assert_eq!(rows[0]["name"], "db_password");
    let fp = rows[0]["fingerprint"].as_str().unwrap().to_string();
    assert!(fp.starts_with("b3k:"), "{fp}");
    let anonymous = run_with_stdin(&p, &["secret", "list", "staging", "--json"], &[], b"");
    assert_eq!(anonymous.0, 0, "{}", anonymous.2);
    assert!(
        anonymous.1.contains("\"fingerprint\": null"),
        "{}",
        anonymous.1
    );
    // A new value, a new fingerprint.
    let (code, _, err) = run_with_stdin(
        &p,
        &["secret", "set", "staging", "db_password"],
        &[],
        format!("{VALUE}-2").as_bytes(),
    );
    assert_eq!(code, 0, "{err}");
    let rows = p
        .kiln_env(
            &["secret", "list", "staging", "--json"],
            &[("KILN_AGE_IDENTITY", &alice_key)],
        )
        .ok()
        .json();
    assert_ne!(rows[0]["fingerprint"].as_str().unwrap(), fp);
    run_with_stdin(
        &p,
        &["secret", "set", "staging", "db_password"],
        &[],
        VALUE.as_bytes(),
    );
    // The wrong identity: a clear error without the value.
    let wrong = p
        .kiln_env(
            &["secret", "list", "staging"],
            &[("KILN_AGE_IDENTITY", &mallory_key)],
        )
        .expect(1);
    assert!(
        wrong.stderr.contains("is not encrypted to this identity"),
        "{}",
        wrong.stderr
    );
    assert!(!wrong.stderr.contains(VALUE) && !wrong.stderr.contains(&mallory_key));

    // A clean image builds; its bake was checked.
    p.kiln_env(
        &["image", "build", "app"],
        &[("KILN_AGE_IDENTITY", &alice_key)],
    )
    .ok();
    // A build script that copies the value into the image fails the bake,
    // naming the file and the secret, and leaves the value nowhere in the store.
    p.script(
        "app",
        "10_leak.sh",
        &format!("mkdir -p /etc/app\necho 'password={VALUE}' > /etc/app/db.conf"),
    );
    let leaked = p
        .kiln_env(
            &["image", "build", "app"],
            &[("KILN_AGE_IDENTITY", &alice_key)],
        )
        .expect(1);
    assert!(
        leaked
            .stderr
            .contains("secret staging/db_password in /etc/app/db.conf"),
        "{}",
        leaked.stderr
    );
    assert!(
        leaked.stderr.contains("app@1 stays current"),
        "{}",
        leaked.stderr
    );
    assert!(!leaked.stderr.contains(VALUE), "{}", leaked.stderr);
    assert_eq!(
        files_containing(&p.store(), VALUE.as_bytes()),
        Vec::<String>::new()
    );
    // Without an identity the check is skipped, loudly.
    let skipped = run_with_stdin(&p, &["image", "build", "app"], &[], b"");
    assert!(
        skipped.2.contains("WARNING: SECRET CHECK SKIPPED: the project has secrets but $KILN_AGE_IDENTITY is not set"),
        "{}",
        skipped.2
    );
}

fn keygen(dir: &Path, name: &str) -> String {
    let st = Command::new("ssh-keygen")
        .args([
            "-t",
            "ed25519",
            "-N",
            "",
            "-q",
            "-C",
            &format!("{name}@ops"),
            "-f",
        ])
        .arg(dir.join(name))
        .status()
        .expect("ssh-keygen (openssh-client)");
    assert!(st.success());
    fs::read_to_string(dir.join(format!("{name}.pub")))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn images_are_signed_in_the_ssh_keygen_format_both_ways() {
    let p = Project::new();
    p.busybox_tarball("base.tar.gz");
    p.write(
        "kiln.toml",
        "[project]\nname = \"signed\"\n[images.base]\nfrom = { rootfs = \"base.tar.gz\" }\n[images.app]\nfrom = \"base\"\n[images.other]\nfrom = \"base\"\nenv = { OTHER = \"1\" }\n",
    );
    p.kiln(&["image", "build", "--all"]).ok();
    let keys = tempfile::tempdir().unwrap();
    let alice = keygen(keys.path(), "alice");
    let bob = keygen(keys.path(), "bob");

    // kiln signs; ssh-keygen verifies over `--payload`.
    let signed = p
        .kiln(&[
            "image",
            "sign",
            "app",
            "--key",
            keys.path().join("alice").to_str().unwrap(),
            "--json",
        ])
        .ok()
        .json();
    let payload = p.kiln(&["image", "sign", "app", "--payload"]).ok().stdout;
    assert!(
        payload.contains(signed["digest"].as_str().unwrap()),
        "{payload}"
    );
    fs::write(
        keys.path().join("app.sig"),
        signed["signature"].as_str().unwrap(),
    )
    .unwrap();
    fs::write(keys.path().join("allowed"), format!("alice@ops {alice}\n")).unwrap();
    let mut verify = Command::new("ssh-keygen")
        .args(["-Y", "verify", "-n", "kiln", "-I", "alice@ops", "-f"])
        .arg(keys.path().join("allowed"))
        .arg("-s")
        .arg(keys.path().join("app.sig"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    verify
        .stdin
        .take()
        .unwrap()
        .write_all(payload.as_bytes())
        .unwrap();
    let out = verify.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // ssh-keygen signs kiln's payload; kiln attaches it.
    fs::write(keys.path().join("payload"), &payload).unwrap();
    let st = Command::new("ssh-keygen")
        .args(["-Y", "sign", "-n", "kiln", "-q", "-f"])
        .arg(keys.path().join("bob"))
        .arg(keys.path().join("payload"))
        .status()
        .unwrap();
    assert!(st.success());
    let bob_sig = keys.path().join("payload.sig");
    let attached = p
        .kiln(&[
            "image",
            "sign",
            "app",
            "--signature",
            bob_sig.to_str().unwrap(),
        ])
        .ok();
    assert!(
        attached.stdout.contains("bob@ops") || attached.stdout.contains("SHA256:"),
        "{}",
        attached.stdout
    );
    let show = p.kiln(&["image", "show", "app", "--json"]).ok().json();
    let signers: Vec<&str> = show["signatures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["fingerprint"].as_str().unwrap())
        .collect();
    assert_eq!(signers.len(), 2, "{show:#}");
    // A signature over app's payload does not sign another image.
    let refused = p
        .kiln(&[
            "image",
            "sign",
            "other",
            "--signature",
            bob_sig.to_str().unwrap(),
        ])
        .expect(1);
    assert!(
        refused.stderr.contains("does not verify over other@1"),
        "{}",
        refused.stderr
    );
    let _ = bob;
}
