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

/// A project with image `a` (lines 3–4) and environment `s` whose role
/// `r` runs it (lines 5–6); `role` is appended from line 7.
fn with_role(role: &str) -> String {
    format!("[project]\nname = \"x\"\n[images.a]\nfrom = \"scratch\"\n[env.s.roles.r]\nimage = \"a\"\n{role}\n")
}

/// A project whose image `a` has `image` appended from line 4.
fn with_image(image: &str) -> String {
    format!("[project]\nname = \"x\"\n[images.a]\n{image}\n")
}

#[test]
fn overflowing_durations_are_refused_everywhere() {
    let big = "18446744073709551615s1s";
    let msg = format!("`{big}` is longer than the longest duration accepted (100 years)");
    check_err(
        &with_role(&format!("ttl = \"{big}\"")),
        &format!("kiln.toml:7:7: {msg}"),
    );
    check_err(
        &with_role(&format!(
            "strategy = {{ kind = \"rolling\", min_healthy = \"{big}\" }}"
        )),
        &format!("kiln.toml:7:46: {msg}"),
    );
    check_err(
        &with_role(&format!(
            "strategy = {{ kind = \"canary\", bake = \"{big}\" }}"
        )),
        &format!("kiln.toml:7:38: {msg}"),
    );
    check_err(
        &with_role(&format!(
            "ports = [80]\nbalancer = {{ listen = \"127.0.0.1:80\", drain_timeout = \"{big}\" }}"
        )),
        &format!("kiln.toml:8:55: {msg}"),
    );
    check_err(
        &format!("[project]\nname = \"x\"\n[env.s]\nquarantine = \"{big}\"\n"),
        &format!("kiln.toml:4:14: {msg}"),
    );
}

#[test]
fn zero_and_fractional_durations_are_refused_where_meaningless() {
    check_err(&with_role("ttl = \"0s\""),
        "kiln.toml:7:7: ttl `0s` is zero; every server would expire as soon as it starts; remove `ttl` to keep servers until they are replaced");
    check_err(
        &with_role("ttl = \"500ms\""),
        "kiln.toml:7:7: ttl `500ms` is not a whole number of seconds; ttl is counted in seconds",
    );
    check_err("[project]\nname = \"x\"\n[env.s]\nttl = \"0s\"\n",
        "kiln.toml:4:7: ttl `0s` is zero; every server would expire as soon as it starts; remove `ttl` to keep servers until they are replaced");
    check_err("[project]\nname = \"x\"\n[env.s]\nquarantine = \"0s\"\n",
        "kiln.toml:4:14: quarantine `0s` is zero; a quarantined server's evidence would be deleted at once; kill without quarantine is `drift = \"replace\"`");
    check_err(&with_role("strategy = { kind = \"canary\", bake = \"1500ms\" }"),
        "kiln.toml:7:38: bake `1500ms` is not a whole number of seconds; bake is counted in seconds");
    check_err(&with_role("health = { tcp = 80 }\nballancer = 1").replace("ballancer = 1", "balancer = { listen = \"127.0.0.1:81\", port = 80, check_interval = \"10ms\" }"),
        "kiln.toml:8:67: check_interval `10ms` is shorter than 100ms; expected \"100ms\" or more, or \"0s\" to turn checks off");
    // Zero is meaningful here: no drain, no warm set, no bake, no checks.
    parse_str(&with_role("health = { tcp = 80 }\nbalancer = { listen = \"127.0.0.1:81\", port = 80, drain_timeout = \"0s\", check_interval = \"0s\" }\nstrategy = { kind = \"blue_green\", rollback_window = \"0s\" }")).unwrap();
    parse_str(&with_role(
        "strategy = { kind = \"canary\", bake = \"0s\" }",
    ))
    .unwrap();
}

