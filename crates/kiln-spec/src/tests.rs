use super::*;

const GOOD: &str = r#"
[project]
name = "shop"

[images.base]
from = "scratch"

[images.app]
from = "base"
entrypoint = ["/app/server", "--port", "8080"]
env = { PORT = "8080" }
test = [["/app/server", "--self-test"]]
health = { http = "/healthz", port = 8080 }

[env.staging]
provider = "local"

[env.staging.roles.db]
image = "base"
volumes = { data = "/var/lib/db" }
cold_only = true

[env.staging.roles.app]
image = "app"
servers = 3
size = { cpus = 0.5, memory = "256M" }
ports = [8080]
depends_on = ["db"]
strategy = "rolling"
balancer = { listen = "127.0.0.1:8000", port = 8080 }
ttl = "28d"
drift = "replace"

[env.production]
inherit = "staging"
approvals = 1

[env.production.roles.app]
servers = 5
"#;

fn parse_str(text: &str) -> Result<Project, SpecError> {
    let dir = tempfile::tempdir().unwrap();
    parse(text, Path::new("kiln.toml"), dir.path())
}

/// Asserts that `text` fails with exactly `expected` (file:line:column: message).
fn check_err(text: &str, expected: &str) {
    match parse_str(text) {
        Ok(_) => panic!("expected error {expected:?}, parsed fine"),
        Err(e) => assert_eq!(e.to_string(), expected),
    }
}

#[test]
fn parses_the_design_example() {
    let p = parse_str(GOOD).unwrap();
    assert_eq!(p.name, "shop");
    assert_eq!(p.build_order(), vec!["base", "app"]);
    assert_eq!(p.lineage("app"), vec!["base", "app"]);
    let app = &p.images["app"];
    assert_eq!(app.from, ImageSource::Image("base".into()));
    assert_eq!(
        app.health,
        Some(HealthCheck::Http {
            path: "/healthz".into(),
            port: 8080
        })
    );
    let staging = &p.envs["staging"];
    let role = &staging.roles["app"];
    assert_eq!(role.servers, 3);
    assert_eq!(role.size.memory_bytes, 256 << 20);
    assert_eq!(role.ttl_secs, Some(28 * 86_400));
    assert_eq!(role.drift, DriftPolicy::Replace);
    assert_eq!(role.depends_on, vec!["db"]);
    assert_eq!(
        staging.roles["db"].volumes,
        vec![Volume {
            name: "data".into(),
            path: "/var/lib/db".into()
        }]
    );
    // production inherits staging and overrides one key of one role.
    let prod = &p.envs["production"];
    assert_eq!(prod.approvals, 1);
    assert_eq!(prod.roles["app"].servers, 5);
    assert_eq!(prod.roles["app"].image, "app");
    assert_eq!(prod.roles["app"].balancer, role.balancer);
    assert!(prod.roles["db"].cold_only);
}

#[test]
fn unknown_key_points_at_it() {
    check_err("[project]\nname = \"x\"\n\n[images.a]\nfrom = \"scratch\"\nentrypont = [\"/x\"]\n",
        "kiln.toml:6:1: unknown field `entrypont`, expected one of `from`, `entrypoint`, `cmd`, `env`, `workdir`, `ports`, `health`, `test`, `labels`, `mtime`, `network`, `user`, `limits`, `timeout`, `import_limit`, `scan`, `forbid`, `forbid_packages`, `setuid`");
}

#[test]
fn wrong_type_points_at_value() {
    check_err(
        "[project]\nname = \"x\"\n[images.a]\nfrom = \"scratch\"\nports = \"8080\"\n",
        "kiln.toml:5:9: invalid type: string \"8080\", expected a sequence",
    );
}

#[test]
fn missing_parent_is_named() {
    check_err("[project]\nname = \"x\"\n[images.app]\nfrom = \"bsae\"\n",
        "kiln.toml:4:8: image `app` is built from unknown image `bsae`; expected \"scratch\" or one of: app");
}

#[test]
fn image_cycle_is_refused() {
    check_err(
        "[project]\nname = \"x\"\n[images.a]\nfrom = \"b\"\n[images.b]\nfrom = \"a\"\n",
        "kiln.toml:4:8: image `a` is built from itself through a cycle of `from`",
    );
}

