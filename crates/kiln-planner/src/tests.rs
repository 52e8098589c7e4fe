//! Snapshot tests: each case is a spec, an observed inventory, a seeded
//! random source and the exact rendered plan.

use super::*;

const SPEC: &str = r#"
[project]
name = "shop"
[images.base]
from = "scratch"
[images.app]
from = "base"
[env.staging]
subnet = "10.88.1.0/24"
[env.staging.roles.db]
image = "base"
servers = 1
volumes = { data = "/var/lib/db" }
cold_only = true
[env.staging.roles.app]
image = "app"
servers = 3
depends_on = ["db"]
"#;

fn env() -> EnvSpec {
    let dir = std::env::temp_dir();
    kiln_spec::parse(SPEC, std::path::Path::new("kiln.toml"), &dir)
        .unwrap()
        .envs["staging"]
        .clone()
}

fn targets(env: &EnvSpec, app: (&str, &str)) -> Vec<RoleTarget> {
    env.roles
        .values()
        .map(|r| {
            let (image, digest) = if r.name == "app" {
                app
            } else {
                ("base@1", "sha256:base1")
            };
            RoleTarget {
                role: r.name.clone(),
                image: image.into(),
                image_digest: digest.into(),
                spec_hash: spec_hash(r),
                servers: r.servers,
                cold: r.cold_only || !r.volumes.is_empty(),
            }
        })
        .collect()
}

fn server(
    id: &str,
    role: &str,
    slot: u32,
    image: &str,
    digest: &str,
    hash: &str,
    addr: &str,
) -> Server {
    Server {
        id: id.into(),
        env: "staging".into(),
        role: role.into(),
        slot,
        image: image.into(),
        image_digest: digest.into(),
        spec_hash: hash.into(),
        address: addr.into(),
        created: 100 + slot as i64,
        status: ServerStatus::Running,
        pid: Some(1),
        release: 1,
        standby_until: None,
    }
}

/// A deterministic "random" source: 0x1000, 0x1001, ...
fn seq() -> impl FnMut() -> u16 {
    let mut n = 0x1000u16;
    move || {
        n += 1;
        n - 1
    }
}

fn check(observed: &[Server], dead: &[&str], app: (&str, &str), cold: bool, expect: &str) -> Plan {
    let env = env();
    let t = targets(&env, app);
    let dead: BTreeSet<String> = dead.iter().map(|s| s.to_string()).collect();
    let input = Input {
        env: &env,
        targets: &t,
        observed,
        dead: &dead,
        generation: 7,
        now: 1000,
        cold,
        force: &Default::default(),
        taken: &Default::default(),
    };
    let plan = plan(&input, &mut seq()).unwrap();
    let got = render(&plan);
    assert_eq!(got, expect, "\n--- got\n{got}");
    // Same inputs, same plan.
    assert_eq!(super::plan(&input, &mut seq()).unwrap(), plan);
    plan
}

fn fleet() -> Vec<Server> {
    let e = env();
    let db = spec_hash(&e.roles["db"]);
    let app = spec_hash(&e.roles["app"]);
    vec![
        server(
            "db-aaaa",
            "db",
            0,
            "base@1",
            "sha256:base1",
            &db,
            "10.88.1.2",
        ),
        server(
            "app-0001",
            "app",
            0,
            "app@1",
            "sha256:app1",
            &app,
            "10.88.1.3",
        ),
        server(
            "app-0002",
            "app",
            1,
            "app@1",
            "sha256:app1",
            &app,
            "10.88.1.4",
        ),
        server(
            "app-0003",
            "app",
            2,
            "app@1",
            "sha256:app1",
            &app,
            "10.88.1.5",
        ),
    ]
}