#[test]
fn sizes_are_range_checked() {
    check_err(
        &with_role("size = { memory = \"17179869184G\" }"),
        "kiln.toml:7:19: `17179869184G` is larger than the largest size accepted (1 PiB)",
    );
    check_err(
        &with_role("size = { memory = \"0\" }"),
        "kiln.toml:7:19: size.memory `0` is too small; a server needs at least \"4M\"",
    );
    check_err(
        &with_role("size = { memory = \"1K\" }"),
        "kiln.toml:7:19: size.memory `1K` is too small; a server needs at least \"4M\"",
    );
    for (cpus, col) in [
        ("inf", 17),
        ("nan", 17),
        ("1e-9", 17),
        ("0.0", 17),
        ("-1.0", 17),
        ("1025.0", 17),
    ] {
        let shown = cpus.parse::<f64>().unwrap();
        check_err(&with_role(&format!("size = {{ cpus = {cpus} }}")),
            &format!("kiln.toml:7:{col}: size.cpus = {shown} is out of range; expected a number of CPUs from 0.01 to 1024"));
    }
    let p = parse_str(&with_role("size = { cpus = 0.01, memory = \"4M\" }")).unwrap();
    assert_eq!(
        p.envs["s"].roles["r"].size,
        Size {
            cpus: 0.01,
            memory_bytes: 4 << 20
        }
    );
}

#[test]
fn canary_and_rolling_parameters_are_range_checked() {
    for (rate, shown) in [("-1.0", "-1"), ("nan", "NaN"), ("2.0", "2"), ("inf", "inf")] {
        check_err(&with_role(&format!("strategy = {{ kind = \"canary\", max_error_rate = {rate} }}")),
            &format!("kiln.toml:7:48: max_error_rate = {shown} is out of range; expected a fraction from 0 to 1 (like 0.01)"));
    }
    check_err(
        &with_role("strategy = { kind = \"canary\", share = 0 }"),
        "kiln.toml:7:39: share = 0 is out of range; expected a percentage from 1 to 100",
    );
    check_err(
        &with_role("strategy = { kind = \"canary\", share = 101 }"),
        "kiln.toml:7:39: share = 101 is out of range; expected a percentage from 1 to 100",
    );
    check_err(&with_role("strategy = { kind = \"rolling\", max_surge = 0 }"),
        "kiln.toml:7:44: max_surge and max_unavailable are both 0, so no server could ever be replaced; expected at least one of them above 0");
    let p = parse_str(&with_role(
        "strategy = { kind = \"rolling\", max_surge = 0, max_unavailable = 1 }",
    ))
    .unwrap();
    assert!(matches!(
        p.envs["s"].roles["r"].strategy,
        Strategy::Rolling {
            max_surge: 0,
            max_unavailable: 1,
            ..
        }
    ));
}

#[test]
fn replace_share_is_not_clamped() {
    check_err(
        &with_role("replace_share = 0"),
        "kiln.toml:7:17: replace_share = 0 is out of range; expected a percentage from 1 to 100",
    );
    check_err(
        "[project]\nname = \"x\"\n[env.s]\nreplace_share = 101\n",
        "kiln.toml:4:17: replace_share = 101 is out of range; expected a percentage from 1 to 100",
    );
    let p = parse_str(&with_role("replace_share = 100")).unwrap();
    assert_eq!(p.envs["s"].roles["r"].replace_share, 100);
}

#[test]
fn port_zero_is_refused_everywhere() {
    check_err(
        &with_role("ports = [8080, 0]"),
        "kiln.toml:7:16: port 0 is not a port; expected 1 to 65535",
    );
    check_err(
        &with_role("ports = [8080, 8080]"),
        "kiln.toml:7:16: port 8080 is listed twice",
    );
    check_err(
        &with_image("from = \"scratch\"\nports = [0]"),
        "kiln.toml:5:10: port 0 is not a port; expected 1 to 65535",
    );
    check_err(
        &with_role("health = { tcp = 0 }"),
        "kiln.toml:7:18: health check tcp 0 is not a port; expected 1 to 65535",
    );
    check_err(
        &with_image("from = \"scratch\"\nhealth = { http = \"/\", port = 0 }"),
        "kiln.toml:5:31: health check port 0 is not a port; expected 1 to 65535",
    );
    check_err(
        &with_role("balancer = { listen = \"127.0.0.1:8000\", port = 0 }"),
        "kiln.toml:7:48: balancer port 0 is not a port; expected 1 to 65535",
    );
    check_err(
        &with_role("balancer = { listen = \"127.0.0.1:0\", port = 80 }"),
        "kiln.toml:7:23: balancer listen port 0 is not a port; expected 1 to 65535",
    );
}