#[test]
fn missing_rootfs_file_is_named() {
    let err =
        parse_str("[project]\nname = \"x\"\n[images.a]\nfrom = { rootfs = \"nope.tar.gz\" }\n")
            .unwrap_err();
    let msg = err.to_string();
    assert!(msg.starts_with("kiln.toml:4:8: rootfs tarball `"), "{msg}");
    assert!(msg.ends_with("nope.tar.gz` does not exist"), "{msg}");
}

#[test]
fn bad_from_table() {
    check_err("[project]\nname = \"x\"\n[images.a]\nfrom = { rootfs = \"a.tar\", debootstrap = \"bookworm\" }\n",
        "kiln.toml:4:8: `from` table names 2 sources; expected \"scratch\", an image name, or a table with one of `rootfs`, `oci`, `debootstrap`");
}

#[test]
fn toml_syntax_error_is_located() {
    let err = parse_str("[project]\nname = \"x\n").unwrap_err();
    assert_eq!(err.location(), Some((2, 10)), "{err}");
}

#[test]
fn role_with_unknown_dependency() {
    check_err("[project]\nname = \"x\"\n[images.a]\nfrom = \"scratch\"\n[env.s.roles.r]\nimage = \"a\"\ndepends_on = [\"db\"]\n",
        "kiln.toml:7:15: role `r` depends on unknown role `db`");
}

#[test]
fn role_dependency_cycle() {
    let text = "[project]\nname = \"x\"\n[images.a]\nfrom = \"scratch\"\n[env.s.roles.r]\nimage = \"a\"\ndepends_on = [\"q\"]\n[env.s.roles.q]\nimage = \"a\"\ndepends_on = [\"r\"]\n";
    let err = parse_str(text).unwrap_err().to_string();
    assert!(
        err.contains("depends on itself through `depends_on`"),
        "{err}"
    );
}

#[test]
fn bad_duration_and_policy() {
    check_err("[project]\nname = \"x\"\n[images.a]\nfrom = \"scratch\"\n[env.s.roles.r]\nimage = \"a\"\nttl = \"28 days\"\n",
        "kiln.toml:7:7: `28 days` is not a duration; expected a number with a unit: ms, s, m, h, d or w (like \"28d\")");
    check_err("[project]\nname = \"x\"\n[images.a]\nfrom = \"scratch\"\n[env.s.roles.r]\nimage = \"a\"\ndrift = \"ignore\"\n",
        "kiln.toml:7:9: unknown drift policy `ignore`; expected \"alarm\", \"replace\" or \"kill\"");
}

#[test]
fn inherit_cycle_and_unknown() {
    check_err(
        "[project]\nname = \"x\"\n[env.a]\ninherit = \"b\"\n",
        "kiln.toml:4:11: environment `a` inherits unknown environment `b`",
    );
    let err =
        parse_str("[project]\nname = \"x\"\n[env.a]\ninherit = \"b\"\n[env.b]\ninherit = \"a\"\n")
            .unwrap_err()
            .to_string();
    assert!(err.contains("inherits itself through a cycle"), "{err}");
}

#[test]
fn durations_and_sizes() {
    assert_eq!(parse_duration("1h30m").unwrap().as_secs(), 5400);
    assert_eq!(parse_duration("500ms").unwrap().as_millis(), 500);
    assert_eq!(parse_duration("1w").unwrap().as_secs(), 604_800);
    assert!(parse_duration("").is_err());
    assert!(parse_duration("5").is_err());
    assert_eq!(format_duration(28 * 86_400), "28d");
    assert_eq!(format_duration(5400), "1h30m");
    assert_eq!(parse_size("256M").unwrap(), 256 << 20);
    assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
    assert!(parse_size("lots").is_err());
}

/// GOOD with its balancer line (line 30) replaced by `balancer = { ... }`.
fn with_balancer(fields: &str) -> String {
    GOOD.replace(
        r#"balancer = { listen = "127.0.0.1:8000", port = 8080 }"#,
        &format!("balancer = {{ {fields} }}"),
    )
}

/// The error expected at the first `needle` of the balancer line.
fn balancer_err(fields: &str, needle: &str, message: &str) {
    let line = format!("balancer = {{ {fields} }}");
    let column = line.find(needle).expect("needle on the line") + 1;
    check_err(
        &with_balancer(fields),
        &format!("kiln.toml:30:{column}: {message}"),
    );
}

