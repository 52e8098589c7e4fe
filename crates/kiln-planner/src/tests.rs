//! Snapshot tests: each case is a spec, an observed inventory, a seeded
//! random source and the exact rendered plan. Update the snapshots with
//! `UPDATE_EXPECT=1 cargo test -p kiln-planner` and review the diff.

use std::net::Ipv4Addr;

use expect_test::{expect, Expect};
use kiln_model::{Action, ImageRef, Launch, Outcome, Release, ReplaceOrder, Strategy, Subnet};

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

fn image(name_version: &str, digest: &str) -> ImageRef {
    let (name, version) = name_version.split_once('@').unwrap();
    ImageRef {
        name: name.into(),
        version: version.parse().unwrap(),
        digest: digest.into(),
    }
}

fn targets(env: &EnvSpec, app: (&str, &str)) -> Vec<RoleTarget> {
    env.roles
        .values()
        .map(|r| {
            let (i, d) = if r.name == "app" {
                app
            } else {
                ("base@1", "sha256:base1")
            };
            RoleTarget {
                role: r.name.clone(),
                image: image(i, d),
                spec_hash: spec_hash(r),
                servers: r.servers,
                cold: r.cold_only || !r.volumes.is_empty(),
                launch: Launch::default(),
                spec: r.clone(),
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
        node: None,
        published: Default::default(),
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

/// One planning case: the inputs that vary between tests.
struct Case<'a> {
    env: EnvSpec,
    observed: &'a [Server],
    dead: &'a [&'a str],
    app: (&'a str, &'a str),
    kind: PlanKind,
    now: i64,
    strays: &'a [(String, String)],
}

impl<'a> Case<'a> {
    fn new(observed: &'a [Server], app: (&'a str, &'a str)) -> Case<'a> {
        Case {
            env: env(),
            observed,
            dead: &[],
            app,
            kind: PlanKind::Apply,
            now: 1000,
            strays: &[],
        }
    }

    /// Plans, checks the rendering against `expect`, and that the same
    /// inputs give the same plan.
    fn check(&self, expect: Expect) -> Plan {
        let t = targets(&self.env, self.app);
        let dead: BTreeSet<String> = self.dead.iter().map(|s| s.to_string()).collect();
        let input = Input {
            env: &self.env,
            targets: &t,
            observed: self.observed,
            dead: &dead,
            generation: 7,
            now: self.now,
            kind: self.kind,
            force: &Default::default(),
            taken: &Default::default(),
            strays: self.strays,
            nodes: &[],
        };
        let plan = plan(&input, &mut seq()).unwrap();
        expect.assert_eq(&render(&plan));
        assert_eq!(super::plan(&input, &mut seq()).unwrap(), plan);
        plan
    }
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

fn batches(plan: &Plan) -> Vec<u32> {
    plan.changes.iter().map(|c| c.batch()).collect()
}

fn replaces(plan: &Plan) -> Vec<&Replace> {
    plan.changes
        .iter()
        .filter_map(|c| match c {
            Change::Replace(r) => Some(r),
            _ => None,
        })
        .collect()
}

#[test]
fn empty_environment_creates_in_dependency_order() {
    let plan = Case::new(&[], ("app@1", "sha256:app1")).check(expect![[r#"
        kiln will make these changes to `staging`:

          + db-1000    create   base@1 at 10.88.1.2  (new server)
          + app-1001   create   app@1 at 10.88.1.3  (new server)
          + app-1002   create   app@1 at 10.88.1.4  (new server)
          + app-1003   create   app@1 at 10.88.1.5  (new server)

        Plan: 4 to create, 0 to replace, 0 to destroy.
    "#]]);
    assert_eq!(plan.order, ["db", "app"]);
    assert_eq!(plan.generation, 7);
    assert_eq!(plan.format, PLAN_FORMAT);
    assert_eq!(
        plan.targets.len(),
        2,
        "the plan carries every role's target"
    );
}

#[test]
fn converged_environment_has_no_changes() {
    Case::new(&fleet(), ("app@1", "sha256:app1")).check(expect![[r#"
        No changes. Environment `staging` matches its declaration.
    "#]]);
}

#[test]
fn new_image_replaces_each_server_create_first() {
    Case::new(&fleet(), ("app@2", "sha256:app2")).check(expect![[r#"
        kiln will make these changes to `staging`:

          ~ app-0001   replace  by app-1000 (app@2 at 10.88.1.6), create first  (image changed (app@1 → app@2))
          ~ app-0002   replace  by app-1001 (app@2 at 10.88.1.7), create first  (image changed (app@1 → app@2))
          ~ app-0003   replace  by app-1002 (app@2 at 10.88.1.8), create first  (image changed (app@1 → app@2))

        Plan: 0 to create, 3 to replace, 0 to destroy.
    "#]]);
}

#[test]
fn spec_change_on_cold_role_destroys_first() {
    let mut f = fleet();
    f[0].spec_hash = "old".into();
    Case::new(&f, ("app@1", "sha256:app1")).check(expect![[r#"
        kiln will make these changes to `staging`:

          ~ db-aaaa    replace  by db-1000 (base@1 at 10.88.1.6), destroy first  (spec changed; cold-only: destroyed before its replacement starts)

        Plan: 0 to create, 1 to replace, 0 to destroy.
    "#]]);
}

#[test]
fn leftovers_are_destroyed_and_their_slots_recreated() {
    let mut f = fleet();
    f[3].status = ServerStatus::Creating;
    let hash = f[1].spec_hash.clone();
    f.push(server(
        "app-0009",
        "app",
        7,
        "app@1",
        "sha256:app1",
        &hash,
        "10.88.1.9",
    ));
    let strays = [("app-beef".to_string(), "app".to_string())];
    let case = Case {
        dead: &["app-0002"],
        strays: &strays,
        ..Case::new(&f, ("app@1", "sha256:app1"))
    };
    case.check(expect![[r#"
        kiln will make these changes to `staging`:

          - app-0002   destroy  (its process is gone)
          - app-0003   destroy  (half-created by an interrupted apply)
          - app-beef   destroy  (stray: labelled with the environment, unknown to the state)
          + app-1000   create   app@1 at 10.88.1.6  (slot 1 has no running server)
          + app-1001   create   app@1 at 10.88.1.7  (slot 2 has no running server)
          - app-0009   destroy  (scaled down to 3 servers)

        Plan: 2 to create, 0 to replace, 4 to destroy.
    "#]]);
}

#[test]
fn a_half_destroyed_server_is_never_no_changes() {
    // SIGKILL right after the last batch's new server became healthy: the
    // old server is marked `destroying`. The re-run must finish it.
    let mut f = fleet();
    let hash = f[1].spec_hash.clone();
    f[3].status = ServerStatus::Destroying;
    f.push(server(
        "app-0004",
        "app",
        2,
        "app@1",
        "sha256:app1",
        &hash,
        "10.88.1.6",
    ));
    Case::new(&f, ("app@1", "sha256:app1")).check(expect![[r#"
        kiln will make these changes to `staging`:

          - app-0003   destroy  (half-destroyed by an interrupted apply)

        Plan: 0 to create, 0 to replace, 1 to destroy.
    "#]]);
}

#[test]
fn cold_deploy_destroys_everything_then_creates() {
    let case = Case {
        kind: PlanKind::DeployCold,
        ..Case::new(&[], ("app@1", "sha256:app1"))
    };
    let f = fleet();
    Case {
        observed: &f,
        ..case
    }
    .check(expect![[r#"
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
    "#]]);
}

#[test]
fn destroy_takes_dependents_first() {
    let e = env();
    let plan = plan_destroy(&e, &fleet(), &[("app-beef".into(), "app".into())], 3, 1000);
    expect![[r#"
        kiln will make these changes to `staging`:

          - app-0001   destroy  (environment destroyed)
          - app-0002   destroy  (environment destroyed)
          - app-0003   destroy  (environment destroyed)
          - db-aaaa    destroy  (environment destroyed)
          - app-beef   destroy  (stray: labelled with the environment, unknown to the state)

        Plan: 0 to create, 0 to replace, 5 to destroy.
    "#]]
    .assert_eq(&render(&plan));
    assert_eq!(plan.kind, PlanKind::Destroy);
    assert!(plan.targets.is_empty());
}

fn input<'a>(
    env: &'a EnvSpec,
    t: &'a [RoleTarget],
    dead: &'a BTreeSet<String>,
    taken: &'a BTreeSet<String>,
) -> Input<'a> {
    static NO_FORCE: BTreeMap<String, String> = BTreeMap::new();
    Input {
        env,
        targets: t,
        observed: &[],
        dead,
        generation: 0,
        now: 0,
        kind: PlanKind::Apply,
        force: &NO_FORCE,
        taken,
        strays: &[],
        nodes: &[],
    }
}

#[test]
fn ids_never_collide_and_subnet_exhaustion_is_an_error() {
    let mut env = env();
    env.subnet = "10.88.1.0/28".parse().unwrap(); // 13 servers
    env.roles.get_mut("app").unwrap().servers = 4;
    let t = targets(&env, ("app@1", "sha256:app1"));
    let dead = BTreeSet::new();
    let none = BTreeSet::new();
    // A random source that keeps repeating itself still yields distinct ids.
    let p = plan(&input(&env, &t, &dead, &none), &mut || 7u16).unwrap();
    let ids: BTreeSet<_> = p.changes.iter().map(|c| c.server()).collect();
    assert_eq!(ids.len(), 5);
    // Ids taken elsewhere on the host (another environment or project) are
    // never handed out.
    let taken: BTreeSet<String> = ["app-0001".to_string(), "app-0002".to_string()].into();
    let mut counter = 0u16;
    let p = plan(&input(&env, &t, &dead, &taken), &mut || {
        counter += 1;
        counter
    })
    .unwrap();
    let ids: Vec<_> = p.changes.iter().map(|c| c.server()).collect();
    assert_eq!(
        ids,
        ["db-0001", "app-0003", "app-0004", "app-0005", "app-0006"]
    );
    env.roles.get_mut("app").unwrap().servers = 13;
    let t = targets(&env, ("app@1", "sha256:app1"));
    assert_eq!(
        plan(&input(&env, &t, &dead, &none), &mut seq()).unwrap_err(),
        PlanError::SubnetFull {
            env: "staging".into(),
            subnet: "10.88.1.0/28".into()
        }
    );
}

#[test]
fn a_role_with_every_id_taken_is_an_error_not_a_hang() {
    let env = env();
    let t = targets(&env, ("app@1", "sha256:app1"));
    let dead = BTreeSet::new();
    let taken: BTreeSet<String> = (0..=u16::MAX).map(|n| format!("app-{n:04x}")).collect();
    assert_eq!(
        plan(&input(&env, &t, &dead, &taken), &mut seq()).unwrap_err(),
        PlanError::IdsExhausted { role: "app".into() }
    );
}

#[test]
fn plan_of_ten_thousand_servers_is_complete() {
    let mut e = env();
    e.subnet = "10.0.0.0/16".parse().unwrap();
    e.roles.get_mut("app").unwrap().servers = 10_000;
    let t = targets(&e, ("app@2", "sha256:app2"));
    let hash = spec_hash(&e.roles["app"]);
    let observed: Vec<Server> = (0..10_000u32)
        .map(|i| {
            let a = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 2)) + i);
            server(
                &format!("app-{i:05}"),
                "app",
                i,
                "app@1",
                "sha256:app1",
                &hash,
                &a.to_string(),
            )
        })
        .collect();
    let dead = BTreeSet::new();
    let none = BTreeSet::new();
    let input = Input {
        observed: &observed,
        ..input(&e, &t, &dead, &none)
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

fn with_strategy(strategy: Strategy) -> EnvSpec {
    let mut e = env();
    e.roles.get_mut("app").unwrap().strategy = strategy;
    e
}

#[test]
fn blue_green_brings_up_a_full_set_and_keeps_the_old_one_warm() {
    let f = fleet();
    let case = Case {
        env: with_strategy(Strategy::BlueGreen {
            rollback_window_secs: 300,
        }),
        ..Case::new(&f, ("app@2", "sha256:app2"))
    };
    let plan = case.check(expect![[r#"
        kiln will make these changes to `staging`:

          batch 1 (3 servers, blue-green: all up and healthy, then one switch):
          ~ app-0001   replace  by app-1000 (app@2 at 10.88.1.6), create first  (image changed (app@1 → app@2); blue-green: new set, one switch, old set warm for 300s)
          ~ app-0002   replace  by app-1001 (app@2 at 10.88.1.7), create first  (image changed (app@1 → app@2); blue-green: new set, one switch, old set warm for 300s)
          ~ app-0003   replace  by app-1002 (app@2 at 10.88.1.8), create first  (image changed (app@1 → app@2); blue-green: new set, one switch, old set warm for 300s)

        Plan: 0 to create, 3 to replace, 0 to destroy.
    "#]]);
    assert!(replaces(&plan)
        .iter()
        .all(|r| r.keep_warm_secs == Some(300) && r.batch == 1));
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
        let addr = format!("10.88.1.{}", 6 + i);
        f.push(server(
            &format!("app-100{i}"),
            "app",
            i,
            "app@2",
            "sha256:app2",
            &hash,
            &addr,
        ));
    }
    f
}

#[test]
fn blue_green_rollback_inside_the_window_switches_back() {
    let f = after_blue_green(1300);
    let case = Case {
        env: with_strategy(Strategy::BlueGreen {
            rollback_window_secs: 300,
        }),
        now: 1100,
        ..Case::new(&f, ("app@1", "sha256:app1"))
    };
    let plan = case.check(expect![[r#"
        kiln will make these changes to `staging`:

          batch 1 (3 servers, switch back in one step):
          ~ app-1000   replace  by app-0001 (app@1 at 10.88.1.3), switch back  (image changed (app@2 → app@1); blue-green: switch back to warm app-0001)
          ~ app-1001   replace  by app-0002 (app@1 at 10.88.1.4), switch back  (image changed (app@2 → app@1); blue-green: switch back to warm app-0002)
          ~ app-1002   replace  by app-0003 (app@1 at 10.88.1.5), switch back  (image changed (app@2 → app@1); blue-green: switch back to warm app-0003)

        Plan: 0 to create, 3 to replace, 0 to destroy.
    "#]]);
    assert!(replaces(&plan)
        .iter()
        .all(|r| r.order == ReplaceOrder::SwitchBack));
}

#[test]
fn blue_green_standby_is_destroyed_after_the_window() {
    let f = after_blue_green(1300);
    let case = Case {
        env: with_strategy(Strategy::BlueGreen {
            rollback_window_secs: 300,
        }),
        now: 1300,
        ..Case::new(&f, ("app@2", "sha256:app2"))
    };
    case.check(expect![[r#"
        kiln will make these changes to `staging`:

          - app-0001   destroy  (blue-green rollback window is over)
          - app-0002   destroy  (blue-green rollback window is over)
          - app-0003   destroy  (blue-green rollback window is over)

        Plan: 0 to create, 0 to replace, 3 to destroy.
    "#]]);
}

#[test]
fn canary_goes_first_and_bakes_then_the_rest_rolls() {
    let f = fleet();
    let case = Case {
        env: with_strategy(Strategy::Canary {
            share_percent: 34,
            bake_secs: 30,
            max_error_rate: 0.01,
        }),
        ..Case::new(&f, ("app@2", "sha256:app2"))
    };
    let plan = case.check(expect![[r#"
        kiln will make these changes to `staging`:

          batch 1 (2 servers, canary: up, switched, then baked before the rest):
          ~ app-0001   replace  by app-1000 (app@2 at 10.88.1.6), create first  (image changed (app@1 → app@2); canary (34%), baked 30s)
          ~ app-0002   replace  by app-1001 (app@2 at 10.88.1.7), create first  (image changed (app@1 → app@2); canary (34%), baked 30s)
          ~ app-0003   replace  by app-1002 (app@2 at 10.88.1.8), create first  (image changed (app@1 → app@2))

        Plan: 0 to create, 3 to replace, 0 to destroy.
    "#]]);
    assert_eq!(batches(&plan), [1, 1, 2]);
}

#[test]
fn rolling_surge_batches_replacements() {
    let f = fleet();
    let case = Case {
        env: with_strategy(Strategy::Rolling {
            max_surge: 2,
            max_unavailable: 0,
            min_healthy_secs: 0,
        }),
        ..Case::new(&f, ("app@2", "sha256:app2"))
    };
    let plan = case.check(expect![[r#"
        kiln will make these changes to `staging`:

          batch 1 (2 servers, together: up and healthy, then one switch):
          ~ app-0001   replace  by app-1000 (app@2 at 10.88.1.6), create first  (image changed (app@1 → app@2))
          ~ app-0002   replace  by app-1001 (app@2 at 10.88.1.7), create first  (image changed (app@1 → app@2))
          ~ app-0003   replace  by app-1002 (app@2 at 10.88.1.8), create first  (image changed (app@1 → app@2))

        Plan: 0 to create, 3 to replace, 0 to destroy.
    "#]]);
    assert_eq!(batches(&plan), [1, 1, 2]);
}

#[test]
fn rolling_without_surge_replaces_destroy_first() {
    let f = fleet();
    let case = Case {
        env: with_strategy(Strategy::Rolling {
            max_surge: 0,
            max_unavailable: 1,
            min_healthy_secs: 0,
        }),
        ..Case::new(&f[..2], ("app@2", "sha256:app2"))
    };
    let plan = case.check(expect![[r#"
        kiln will make these changes to `staging`:

          + app-1000   create   app@2 at 10.88.1.4  (new server)
          + app-1001   create   app@2 at 10.88.1.5  (new server)
          ~ app-0001   replace  by app-1002 (app@2 at 10.88.1.6), destroy first  (image changed (app@1 → app@2); max_unavailable = 1: destroyed before its replacement starts)

        Plan: 2 to create, 1 to replace, 0 to destroy.
    "#]]);
    assert_eq!(replaces(&plan)[0].order, ReplaceOrder::DestroyFirst);
}

#[test]
fn rolling_surge_and_unavailable_share_batches() {
    // max_surge = 1, max_unavailable = 1: batches of two, one destroyed first
    // and one created first, so capacity never drops by more than one.
    let f = fleet();
    let case = Case {
        env: with_strategy(Strategy::Rolling {
            max_surge: 1,
            max_unavailable: 1,
            min_healthy_secs: 0,
        }),
        ..Case::new(&f, ("app@2", "sha256:app2"))
    };
    let plan = case.check(expect![[r#"
        kiln will make these changes to `staging`:

          batch 1 (2 servers, together: destroy-first ones drained and destroyed, then all up and healthy, then one switch):
          ~ app-0001   replace  by app-1000 (app@2 at 10.88.1.6), destroy first  (image changed (app@1 → app@2); max_unavailable = 1: destroyed before its replacement starts)
          ~ app-0002   replace  by app-1001 (app@2 at 10.88.1.7), create first  (image changed (app@1 → app@2))
          ~ app-0003   replace  by app-1002 (app@2 at 10.88.1.8), destroy first  (image changed (app@1 → app@2); max_unavailable = 1: destroyed before its replacement starts)

        Plan: 0 to create, 3 to replace, 0 to destroy.
    "#]]);
    let orders: Vec<_> = replaces(&plan).iter().map(|r| (r.batch, r.order)).collect();
    assert_eq!(
        orders,
        [
            (1, ReplaceOrder::DestroyFirst),
            (1, ReplaceOrder::CreateFirst),
            (2, ReplaceOrder::DestroyFirst)
        ]
    );
}

fn release(id: i64, kind: PlanKind, outcome: Outcome, app: (&str, &str)) -> Release {
    Release {
        env: "staging".into(),
        id,
        created: id * 10,
        finished: Some(id * 10 + 1),
        actor: "ci".into(),
        kind,
        plan_hash: format!("h{id}"),
        summary: String::new(),
        targets: if kind == PlanKind::Destroy {
            vec![]
        } else {
            targets(&env(), app)
        },
        outcome,
        detail: String::new(),
    }
}

#[test]
fn rollback_picks_the_previous_release_that_ran_something_else() {
    use Outcome::*;
    use PlanKind::*;
    let releases = [
        release(1, Apply, Succeeded, ("app@1", "sha256:app1")),
        release(2, Apply, Succeeded, ("app@2", "sha256:app2")),
        release(3, Reconcile, Succeeded, ("app@2", "sha256:app2")),
        release(4, Apply, Failed, ("app@3", "sha256:app3")),
    ];
    let mut current = targets(&env(), ("app@3", "sha256:app3"));
    current[0].servers = 5;
    let (to, t) = rollback_targets("staging", &releases, None, &current).unwrap();
    assert_eq!(to, 1, "release 3 runs what 2 ran; 4 failed");
    let app = t.iter().find(|t| t.role == "app").unwrap();
    assert_eq!(app.image.to_string(), "app@1");
    assert_eq!(t[0].servers, 5, "today's server count is kept");
    let err = rollback_targets("staging", &releases, Some(4), &current).unwrap_err();
    assert!(err.to_string().contains("release #4"), "{err}");
    let err = rollback_targets("staging", &releases, Some(9), &current).unwrap_err();
    assert!(err.to_string().contains("no release #9"), "{err}");
    let (to, _) = rollback_targets("staging", &releases, Some(2), &current).unwrap();
    assert_eq!(to, 2);
    let (to, t) = auto_rollback(&releases, &current).unwrap();
    assert_eq!((to, t[0].image.to_string()), (3, "app@2".to_string()));
    assert!(auto_rollback(&releases[3..], &current).is_none());
}

#[test]
fn declared_changes_name_the_role_and_field() {
    let e = env();
    let t = targets(&e, ("app@1", "sha256:app1"));
    let dead = BTreeSet::new();
    let none = BTreeSet::new();
    let plan = plan(&input(&e, &t, &dead, &none), &mut seq()).unwrap();
    assert!(declared_changes(&plan, &e).is_empty());
    let mut edited = e.clone();
    let app = edited.roles.get_mut("app").unwrap();
    app.env.insert("GREETING".into(), "sneaked-in".into());
    app.size.memory_bytes = 2 << 30;
    let found: Vec<String> = declared_changes(&plan, &edited)
        .iter()
        .map(|c| c.to_string())
        .collect();
    assert_eq!(
        found,
        [
            "`env` of role `app` changed",
            "`size` of role `app` changed"
        ]
    );
    let mut removed = e.clone();
    removed.roles.remove("db");
    removed.subnet = "10.88.2.0/24".parse::<Subnet>().unwrap();
    let found: Vec<String> = declared_changes(&plan, &removed)
        .iter()
        .map(|c| c.to_string())
        .collect();
    assert_eq!(
        found,
        [
            "`subnet` of the environment changed",
            "role `db` was added or removed"
        ]
    );
}

#[test]
fn secret_fingerprints_change_the_spec_hash_only_when_there_are_secrets() {
    let e = env();
    let app = &e.roles["app"];
    let none = std::collections::BTreeMap::new();
    assert_eq!(spec_hash_with_secrets(app, &none), spec_hash(app));
    let one: std::collections::BTreeMap<String, String> =
        [("db_password".to_string(), "b3k:aaaa".to_string())].into();
    let other: std::collections::BTreeMap<String, String> =
        [("db_password".to_string(), "b3k:bbbb".to_string())].into();
    assert_ne!(spec_hash_with_secrets(app, &one), spec_hash(app));
    assert_ne!(
        spec_hash_with_secrets(app, &one),
        spec_hash_with_secrets(app, &other)
    );
    assert_eq!(
        spec_hash_with_secrets(app, &one),
        spec_hash_with_secrets(app, &one.clone())
    );
}

fn swarm_node(id: &str, addr: &str, zone: &str, ports: &[u16]) -> NodeInfo {
    NodeInfo {
        id: id.into(),
        hostname: id.into(),
        address: addr.into(),
        labels: [("zone".to_string(), zone.to_string())].into(),
        manager: id == "n1",
        available: true,
        ports: ports.iter().copied().collect(),
    }
}

fn swarm_env(extra: &str) -> EnvSpec {
    let text = format!(
        "[project]\nname = \"shop\"\n[images.app]\nfrom = \"scratch\"\n[env.prod]\nprovider = {{ swarm = \"unix:///s\", registry = \"h/a\", ports = \"30000-30009\" }}\n[env.prod.roles.app]\nimage = \"app\"\nservers = 4\nports = [8080]\n{extra}"
    );
    kiln_spec::parse(
        &text,
        std::path::Path::new("kiln.toml"),
        &std::env::temp_dir(),
    )
    .unwrap()
    .envs["prod"]
        .clone()
}

fn swarm_plan(env: &EnvSpec, nodes: &[NodeInfo], observed: &[Server]) -> Result<Plan, PlanError> {
    let t = targets(env, ("app@1", "sha256:app1"));
    let none = BTreeSet::new();
    let input = Input {
        env,
        nodes,
        observed,
        ..input(env, &t, &none, &none)
    };
    plan(&input, &mut seq())
}

#[test]
fn swarm_servers_are_spread_over_nodes_with_free_host_ports() {
    let env = swarm_env("");
    // 30000 is taken on n2 by something else.
    let nodes = [
        swarm_node("n1", "10.0.0.11", "a", &[]),
        swarm_node("n2", "10.0.0.12", "b", &[30000]),
    ];
    let p = swarm_plan(&env, &nodes, &[]).unwrap();
    expect![[r#"
        kiln will make these changes to `prod`:

          + app-1000   create   app@1 at 10.0.0.11 on node n1, ports 8080→30000  (new server)
          + app-1001   create   app@1 at 10.0.0.12 on node n2, ports 8080→30001  (new server)
          + app-1002   create   app@1 at 10.0.0.11 on node n1, ports 8080→30001  (new server)
          + app-1003   create   app@1 at 10.0.0.12 on node n2, ports 8080→30002  (new server)

        Plan: 4 to create, 0 to replace, 0 to destroy.
    "#]]
    .assert_eq(&render(&p));

    // A replacement takes the node its server leaves, on a new port (the
    // old server holds its own until it is gone).
    let old: Vec<Server> = p
        .changes
        .iter()
        .map(|c| match c {
            Change::Create(c) => Server {
                node: c.node.clone(),
                published: c.published.clone(),
                ..server(
                    &c.server,
                    "app",
                    c.slot,
                    "app@0",
                    "sha256:app0",
                    "h",
                    &c.address,
                )
            },
            _ => unreachable!("only creates"),
        })
        .collect();
    let nodes = [
        swarm_node("n1", "10.0.0.11", "a", &[30000, 30001]),
        swarm_node("n2", "10.0.0.12", "b", &[30000, 30001, 30002]),
    ];
    let p = swarm_plan(&env, &nodes, &old).unwrap();
    for c in &p.changes {
        let Change::Replace(r) = c else {
            panic!("{c:?}")
        };
        let was = old.iter().find(|s| s.id == r.server).unwrap();
        assert_eq!(r.node, was.node, "{r:?}");
        let node = nodes
            .iter()
            .find(|n| Some(&n.id) == r.node.as_ref())
            .unwrap();
        assert!(!node.ports.contains(&r.published[&8080]), "{r:?}");
    }
}

#[test]
fn swarm_placement_obeys_constraints_availability_and_port_range() {
    let env = swarm_env("placement = [\"node.labels.zone==a\"]\n");
    let mut nodes = [
        swarm_node(
            "n1",
            "10.0.0.11",
            "a",
            &[30004, 30005, 30006, 30007, 30008, 30009],
        ),
        swarm_node("n2", "10.0.0.12", "b", &[]),
    ];
    // Only n1 is in zone a, and it has four free ports for four servers.
    let p = swarm_plan(&env, &nodes, &[]).unwrap();
    assert!(p
        .changes
        .iter()
        .all(|c| matches!(c, Change::Create(c) if c.node.as_deref() == Some("n1"))));
    nodes[0].ports.insert(30003);
    assert_eq!(
        swarm_plan(&env, &nodes, &[]).unwrap_err(),
        PlanError::PortsFull {
            role: "app".into(),
            node: "n1".into(),
            first: 30000,
            last: 30009
        }
    );
    nodes[0].available = false;
    assert_eq!(
        swarm_plan(&env, &nodes, &[]).unwrap_err().to_string(),
        "no node can take a server of role `app`: no available node meets its placement constraints (node.labels.zone==a)"
    );
}