#[test]
fn balancer_checks_are_range_checked() {
    check_err(
        &with_role(
            "health = { tcp = 80 }\nbalancer = { listen = \"127.0.0.1:81\", port = 80, fall = 0 }",
        ),
        "kiln.toml:8:57: balancer fall = 0 is out of range; expected 1 to 100 consecutive checks",
    );
    check_err(
        &with_role(
            "health = { tcp = 80 }\nbalancer = { listen = \"127.0.0.1:81\", port = 80, rise = 0 }",
        ),
        "kiln.toml:8:57: balancer rise = 0 is out of range; expected 1 to 100 consecutive checks",
    );
}

#[test]
fn servers_must_fit_the_subnet() {
    check_err("[project]\nname = \"x\"\n[images.a]\nfrom = \"scratch\"\n[env.s]\nsubnet = \"10.0.0.0/28\"\n[env.s.roles.r]\nimage = \"a\"\nservers = 14\n",
        "kiln.toml:9:11: role `r` brings environment `s` to 14 servers; its subnet 10.0.0.0/28 holds at most 13");
    // Roles share the subnet; the default is a /24.
    check_err("[project]\nname = \"x\"\n[images.a]\nfrom = \"scratch\"\n[env.s.roles.p]\nimage = \"a\"\nservers = 200\n[env.s.roles.q]\nimage = \"a\"\nservers = 54\n",
        &format!("kiln.toml:10:11: role `q` brings environment `s` to 254 servers; its subnet {} holds at most 253",
            parse_str("[project]\nname = \"x\"\n[env.s]\n").unwrap().envs["s"].subnet));
    // Inherited counts point at where they are written.
    check_err("[project]\nname = \"x\"\n[images.a]\nfrom = \"scratch\"\n[env.s]\nsubnet = \"10.0.0.0/16\"\n[env.s.roles.r]\nimage = \"a\"\nservers = 30000\n[env.t]\ninherit = \"s\"\nsubnet = \"10.1.0.0/24\"\n",
        "kiln.toml:9:11: role `r` brings environment `t` to 30000 servers; its subnet 10.1.0.0/24 holds at most 253");
    // The issue's hang: 70,000 servers on a /8 is refused, and no subnet
    // holds more servers than ids exist.
    check_err("[project]\nname = \"x\"\n[images.a]\nfrom = \"scratch\"\n[env.s]\nsubnet = \"10.0.0.0/8\"\n[env.s.roles.r]\nimage = \"a\"\nservers = 70000\n",
        "kiln.toml:6:10: subnet `10.0.0.0/8`: prefix /8 is out of range; expected /16 to /28");
    check_err("[project]\nname = \"x\"\n[images.a]\nfrom = \"scratch\"\n[env.s]\nsubnet = \"10.0.0.0/16\"\n[env.s.roles.r]\nimage = \"a\"\nservers = 70000\n",
        "kiln.toml:9:11: role `r` declares 70000 servers, more than one role can have (32768: half of its 65,536 server ids, so that every server can be replaced at once)");
    check_err("[project]\nname = \"x\"\n[images.a]\nfrom = \"scratch\"\n[env.s]\nsubnet = \"10.0.0.0/16\"\n[env.s.roles.p]\nimage = \"a\"\nservers = 32768\n[env.s.roles.q]\nimage = \"a\"\nservers = 32766\n",
        "kiln.toml:12:11: role `q` brings environment `s` to 65534 servers; its subnet 10.0.0.0/16 holds at most 65533");
}