#[test]
fn balancer_mode_defaults_to_http_for_http_checks_and_tcp_otherwise() {
    let p = parse_str(GOOD).unwrap();
    let b = p.envs["staging"].roles["app"].balancer.clone().unwrap();
    assert_eq!(
        (b.mode, b.algorithm, b.tls, b.admin),
        (
            BalancerMode::Http,
            BalancerAlgorithm::RoundRobin,
            None,
            None
        )
    );
    let tcp = GOOD.replace(
        "depends_on = [\"db\"]\n",
        "depends_on = [\"db\"]\nhealth = { tcp = 8080 }\n",
    );
    let p = parse_str(&tcp).unwrap();
    let b = p.envs["staging"].roles["app"].balancer.clone().unwrap();
    assert_eq!(b.mode, BalancerMode::Tcp);
    let p = parse_str(&with_balancer(
        r#"listen = "127.0.0.1:8000", mode = "tcp", algorithm = "least_requests", admin = "127.0.0.1:9100""#,
    ))
    .unwrap();
    let b = p.envs["staging"].roles["app"].balancer.clone().unwrap();
    assert_eq!(
        (b.mode, b.algorithm, b.admin.as_deref()),
        (
            BalancerMode::Tcp,
            BalancerAlgorithm::LeastRequests,
            Some("127.0.0.1:9100")
        )
    );
}

#[test]
fn balancer_tls_files_resolve_against_the_project() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("tls")).unwrap();
    std::fs::write(dir.path().join("tls/cert.pem"), "c").unwrap();
    std::fs::write(dir.path().join("tls/key.pem"), "k").unwrap();
    let text = with_balancer(
        r#"listen = "127.0.0.1:8443", tls = { cert = "tls/cert.pem", key = "tls/key.pem" }"#,
    );
    let p = parse(&text, Path::new("kiln.toml"), dir.path()).unwrap();
    let b = p.envs["staging"].roles["app"].balancer.clone().unwrap();
    assert_eq!(
        b.tls,
        Some(BalancerTls::Files {
            cert: dir.path().join("tls/cert.pem").display().to_string(),
            key: dir.path().join("tls/key.pem").display().to_string(),
        })
    );
}

#[test]
fn balancer_acme_parses_with_defaults() {
    let p = parse_str(&with_balancer(
        r#"listen = "0.0.0.0:443", tls = { acme = { directory = "https://acme.test/dir", email = "ops@shop.test", domains = ["Shop.test", "www.shop.test"] } }"#,
    ))
    .unwrap();
    let b = p.envs["staging"].roles["app"].balancer.clone().unwrap();
    assert_eq!(
        b.tls,
        Some(BalancerTls::Acme {
            directory: "https://acme.test/dir".into(),
            email: "ops@shop.test".into(),
            domains: vec!["shop.test".into(), "www.shop.test".into()],
            ca: None,
            renew_before_secs: 30 * 86_400,
        })
    );
}