#[test]
fn empty_environment_creates_in_dependency_order() {
    let plan = check(
        &[],
        &[],
        ("app@1", "sha256:app1"),
        false,
        "\
kiln will make these changes to `staging`:

  + db-1000    create   base@1 at 10.88.1.2  (new server)
  + app-1001   create   app@1 at 10.88.1.3  (new server)
  + app-1002   create   app@1 at 10.88.1.4  (new server)
  + app-1003   create   app@1 at 10.88.1.5  (new server)

Plan: 4 to create, 0 to replace, 0 to destroy.
",
    );
    assert_eq!(plan.order, ["db", "app"]);
    assert_eq!(plan.generation, 7);
}

#[test]
fn converged_environment_has_no_changes() {
    check(
        &fleet(),
        &[],
        ("app@1", "sha256:app1"),
        false,
        "No changes. Environment `staging` matches its declaration.\n",
    );
}

#[test]
fn new_image_replaces_each_server_create_first() {
    check(&fleet(), &[], ("app@2", "sha256:app2"), false, "\
kiln will make these changes to `staging`:

  ~ app-0001   replace  by app-1000 (app@2 at 10.88.1.6), create first  (image changed (app@1 → app@2))
  ~ app-0002   replace  by app-1001 (app@2 at 10.88.1.7), create first  (image changed (app@1 → app@2))
  ~ app-0003   replace  by app-1002 (app@2 at 10.88.1.8), create first  (image changed (app@1 → app@2))

Plan: 0 to create, 3 to replace, 0 to destroy.
");
}

#[test]
fn spec_change_on_cold_role_destroys_first() {
    let mut f = fleet();
    f[0].spec_hash = "old".into();
    check(&f, &[], ("app@1", "sha256:app1"), false, "\
kiln will make these changes to `staging`:

  ~ db-aaaa    replace  by db-1000 (base@1 at 10.88.1.6), destroy first  (spec changed; cold-only: destroyed before its replacement starts)

Plan: 0 to create, 1 to replace, 0 to destroy.
");
}

#[test]
fn dead_and_half_created_servers_are_recreated_in_their_slots() {
    let mut f = fleet();
    f[3].status = ServerStatus::Creating;
    f.push(server(
        "app-0009",
        "app",
        7,
        "app@1",
        "sha256:app1",
        &f[1].spec_hash.clone(),
        "10.88.1.9",
    ));
    check(
        &f,
        &["app-0002"],
        ("app@1", "sha256:app1"),
        false,
        "\
kiln will make these changes to `staging`:

  + app-1000   create   app@1 at 10.88.1.6  (slot 1 has no running server)
  + app-1001   create   app@1 at 10.88.1.7  (slot 2 has no running server)
  - app-0009   destroy  (scaled down to 3 servers)

Plan: 2 to create, 0 to replace, 1 to destroy.
",
    );
}

#[test]
fn cold_deploy_destroys_everything_then_creates() {
    check(
        &fleet(),
        &[],
        ("app@1", "sha256:app1"),
        true,
        "\
kiln will make these changes to `staging` (cold deploy: NOT zero-downtime):

  - app-0001   destroy  (cold deploy: every server is destroyed first)
  - app-0002   destroy  (cold deploy: every server is destroyed first)
  - app-0003   destroy  (cold deploy: every server is destroyed first)
  - db-aaaa    destroy  (cold deploy: every server is destroyed first)
  + db-1000    create   base@1 at 10.88.1.6  (cold deploy)
  + app-1001   create   app@1 at 10.88.1.7  (cold deploy)
  + app-1002   create   app@1 at 10.88.1.8  (cold deploy)
  + app-1003   create   app@1 at 10.88.1.9  (cold deploy)

Plan: 4 to create, 0 to replace, 4 to destroy.
",
    );
}

#[test]
fn ids_never_collide_and_subnet_exhaustion_is_an_error() {
    let env = {
        let mut e = env();
        e.subnet = "10.88.1.0/29".into(); // 6 hosts: .1 gateway, .2–.6 servers
        e
    };
    let t = targets(&env, ("app@1", "sha256:app1"));
    let dead = BTreeSet::new();
    // A random source that repeats itself still yields distinct ids.
    let same = || 7u16;
    let mut calls = 0;
    let mut flaky = move || {
        calls += 1;
        if calls < 3 {
            same()
        } else {
            calls as u16
        }
    };
    let input = Input {
        env: &env,
        targets: &t,
        observed: &[],
        dead: &dead,
        generation: 0,
        now: 0,
        cold: false,
        force: &Default::default(),
        taken: &Default::default(),
    };
    let p = plan(&input, &mut flaky).unwrap();
    let ids: BTreeSet<_> = p.changes.iter().map(|c| c.server.clone()).collect();
    assert_eq!(ids.len(), 4);
    // Ids taken elsewhere on the host (another environment or project) are
    // never handed out.
    let taken: BTreeSet<String> = ["app-0001".to_string(), "app-0002".to_string()].into();
    let input = Input {
        taken: &taken,
        ..input
    };
    let mut counter = 0u16;
    let p = plan(&input, &mut || {
        counter += 1;
        counter
    })
    .unwrap();
    let ids: Vec<_> = p.changes.iter().map(|c| c.server.as_str()).collect();
    assert_eq!(ids, ["db-0001", "app-0003", "app-0004", "app-0005"]);
    let mut e2 = env.clone();
    e2.roles.get_mut("app").unwrap().servers = 9;
    let t2 = targets(&e2, ("app@1", "sha256:app1"));
    let input = Input {
        env: &e2,
        targets: &t2,
        observed: &[],
        dead: &dead,
        generation: 0,
        now: 0,
        cold: false,
        force: &Default::default(),
        taken: &Default::default(),
    };
    assert_eq!(
        plan(&input, &mut seq()).unwrap_err(),
        PlanError::SubnetFull {
            env: "staging".into(),
            subnet: "10.88.1.0/29".into()
        }
    );
}

#[test]
fn plan_of_ten_thousand_servers_is_complete() {
    let mut e = env();
    e.subnet = "10.0.0.0/16".into();
    e.roles.get_mut("app").unwrap().servers = 10_000;
    let t = targets(&e, ("app@2", "sha256:app2"));
    let hash = spec_hash(&e.roles["app"]);
    let observed: Vec<Server> = (0..10_000u32)
        .map(|i| {
            server(
                &format!("app-{i:05}"),
                "app",
                i,
                "app@1",
                "sha256:app1",
                &hash,
                &Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 2)) + i).to_string(),
            )
        })
        .collect();
    let dead = BTreeSet::new();
    let input = Input {
        env: &e,
        targets: &t,
        observed: &observed,
        dead: &dead,
        generation: 1,
        now: 0,
        cold: false,
        force: &Default::default(),
        taken: &Default::default(),
    };
    let mut n = 0u16;
    let p = plan(&input, &mut || {
        n = n.wrapping_add(1);
        n
    })
    .unwrap();
    assert_eq!(p.count(Action::Replace), 10_000);
    assert_eq!(p.count(Action::Create), 1, "the db");
}