#[test]
fn balancer_listen_addresses_are_distinct_and_local() {
    let two = |a: &str, b: &str| {
        format!("[project]\nname = \"x\"\n[images.a]\nfrom = \"scratch\"\n[env.s.roles.p]\nimage = \"a\"\nballancer = {{ listen = \"{a}\", port = 80 }}\n[env.s.roles.q]\nimage = \"a\"\nbalancer = {{ listen = \"{b}\", port = 80 }}\n").replace("ballancer", "balancer")
    };
    check_err(&two("127.0.0.1:8000", "127.0.0.1:8000"),
        "kiln.toml:10:23: balancer listen of role `q` is 127.0.0.1:8000, which the balancer listen of role `p` takes (127.0.0.1:8000)");
    check_err(&two("0.0.0.0:8000", "127.0.0.1:8000"),
        "kiln.toml:10:23: balancer listen of role `q` is 127.0.0.1:8000, which the balancer listen of role `p` takes (0.0.0.0:8000)");
    check_err(&two("127.0.0.2:8000", "[::]:8000"),
        "kiln.toml:10:23: balancer listen of role `q` is [::]:8000, which the balancer listen of role `p` takes (127.0.0.2:8000)");
    parse_str(&two("127.0.0.1:8000", "127.0.0.1:8001")).unwrap();
    parse_str(&two("127.0.0.1:8000", "127.0.0.2:8000")).unwrap();
    // TEST-NET-1 (192.0.2.0/24) is on no interface of any host.
    check_err(&with_role("balancer = { listen = \"192.0.2.7:8000\", port = 80 }"),
        "kiln.toml:7:23: balancer listen address 192.0.2.7 is not an address of this host (no interface has it); expected a local address, 127.0.0.1 or 0.0.0.0");
    // The admin (metrics) listener takes an address too.
    check_err(&two("127.0.0.1:8000", "127.0.0.1:8001\", admin = \"127.0.0.1:8000"),
        "kiln.toml:10:49: balancer admin of role `q` is 127.0.0.1:8000, which the balancer listen of role `p` takes (127.0.0.1:8000)");
    check_err(&with_role("balancer = { listen = \"127.0.0.1:8000\", port = 80, admin = \"192.0.2.7:9100\" }"),
        "kiln.toml:7:60: balancer admin address 192.0.2.7 is not an address of this host (no interface has it); expected a local address, 127.0.0.1 or 0.0.0.0");
    check_err(
        &with_role(
            "balancer = { listen = \"127.0.0.1:8000\", port = 80, admin = \"127.0.0.1:0\" }",
        ),
        "kiln.toml:7:60: balancer admin port 0 is not a port; expected 1 to 65535",
    );
    // The environment's own gateway is there once the environment is up.
    parse_str("[project]\nname = \"x\"\n[images.a]\nfrom = \"scratch\"\n[env.s]\nsubnet = \"10.99.0.0/24\"\n[env.s.roles.r]\nimage = \"a\"\nbalancer = { listen = \"10.99.0.1:80\", port = 80 }\n").unwrap();
}

#[test]
fn environment_variables_can_be_passed_to_execve() {
    check_err(
        &with_role("env = { \"\" = \"x\" }"),
        "kiln.toml:7:9: environment variable has an empty name",
    );
    check_err(
        &with_role("env = { \"A=B\" = \"x\" }"),
        "kiln.toml:7:9: environment variable name `A=B` contains `=`",
    );
    check_err(
        &with_role("env = { \"A\\u0000\" = \"x\" }"),
        "kiln.toml:7:9: environment variable name `A\\0` contains a NUL byte",
    );
    check_err(
        &with_image("from = \"scratch\"\nenv = { A = \"x\\u0000\" }"),
        "kiln.toml:5:9: environment variable `A` has a NUL byte in its value",
    );
    check_err(
        &with_image("from = \"scratch\"\n[images.a.env]\n\"\" = \"x\""),
        "kiln.toml:6:1: environment variable has an empty name",
    );
}