#[test]
fn bad_balancer_keys_point_at_the_value() {
    balancer_err(
        r#"listen = "127.0.0.1:8000", mode = "udp""#,
        "\"udp\"",
        "unknown balancer mode `udp`; expected \"http\" or \"tcp\"",
    );
    balancer_err(
        r#"listen = "127.0.0.1:8000", algorithm = "random""#,
        "\"random\"",
        "unknown balancer algorithm `random`; expected \"round_robin\" or \"least_requests\"",
    );
    balancer_err(
        r#"listen = "127.0.0.1:8000", admin = "localhost""#,
        "\"localhost\"",
        "balancer admin `localhost` is not an address; expected \"IP:PORT\"",
    );
    balancer_err(
        r#"listen = "127.0.0.1:8000", admin = "127.0.0.1:8000""#,
        "\"127.0.0.1:8000\" }",
        "balancer admin must not be its listen address",
    );
    balancer_err(
        r#"listen = "127.0.0.1:8000", tls = { cert = "c.pem" }"#,
        "{ cert",
        "balancer tls has a `cert` but no `key`",
    );
    balancer_err(
        r#"listen = "127.0.0.1:8000", tls = { cert = "c.pem", key = "k.pem" }"#,
        "\"c.pem\"",
        "balancer tls cert `c.pem` does not exist",
    );
    balancer_err(
        r#"listen = "127.0.0.1:8000", tls = {}"#,
        "{}",
        "balancer tls is empty; expected `cert` and `key`, or `acme`",
    );
    balancer_err(
        r#"listen = "127.0.0.1:8000", tls = { key = "k.pem", acme = { directory = "https://a.test/dir", email = "a@b", domains = ["a.test"] } }"#,
        "{ key",
        "balancer tls has both certificate files and `acme`; choose one",
    );
    balancer_err(
        r#"listen = "127.0.0.1:8000", tls = { acme = { directory = "http://a.test/dir", email = "a@b", domains = ["a.test"] } }"#,
        "\"http://",
        "acme directory `http://a.test/dir` is not an https:// URL",
    );
    balancer_err(
        r#"listen = "127.0.0.1:8000", tls = { acme = { directory = "https://a.test/dir", email = "ops", domains = ["a.test"] } }"#,
        "\"ops\"",
        "acme email `ops` is not an email address",
    );
    balancer_err(
        r#"listen = "127.0.0.1:8000", tls = { acme = { directory = "https://a.test/dir", email = "a@b", domains = [] } }"#,
        "[]",
        "acme domains is empty; expected the names to certify",
    );
    balancer_err(
        r#"listen = "127.0.0.1:8000", tls = { acme = { directory = "https://a.test/dir", email = "a@b", domains = ["a.test", "bad_name!"] } }"#,
        "\"bad_name!\"",
        "acme domain `bad_name!` is not a DNS name",
    );
    balancer_err(
        r#"listen = "127.0.0.1:8000", tls = { acme = { directory = "https://a.test/dir", email = "a@b", domains = ["a.test"], renew_before = "soon" } }"#,
        "\"soon\"",
        &parse_duration("soon").unwrap_err().to_string(),
    );
}

const ROLE: &str =
    "[project]\nname = \"x\"\n[images.a]\nfrom = \"scratch\"\n[env.s.roles.r]\nimage = \"a\"\n";

#[test]
fn capabilities_default_to_dockers_and_take_drop_and_add() {
    let p = parse_str(ROLE).unwrap();
    assert_eq!(
        p.envs["s"].roles["r"].capabilities,
        Capability::docker_default()
    );
    let p = parse_str(&format!(
        "{ROLE}capabilities = {{ drop = [\"net_raw\", \"CAP_MKNOD\"], add = [\"SYS_PTRACE\"] }}\n"
    ))
    .unwrap();
    let caps = &p.envs["s"].roles["r"].capabilities;
    assert!(!caps.contains(&Capability::NetRaw) && !caps.contains(&Capability::Mknod));
    assert!(caps.contains(&Capability::SysPtrace) && caps.contains(&Capability::Chown));
    assert_eq!(caps.len(), 13);
    let p = parse_str(&format!(
        "{ROLE}capabilities = {{ drop = [\"ALL\"], add = [\"NET_BIND_SERVICE\"] }}\n"
    ))
    .unwrap();
    assert_eq!(
        p.envs["s"].roles["r"].capabilities,
        BTreeSet::from([Capability::NetBindService])
    );
    let p = parse_str(&format!(
        "{ROLE}capabilities = {{ add = [\"all\"], drop = [\"SYS_ADMIN\"] }}\n"
    ))
    .unwrap();
    assert_eq!(p.envs["s"].roles["r"].capabilities.len(), 40);
}

#[test]
fn unknown_capability_is_a_located_error() {
    check_err(
        &format!("{ROLE}capabilities = {{ drop = [\"NET_RAW\", \"NET_RAWR\"] }}\n"),
        "kiln.toml:7:37: unknown capability `NET_RAWR`; expected a name from capabilities(7) such as \"NET_RAW\" or \"CAP_SYS_ADMIN\"",
    );
    check_err(
        &format!("{ROLE}capabilities = {{ add = [\"KILL\"], drop = [\"kill\"] }}\n"),
        "kiln.toml:7:25: capability KILL is both dropped and added",
    );
    check_err(
        &format!("{ROLE}capabilities = {{ keep = [\"KILL\"] }}\n"),
        "kiln.toml:7:18: unknown field `keep`, expected `drop` or `add`",
    );
}