fn with_strategy(strategy: kiln_model::Strategy) -> EnvSpec {
    let mut e = env();
    e.roles.get_mut("app").unwrap().strategy = strategy;
    e
}

fn check_env(
    env: &EnvSpec,
    observed: &[Server],
    now: i64,
    app: (&str, &str),
    expect: &str,
) -> Plan {
    let t = targets(env, app);
    let dead = BTreeSet::new();
    let input = Input {
        env,
        targets: &t,
        observed,
        dead: &dead,
        generation: 7,
        now,
        cold: false,
        force: &Default::default(),
        taken: &Default::default(),
    };
    let plan = plan(&input, &mut seq()).unwrap();
    let got = render(&plan);
    assert_eq!(got, expect, "\n--- got\n{got}");
    plan
}

#[test]
fn blue_green_brings_up_a_full_set_and_keeps_the_old_one_warm() {
    let env = with_strategy(kiln_model::Strategy::BlueGreen {
        rollback_window_secs: 300,
    });
    let plan = check_env(&env, &fleet(), 1000, ("app@2", "sha256:app2"), "\
kiln will make these changes to `staging`:

  batch 1 (3 servers, blue-green: all up and healthy, then one switch):
  ~ app-0001   replace  by app-1000 (app@2 at 10.88.1.6), create first  (image changed (app@1 → app@2); blue-green: new set, one switch, old set warm for 300s)
  ~ app-0002   replace  by app-1001 (app@2 at 10.88.1.7), create first  (image changed (app@1 → app@2); blue-green: new set, one switch, old set warm for 300s)
  ~ app-0003   replace  by app-1002 (app@2 at 10.88.1.8), create first  (image changed (app@1 → app@2); blue-green: new set, one switch, old set warm for 300s)

Plan: 0 to create, 3 to replace, 0 to destroy.
");
    assert!(plan
        .changes
        .iter()
        .all(|c| c.keep_warm_secs == Some(300) && c.batch == 1));
}

fn after_blue_green(until: i64) -> Vec<Server> {
    // app@2 serves; the app@1 set waits on standby until `until`.
    let mut f = fleet();
    for s in f.iter_mut().filter(|s| s.role == "app") {
        s.status = ServerStatus::Standby;
        s.standby_until = Some(until);
    }
    let hash = f[1].spec_hash.clone();
    for i in 0..3u32 {
        f.push(server(
            &format!("app-100{i}"),
            "app",
            i,
            "app@2",
            "sha256:app2",
            &hash,
            &format!("10.88.1.{}", 6 + i),
        ));
    }
    f
}

#[test]
fn blue_green_rollback_inside_the_window_switches_back() {
    let env = with_strategy(kiln_model::Strategy::BlueGreen {
        rollback_window_secs: 300,
    });
    let plan = check_env(&env, &after_blue_green(1300), 1100, ("app@1", "sha256:app1"), "\
kiln will make these changes to `staging`:

  batch 1 (3 servers, switch back in one step):
  ~ app-1000   replace  by app-0001 (app@1 at 10.88.1.3), switch back  (image changed (app@2 → app@1); blue-green: switch back to warm app-0001)
  ~ app-1001   replace  by app-0002 (app@1 at 10.88.1.4), switch back  (image changed (app@2 → app@1); blue-green: switch back to warm app-0002)
  ~ app-1002   replace  by app-0003 (app@1 at 10.88.1.5), switch back  (image changed (app@2 → app@1); blue-green: switch back to warm app-0003)

Plan: 0 to create, 3 to replace, 0 to destroy.
");
    assert!(plan.changes.iter().all(|c| c.promote));
}

#[test]
fn blue_green_standby_is_destroyed_after_the_window() {
    let env = with_strategy(kiln_model::Strategy::BlueGreen {
        rollback_window_secs: 300,
    });
    check_env(
        &env,
        &after_blue_green(1300),
        1300,
        ("app@2", "sha256:app2"),
        "\
kiln will make these changes to `staging`:

  - app-0001   destroy  (blue-green rollback window is over)
  - app-0002   destroy  (blue-green rollback window is over)
  - app-0003   destroy  (blue-green rollback window is over)

Plan: 0 to create, 0 to replace, 3 to destroy.
",
    );
}

#[test]
fn canary_goes_first_and_bakes_then_the_rest_rolls() {
    let env = with_strategy(kiln_model::Strategy::Canary {
        share_percent: 34,
        bake_secs: 30,
        max_error_rate: 0.01,
    });
    let plan = check_env(&env, &fleet(), 1000, ("app@2", "sha256:app2"), "\
kiln will make these changes to `staging`:

  batch 1 (2 servers, canary: up, switched, then baked before the rest):
  ~ app-0001   replace  by app-1000 (app@2 at 10.88.1.6), create first  (image changed (app@1 → app@2); canary (34%), baked 30s)
  ~ app-0002   replace  by app-1001 (app@2 at 10.88.1.7), create first  (image changed (app@1 → app@2); canary (34%), baked 30s)
  ~ app-0003   replace  by app-1002 (app@2 at 10.88.1.8), create first  (image changed (app@1 → app@2))

Plan: 0 to create, 3 to replace, 0 to destroy.
");
    assert_eq!(
        plan.changes.iter().map(|c| c.batch).collect::<Vec<_>>(),
        [1, 1, 2]
    );
}

#[test]
fn rolling_surge_batches_replacements() {
    let env = with_strategy(kiln_model::Strategy::Rolling {
        max_surge: 2,
        max_unavailable: 0,
        min_healthy_secs: 0,
    });
    let plan = check_env(&env, &fleet(), 1000, ("app@2", "sha256:app2"), "\
kiln will make these changes to `staging`:

  batch 1 (2 servers, together: up and healthy, then one switch):
  ~ app-0001   replace  by app-1000 (app@2 at 10.88.1.6), create first  (image changed (app@1 → app@2))
  ~ app-0002   replace  by app-1001 (app@2 at 10.88.1.7), create first  (image changed (app@1 → app@2))
  ~ app-0003   replace  by app-1002 (app@2 at 10.88.1.8), create first  (image changed (app@1 → app@2))

Plan: 0 to create, 3 to replace, 0 to destroy.
");
    assert_eq!(
        plan.changes.iter().map(|c| c.batch).collect::<Vec<_>>(),
        [1, 1, 2]
    );
}

#[test]
fn rolling_without_surge_replaces_destroy_first() {
    let env = with_strategy(kiln_model::Strategy::Rolling {
        max_surge: 0,
        max_unavailable: 1,
        min_healthy_secs: 0,
    });
    let plan = check_env(&env, &fleet()[..2], 1000, ("app@2", "sha256:app2"), "\
kiln will make these changes to `staging`:

  + app-1000   create   app@2 at 10.88.1.4  (new server)
  + app-1001   create   app@2 at 10.88.1.5  (new server)
  ~ app-0001   replace  by app-1002 (app@2 at 10.88.1.6), destroy first  (image changed (app@1 → app@2); max_unavailable = 1: destroyed before its replacement starts)

Plan: 2 to create, 1 to replace, 0 to destroy.
");
    assert!(plan.changes[2].cold);
}

#[test]
fn rolling_surge_and_unavailable_share_batches() {
    // max_surge = 1, max_unavailable = 1: batches of two, one destroyed first
    // and one created first, so capacity never drops by more than one.
    let env = with_strategy(kiln_model::Strategy::Rolling {
        max_surge: 1,
        max_unavailable: 1,
        min_healthy_secs: 0,
    });
    let plan = check_env(&env, &fleet(), 1000, ("app@2", "sha256:app2"), "\
kiln will make these changes to `staging`:

  batch 1 (2 servers, together: destroy-first ones drained and destroyed, then all up and healthy, then one switch):
  ~ app-0001   replace  by app-1000 (app@2 at 10.88.1.6), destroy first  (image changed (app@1 → app@2); max_unavailable = 1: destroyed before its replacement starts)
  ~ app-0002   replace  by app-1001 (app@2 at 10.88.1.7), create first  (image changed (app@1 → app@2))
  ~ app-0003   replace  by app-1002 (app@2 at 10.88.1.8), destroy first  (image changed (app@1 → app@2); max_unavailable = 1: destroyed before its replacement starts)

Plan: 0 to create, 3 to replace, 0 to destroy.
");
    assert_eq!(
        plan.changes
            .iter()
            .map(|c| (c.batch, c.cold))
            .collect::<Vec<_>>(),
        [(1, true), (1, false), (2, true)]
    );
}