#[test]
fn launch_settings_are_checked() {
    check_err(
        &with_image("from = \"scratch\"\nworkdir = \"app\""),
        "kiln.toml:5:11: workdir `app` is not absolute; expected a path starting with `/`",
    );
    check_err(&with_image("from = \"scratch\"\nentrypoint = []"),
        "kiln.toml:5:14: `entrypoint = []` has no effect (the base image's is kept); remove it, or name the program to run");
    check_err(&with_image("from = \"scratch\"\ncmd = []"),
        "kiln.toml:5:7: `cmd = []` has no effect (the base image's is kept); remove it, or name the program to run");
    check_err(
        &with_image("from = \"scratch\"\nentrypoint = [\"\", \"x\"]"),
        "kiln.toml:5:15: entrypoint names an empty program",
    );
    check_err(
        &with_image("from = \"scratch\"\ncmd = [\"/x\", \"a\\u0000\"]"),
        "kiln.toml:5:14: cmd argument 1 contains a NUL byte",
    );
    check_err(
        &with_image("from = \"scratch\"\ntest = [[\"/x\"], []]"),
        "kiln.toml:5:17: test command is empty; expected a program and its arguments",
    );
    check_err(
        &with_image("from = \"scratch\"\nhealth = { command = [\"\"] }"),
        "kiln.toml:5:23: health command names an empty program",
    );
    check_err(
        &with_image("from = \"scratch\"\nhealth = { http = \"/a b\", port = 80 }"),
        "kiln.toml:5:19: http health path `/a b` contains whitespace or a control character",
    );
    check_err(
        &with_image("from = \"scratch\"\nlabels = { \"\" = \"x\" }"),
        "kiln.toml:5:12: label has an empty name",
    );
    check_err(
        &with_image("from = \"scratch\"\nlabels = { \"a\\nb\" = \"x\" }"),
        "kiln.toml:5:12: label name `a\\nb` contains a control character",
    );
    check_err(&with_image("from = \"scratch\"\nmtime = 9223372036854775807"),
        "kiln.toml:5:9: mtime = 9223372036854775807 is after the year 9999; expected seconds since 1970 up to 253402300799");
    check_err(&with_image("from = { debootstrap = \"bookworm\", mirror = \"--foo\" }"),
        "kiln.toml:4:45: debootstrap mirror `--foo` is not a URL; expected http://, https:// or file:///");
    check_err(&with_image("from = { debootstrap = \"bookworm\", variant = \"huge\" }"),
        "kiln.toml:4:46: debootstrap variant `huge` is unknown; expected \"minbase\", \"buildd\" or \"fakechroot\"");
}

#[test]
fn environment_settings_are_checked() {
    let env = |line: &str| format!("[project]\nname = \"x\"\n[env.s]\n{line}\n");
    check_err(
        &env("approvals = 1000"),
        "kiln.toml:4:13: approvals = 1000 is out of range; expected 0 to 100",
    );
    check_err(&env("alarm = \"\""), "kiln.toml:4:9: alarm is empty");
    check_err(
        &env("pipeline_identities = [\"ci\", \" \"]"),
        "kiln.toml:4:30: pipeline identity is empty",
    );
    check_err(&env("provider = \"aws\""), "kiln.toml:4:12: environment `s` uses provider `aws`; expected \"local\" or { swarm = \"unix:///var/run/docker.sock\", registry = \"HOST:PORT/PATH\" }");
}