#[test]
fn capabilities_are_inherited_with_the_role() {
    let p = parse_str(&format!(
        "{ROLE}capabilities = {{ drop = [\"NET_RAW\"] }}\n[env.t]\ninherit = \"s\"\n"
    ))
    .unwrap();
    assert!(!p.envs["t"].roles["r"]
        .capabilities
        .contains(&Capability::NetRaw));
}

const IMAGE: &str = "[project]\nname = \"x\"\n[images.a]\nfrom = \"scratch\"\n";

#[test]
fn image_user_limits_timeouts_and_import_limit() {
    let p = parse_str(IMAGE).unwrap();
    let a = &p.images["a"];
    assert_eq!(a.user, None);
    assert_eq!(a.build_limits, BuildLimits::default());
    assert_eq!(a.import_limit_bytes, DEFAULT_IMPORT_LIMIT);
    let p = parse_str(&format!(
        "{IMAGE}user = \"postgres\"\nlimits = {{ pids = 64, memory = \"512M\" }}\ntimeout = {{ script = \"1h\", test = \"10s\" }}\n"
    ))
    .unwrap();
    let a = &p.images["a"];
    assert_eq!(
        a.user.as_ref().map(|u| u.to_string()).as_deref(),
        Some("postgres")
    );
    assert_eq!(
        a.build_limits,
        BuildLimits {
            pids: 64,
            memory_bytes: 512 << 20,
            script_timeout_secs: 3600,
            test_timeout_secs: 10
        }
    );
    let p = parse_str(&format!("{IMAGE}timeout = \"2m\"\nuser = \"1000:100\"\n")).unwrap();
    assert_eq!(p.images["a"].build_limits.script_timeout_secs, 120);
    assert_eq!(p.images["a"].build_limits.test_timeout_secs, 120);
    // The project's import limit is every image's default; an image may set its own.
    let text = "[project]\nname = \"x\"\nimport_limit = \"1G\"\n[images.a]\nfrom = \"scratch\"\n[images.b]\nfrom = \"scratch\"\nimport_limit = \"2M\"\n";
    let p = parse_str(text).unwrap();
    assert_eq!(p.images["a"].import_limit_bytes, 1 << 30);
    assert_eq!(p.images["b"].import_limit_bytes, 2 << 20);
}

#[test]
fn bad_user_limits_and_timeouts_are_located() {
    check_err(
        &format!("{IMAGE}user = \"no body\"\n"),
        "kiln.toml:5:8: bad `user`: `no body` is not a user or group name; expected letters, digits, `_`, `-` or `.` (at most 32), or a number; expected \"NAME\", \"UID\", \"NAME:GROUP\" or \"UID:GID\"",
    );
    check_err(
        &format!("{IMAGE}limits = {{ pids = 0 }}\n"),
        "kiln.toml:5:10: limits.pids = 0 is out of range; expected 1 to 4194304",
    );
    check_err(
        &format!("{IMAGE}limits = {{ memory = \"1K\" }}\n"),
        "kiln.toml:5:10: limits.memory = \"1K\" is out of range; expected at least 4M",
    );
    check_err(
        &format!("{IMAGE}limits = {{ memory = \"17179869184G\" }}\n"),
        "kiln.toml:5:10: `17179869184G` is larger than the largest size accepted (1 PiB)",
    );
    check_err(
        &format!("{IMAGE}timeout = \"0s\"\n"),
        "kiln.toml:5:11: timeout `0s` is shorter than a second",
    );
    check_err(
        &format!("{IMAGE}timeout = {{ build = \"1m\" }}\n"),
        "kiln.toml:5:11: bad `timeout` table: unknown field `build`, expected `script` or `test`; expected a duration like \"30m\" or { script = \"30m\", test = \"5m\" }",
    );
    check_err(
        &format!("{IMAGE}import_limit = \"0\"\n"),
        "kiln.toml:5:16: import_limit must be more than 0 bytes",
    );
}

const SIGNER: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@ops";

const RECIPIENT: &str = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";