#[test]
fn volumes_are_plain_names_on_absolute_paths() {
    for name in ["\"/tmp/x\"", "\"..\"", "\".\"", "\"a/b\"", "\"\""] {
        let shown: String = name.trim_matches('"').into();
        check_err(&with_role(&format!("volumes = {{ {name} = \"/www\" }}")),
            &format!("kiln.toml:7:13: volume name `{shown}` is not a plain name; expected letters, digits, `-`, `_` or `.` (not `.` or `..`), at most 64 characters"));
    }
    check_err(&with_role("volumes = { data = \"www\" }"),
        "kiln.toml:7:20: volume `data` path `www` is not absolute; expected a path starting with `/`");
    check_err(
        &with_role("volumes = { data = \"/srv/../etc\" }"),
        "kiln.toml:7:20: volume `data` path `/srv/../etc` contains `..`",
    );
    check_err(&with_role("volumes = { data = \"//\" }"),
        "kiln.toml:7:20: volume `data` is mounted on `/`, over the whole image; expected a directory such as \"/var/lib/data\"");
    check_err(
        &with_role("volumes = { a = \"/data\", b = \"/data/\" }"),
        "kiln.toml:7:30: volumes `a` and `b` are both mounted on `/data`",
    );
    let p = parse_str(&with_role("volumes = { \"web.data-1_x\" = \"/srv\" }")).unwrap();
    assert_eq!(p.envs["s"].roles["r"].volumes[0].name, "web.data-1_x");
}

#[test]
fn quoted_names_are_located() {
    check_err("[project]\nname = \"x\"\n[images.\"a/b\"]\nfrom = \"scratch\"\n",
        "kiln.toml:3:9: image name `a/b` is invalid; expected lowercase letters, digits, `-` or `_`, starting with a letter, at most 40 characters");
    check_err("[project]\nname = \"x\"\n[env.\"..\"]\n",
        "kiln.toml:3:6: environment name `..` is invalid; expected lowercase letters, digits, `-` or `_`, starting with a letter, at most 40 characters");
    check_err("[project]\nname = \"x\"\n[images.a]\nfrom = \"scratch\"\n[env.s.roles.\"web x\"]\nimage = \"a\"\n",
        "kiln.toml:5:14: role name `web x` is invalid; expected lowercase letters, digits, `-` or `_`, starting with a letter, at most 40 characters");
    // Dotted keys and inline tables too.
    check_err("images.'A'.from = \"scratch\"\n[project]\nname = \"x\"\n",
        "kiln.toml:1:8: image name `A` is invalid; expected lowercase letters, digits, `-` or `_`, starting with a letter, at most 40 characters");
    check_err("[project]\nname = \"x\"\n[env]\ns = { roles = { \"r/1\" = { image = \"a\" } } }\n",
        "kiln.toml:4:17: role name `r/1` is invalid; expected lowercase letters, digits, `-` or `_`, starting with a letter, at most 40 characters");
    // A table implied by a deeper header is named where it first appears.
    check_err(
        "[project]\nname = \"x\"\n[images.a]\nfrom = \"scratch\"\n[env.s.roles.r]\nservers = 1\n",
        "kiln.toml:5:14: role `r` has no `image`",
    );
}

#[test]
fn counts_are_bounded() {
    let mut text = String::from("[project]\nname = \"x\"\n");
    for i in 0..=MAX_ENVS {
        text.push_str(&format!("[env.e{i}]\n"));
    }
    check_err(
        &text,
        "kiln.toml:3:2: 101 environments are more than kiln takes (100)",
    );
}