#[test]
fn parses_supply_chain_keys() {
    let text = format!(
        r#"
[project]
name = "shop"
vulnerabilities = {{ osv = "osv/debian-12.zip" }}
scan = {{ fail_on = "critical" }}

[images.base]
from = "scratch"
forbid = ["/usr/bin/ssh*", "/bin/bash"]
forbid_packages = ["openssh-server", "wget"]
setuid = "deny"

[images.app]
from = "base"
scan = {{ fail_on = "medium", unknown = "low", ignore_unfixed = true, ignore = [{{ id = "CVE-2024-1", until = "2027-03-01", reason = "not reachable" }}, {{ id = "DSA-1-1", reason = "accepted" }}] }}

[env.staging]
secrets = {{ recipients = ["{RECIPIENT}"] }}
trust = {{ signers = ["{SIGNER}"] }}

[env.staging.roles.app]
image = "app"
secrets = ["db_password", "api.key"]

[env.production]
inherit = "staging"
"#
    );
    let dir = tempfile::tempdir().unwrap();
    let p = parse(&text, Path::new("kiln.toml"), dir.path()).unwrap();
    assert_eq!(
        p.vulnerabilities,
        Some(AdvisorySource::Path(dir.path().join("osv/debian-12.zip")))
    );
    let base = &p.images["base"];
    assert_eq!(
        base.scan.as_ref().unwrap().fail_on,
        Severity::Critical,
        "project default"
    );
    assert_eq!(base.hardening.forbid, vec!["/usr/bin/ssh*", "/bin/bash"]);
    assert_eq!(
        base.hardening.forbid_packages,
        vec!["openssh-server", "wget"]
    );
    assert_eq!(base.hardening.setuid, SetuidPolicy::Deny);
    let app = p.images["app"].scan.clone().unwrap();
    assert_eq!(app.fail_on, Severity::Medium);
    assert_eq!(app.unknown, Severity::Low);
    assert!(app.ignore_unfixed);
    assert_eq!(
        app.ignore,
        vec![
            ScanIgnore {
                id: "CVE-2024-1".into(),
                until: Some("2027-03-01".into()),
                reason: "not reachable".into()
            },
            ScanIgnore {
                id: "DSA-1-1".into(),
                until: None,
                reason: "accepted".into()
            }
        ]
    );
    assert_eq!(p.images["app"].hardening, Hardening::default());
    for env in ["staging", "production"] {
        let e = &p.envs[env];
        assert_eq!(e.secrets.as_ref().unwrap().recipients, vec![RECIPIENT]);
        assert_eq!(e.trust.as_ref().unwrap().signers, vec![SIGNER]);
        assert_eq!(e.roles["app"].secrets, vec!["db_password", "api.key"]);
    }
    // Without the keys, nothing changes.
    let plain = parse_str(GOOD).unwrap();
    assert_eq!(plain.vulnerabilities, None);
    assert!(plain.images["app"].scan.is_none());
    assert!(plain.envs["staging"].trust.is_none());
    assert!(plain.envs["staging"].roles["app"].secrets.is_empty());
}

#[test]
fn url_advisories_are_kept_as_urls() {
    let p = parse_str("[project]\nname = \"x\"\nvulnerabilities = { osv = \"https://example.org/Debian/all.zip\" }\n").unwrap();
    assert_eq!(
        p.vulnerabilities,
        Some(AdvisorySource::Url(
            "https://example.org/Debian/all.zip".into()
        ))
    );
    check_err(
        "[project]\nname = \"x\"\nvulnerabilities = { osv = \"ftp://h/x.zip\" }\n",
        "kiln.toml:3:19: `vulnerabilities.osv` URL `ftp://h/x.zip` is not http or https",
    );
}

#[test]
fn bad_supply_chain_keys_point_at_them() {
    let head = "[project]\nname = \"x\"\nvulnerabilities = { osv = \"o.zip\" }\n[images.a]\nfrom = \"scratch\"\n";
    check_err(
        &format!("{head}scan = {{ fail_on = \"severe\" }}\n"),
        "kiln.toml:6:8: scan.fail_on `severe` is not a severity; expected \"low\", \"medium\", \"high\" or \"critical\"",
    );
    check_err(
        &format!("{head}scan = {{ ignore = [{{ id = \"CVE-1\", until = \"2027-13-01\", reason = \"r\" }}] }}\n"),
        "kiln.toml:6:8: scan.ignore `CVE-1`: until `2027-13-01` is not a date; expected \"YYYY-MM-DD\"",
    );
    check_err(
        &format!("{head}scan = {{ ignore = [{{ id = \"CVE-1\", reason = \" \" }}] }}\n"),
        "kiln.toml:6:8: scan.ignore entry `CVE-1` needs a `reason`",
    );
    check_err(
        &format!("{head}forbid = [\"usr/bin/wget\"]\n"),
        "kiln.toml:6:11: forbid pattern `usr/bin/wget` must be an absolute path glob like \"/usr/bin/ssh*\"",
    );
    check_err(
        &format!("{head}forbid = [\"/usr/bin/[ab\"]\n"),
        "kiln.toml:6:11: forbid pattern `/usr/bin/[ab`: unclosed character class; missing ']'",
    );
    check_err(
        &format!("{head}forbid_packages = [\"Open SSH\"]\n"),
        "kiln.toml:6:20: `Open SSH` is not a Debian package name",
    );
    check_err(
        &format!("{head}setuid = \"allow\"\n"),
        "kiln.toml:6:10: unknown setuid policy `allow`; expected \"deny\" or \"report\"",
    );
    check_err(
        "[project]\nname = \"x\"\n[images.a]\nfrom = \"scratch\"\nscan = { fail_on = \"high\" }\n",
        "kiln.toml:5:8: image `a` has a `scan` gate but the project names no advisories; add `vulnerabilities = { osv = \"PATH|URL\" }` to [project]",
    );
}