/// Every file of the fuzz corpus (`fuzz/corpus/spec/`, the seeds and every
/// regression the fuzzer found) parses without a panic: `ok-*` files load,
/// `bad-*` files are refused at a line and column inside them.
#[test]
fn fuzz_corpus_loads_or_is_refused_in_place() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/spec");
    // The fuzz target's project directory: a rootfs tarball and an OCI layout.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("oci")).unwrap();
    std::fs::write(dir.path().join("base.tar"), b"").unwrap();
    std::fs::write(dir.path().join("oci/index.json"), b"{}").unwrap();
    let mut seen = 0;
    for entry in std::fs::read_dir(&corpus).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(&path).unwrap();
        let Ok(text) = std::str::from_utf8(&bytes) else {
            continue;
        };
        seen += 1;
        match parse(text, Path::new("kiln.toml"), dir.path()) {
            Ok(_) => assert!(!name.starts_with("bad-"), "{name} loaded"),
            Err(e) => {
                assert!(!name.starts_with("ok-"), "{name}: {e}");
                let (line, column) = e.location().unwrap();
                let lines: Vec<&str> = text.split('\n').collect();
                assert!(line >= 1 && line <= lines.len(), "{name}: {e}");
                assert!(
                    column >= 1 && column <= lines[line - 1].chars().count() + 1,
                    "{name}: {e}"
                );
            }
        }
    }
    assert!(
        seen >= 50,
        "only {seen} corpus files in {}",
        corpus.display()
    );
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
fn balancer_queue_settings_parse_in_http_mode() {
    let p = parse_str(&with_balancer(
        r#"listen = "127.0.0.1:8000", max_requests = 64, queue_timeout = "1500ms""#,
    ))
    .unwrap();
    let b = p.envs["staging"].roles["app"].balancer.clone().unwrap();
    assert_eq!((b.max_requests, b.queue_timeout_ms), (Some(64), Some(1500)));
    let p = parse_str(&with_balancer(
        r#"listen = "127.0.0.1:8000", queue_timeout = "0s""#,
    ))
    .unwrap();
    let b = p.envs["staging"].roles["app"].balancer.clone().unwrap();
    assert_eq!((b.max_requests, b.queue_timeout_ms), (None, Some(0)));
    let p = parse_str(GOOD).unwrap();
    let b = p.envs["staging"].roles["app"].balancer.clone().unwrap();
    assert_eq!((b.max_requests, b.queue_timeout_ms), (None, None));
}

#[test]
fn bad_balancer_queue_settings_point_at_the_value() {
    balancer_err(
        r#"listen = "127.0.0.1:8000", max_requests = 0"#,
        "0 }",
        "max_requests 0 is out of range; expected 1 to 100000 requests at once per backend",
    );
    balancer_err(
        r#"listen = "127.0.0.1:8000", queue_timeout = "11m""#,
        "\"11m\"",
        "queue_timeout `11m` is longer than 10m; a request waiting that long has long been given up by its client",
    );
    balancer_err(
        r#"listen = "127.0.0.1:8000", queue_timeout = "soon""#,
        "\"soon\"",
        &parse_duration("soon").unwrap_err(),
    );
    balancer_err(
        r#"listen = "127.0.0.1:8000", mode = "tcp", max_requests = 8"#,
        "8 }",
        "`max_requests` applies to HTTP mode, where requests are admitted one by one; this balancer is in TCP mode (set `mode = \"http\"` or remove `max_requests`)",
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
        &format!("{swarm}balancer = {{ listen = \"0.0.0.0:80\", port = 8080, tls = {{ acme = {{ directory = \"https://a.test/dir\", email = \"a@b\", domains = [\"a.test\"] }} }} }}\n"),
        "kiln.toml:9:12: the balancer of role `r` terminates TLS, which the swarm provider does not support yet (its certificate files and ACME state live on kiln's host)",
    );
    check_err(
        &format!("{head}provider = {{ swarm = \"unix:///s\", registry = \"h/a\" }}\nsecrets = {{ recipients = [\"{RECIPIENT}\"] }}\n[env.p.roles.r]\nimage = \"a\"\nsecrets = [\"pw\"]\n"),
        "kiln.toml:10:12: role `r` of `p` receives secrets, which the swarm provider does not deliver yet (they would need Docker secrets); use them on the local provider",
    );
    check_err(
        &format!("{swarm}balancer = {{ listen = \"127.0.0.1:8000\", port = 8080 }}\n"),
        "kiln.toml:9:12: the balancer of role `r` of `p` runs on the swarm's nodes and is reached on port 8000 of each: write listen = \"0.0.0.0:8000\"",
    );
    check_err(
        &format!("{swarm}placement = [\"zone==a\"]\n"),
        "kiln.toml:9:13: placement constraint `zone==a` names no attribute kiln knows; expected \"node.labels.KEY==VALUE\", \"node.hostname!=NAME\", \"node.role==worker\" or \"node.id==ID\"",
    );
}