#[test]
fn bad_secrets_and_signers_point_at_them() {
    let head = "[project]\nname = \"x\"\n[images.a]\nfrom = \"scratch\"\n[env.s]\n";
    check_err(
        &format!("{head}secrets = {{ recipients = [\"age1nope\"] }}\n"),
        "kiln.toml:6:27: `age1nope` is not an age X25519 recipient; expected \"age1\" and 58 more characters (`age-keygen -y KEYFILE` prints it)",
    );
    check_err(
        &format!("{head}secrets = {{ recipients = [] }}\n"),
        "kiln.toml:6:11: `secrets.recipients` is empty; expected at least one age recipient (\"age1...\")",
    );
    let e = parse_str(&format!(
        "{head}trust = {{ signers = [\"ssh-ed25519 AAAAnotbase64!\"] }}\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("kiln.toml:6:22: signer is not an OpenSSH public key ("),
        "{e}"
    );
    check_err(
        &format!("{head}[env.s.roles.r]\nimage = \"a\"\nsecrets = [\"db\"]\n"),
        "kiln.toml:8:12: role `r` receives secret `db` but environment `s` declares no `secrets = { recipients = [...] }`",
    );
    check_err(
        &format!("{head}secrets = {{ recipients = [\"{RECIPIENT}\"] }}\n[env.s.roles.r]\nimage = \"a\"\nsecrets = [\"../etc/passwd\"]\n"),
        "kiln.toml:9:12: secret name `../etc/passwd` is invalid; expected letters, digits, `_`, `-` or `.`, starting with a letter or digit, at most 64 characters",
    );
}

#[test]
fn staging_runs_locally_and_production_on_a_swarm() {
    let text = r#"
[project]
name = "shop"
[images.app]
from = "scratch"
[env.staging.roles.app]
image = "app"
ports = [8080]
health = { http = "/", port = 8080 }
placement = ["node.labels.zone==a", "node.role != manager"]
balancer = { listen = "0.0.0.0:8000", port = 8080, nodes = ["n1"] }
[env.production]
inherit = "staging"
provider = { swarm = "tcp://10.0.0.5:2376", registry = "http://10.0.0.5:5000/shop", tls = "certs", engines = { n2 = "tcp://10.0.0.6:2376" }, ports = "31000-31999" }
"#;
    let p = parse_str(text).unwrap();
    assert_eq!(p.envs["staging"].provider, ProviderSpec::Local);
    let ProviderSpec::Swarm(s) = &p.envs["production"].provider else {
        panic!("{:?}", p.envs["production"].provider)
    };
    assert_eq!(s.endpoint, "tcp://10.0.0.5:2376");
    assert_eq!(s.registry, "10.0.0.5:5000/shop");
    assert!(s.registry_insecure);
    assert_eq!(s.tls, Some(p.dir.join("certs")));
    assert_eq!(s.engines["n2"], "tcp://10.0.0.6:2376");
    assert_eq!(s.ports, (31000, 31999));
    let app = &p.envs["production"].roles["app"];
    let placement: Vec<String> = app.placement.iter().map(|c| c.to_string()).collect();
    assert_eq!(placement, ["node.labels.zone==a", "node.role!=manager"]);
    assert_eq!(app.balancer.as_ref().unwrap().nodes, ["n1"]);
    // Defaults: TLS registry, the default port range.
    let p = parse_str(
        "[project]\nname = \"x\"\n[env.p]\nprovider = { swarm = \"unix:///run/docker.sock\", registry = \"reg.example:5000/a/b\" }\n",
    )
    .unwrap();
    let ProviderSpec::Swarm(s) = &p.envs["p"].provider else {
        panic!()
    };
    assert!(!s.registry_insecure);
    assert_eq!(s.ports, SWARM_PORTS);
}

#[test]
fn bad_swarm_providers_point_at_them() {
    let head = "[project]\nname = \"x\"\n[images.a]\nfrom = \"scratch\"\n[env.p]\n";
    check_err(
        &format!("{head}provider = \"aws\"\n"),
        "kiln.toml:6:12: environment `p` uses provider `aws`; expected \"local\" or { swarm = \"unix:///var/run/docker.sock\", registry = \"HOST:PORT/PATH\" }",
    );
    check_err(
        &format!("{head}provider = {{ swarm = \"http://h:1\", registry = \"h/a\" }}\n"),
        "kiln.toml:6:12: swarm endpoint `http://h:1` is not an endpoint; expected \"unix:///PATH\" or \"tcp://HOST:PORT\"",
    );
    check_err(
        &format!("{head}provider = {{ swarm = \"unix:///s\" }}\n"),
        "kiln.toml:6:12: the swarm provider of `p` has no `registry`; expected registry = \"HOST[:PORT]/PATH\" (where the nodes pull images from)",
    );
    check_err(
        &format!("{head}provider = {{ swarm = \"unix:///s\", registry = \"h:5000\" }}\n"),
        "kiln.toml:6:12: registry `h:5000` is not a repository; expected \"HOST[:PORT]/PATH\" (\"http://HOST:PORT/PATH\" for a registry without TLS)",
    );
    check_err(
        &format!("{head}provider = {{ swarm = \"unix:///s\", registry = \"h/a\", ports = \"80-90\" }}\n"),
        "kiln.toml:6:12: ports `80-90` is not a range; expected \"FIRST-LAST\" of host ports from 1024 to 65535, e.g. \"30000-32767\"",
    );
    check_err(
        &format!("{head}provider = {{ swarm = \"unix:///s\", registry = \"h/a\", engines = {{ n1 = \"n1:2376\" }} }}\n"),
        "kiln.toml:6:12: engine of node `n1` `n1:2376` is not an endpoint; expected \"unix:///PATH\" or \"tcp://HOST:PORT\"",
    );
    check_err(
        &format!("{head}provider = {{ swarm = \"unix:///s\", registry = \"h/a\", nodes = 3 }}\n"),
        "kiln.toml:6:12: bad `provider` table: unknown field `nodes`, expected one of `swarm`, `registry`, `tls`, `engines`, `ports`; expected \"local\" or { swarm = \"unix:///var/run/docker.sock\", registry = \"HOST:PORT/PATH\" }",
    );
    let swarm = format!("{head}provider = {{ swarm = \"unix:///s\", registry = \"h/a\" }}\n[env.p.roles.r]\nimage = \"a\"\n");
    check_err(
        &format!("{swarm}health = {{ command = [\"/bin/true\"] }}\n"),
        "kiln.toml:9:10: role `r` of `p` has a command health check, which the swarm provider cannot run (it never execs into servers); use an http or tcp check",
    );
    check_err(
        &format!("{swarm}balancer = {{ listen = \"0.0.0.0:80\", port = 8080, tls = {{ cert = \"c\", key = \"k\" }} }}\n"),
        "kiln.toml:9:12: the balancer of role `r` terminates TLS, which the swarm provider does not support yet (its certificate files and ACME state live on kiln's host)",
    );
    check_err(
        &format!("{swarm}placement = [\"zone==a\"]\n"),
        "kiln.toml:9:13: placement constraint `zone==a` names no attribute kiln knows; expected \"node.labels.KEY==VALUE\", \"node.hostname!=NAME\", \"node.role==worker\" or \"node.id==ID\"",
    );
}
