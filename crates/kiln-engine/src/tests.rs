//! Hermetic engine tests: a real SQLite state and a real image store on a
//! temporary directory, images written by hand, and the scriptable
//! in-memory provider. Update snapshots with `UPDATE_EXPECT=1`.

use std::cell::RefCell;
use std::time::Duration;

use expect_test::expect;
use kiln_image::store::{Inputs, Outcome as BuildOutcome, VersionRecord};
use kiln_model::{Outcome, ServerStatus};
use kiln_provider::fake::Fake;
use kiln_provider::{Inspection, Provider, Written};

use super::*;
use crate::drift::FindingKind;

const SPEC: &str = r#"
[project]
name = "t"
[images.base]
from = "scratch"
[images.app]
from = "scratch"
[env.staging]
subnet = "10.88.1.0/24"
dns = { ttl = "0s" }
[env.staging.roles.db]
image = "base"
servers = 1
volumes = { data = "/var/lib/db" }
[env.staging.roles.app]
image = "app"
servers = 2
depends_on = ["db"]
health = { tcp = 8080 }
env = { GREETING = "reviewed" }
"#;

struct World {
    _dir: tempfile::TempDir,
    project: Project,
    store: Store,
    state: State,
    fake: Fake,
    seq: RefCell<u16>,
}

/// Writes version `version` of `name` into the store: config, empty seal, root.
fn image(store: &Store, name: &str, version: u32) {
    let config = serde_json::json!({"architecture": "amd64", "os": "linux", "config": {"Entrypoint": ["/bin/app"], "Env": ["A=1", "GREETING=image"]}, "rootfs": {"type": "layers", "diff_ids": []}});
    let (config, _) = store.put_json(&config).unwrap();
    let seal = kiln_image::seal::Seal::from_entries(vec![]);
    let (seal_digest, _) = store.put_json(&seal).unwrap();
    let manifest = store
        .put_blob(format!("manifest {name} {version}").as_bytes())
        .unwrap();
    std::fs::create_dir_all(store.root_path(&manifest)).unwrap();
    let rec = VersionRecord {
        name: name.into(),
        version,
        digest: manifest,
        parent: None,
        parent_digest: None,
        created: "now".into(),
        size: 0,
        outcome: BuildOutcome::Ok,
        error: None,
        seal_root: seal.root.clone(),
        seal: seal_digest,
        config,
        layers: vec![],
        inputs: Inputs {
            source: "scratch".into(),
            files: vec![],
            scripts: vec![],
            tests: 0,
            cache_key: format!("{name}{version}"),
        },
        build_ms: 0,
        user: None,
    };
    store.put_version(&rec).unwrap();
    store.set_current(name, version).unwrap();
}

fn world_with(spec: &str) -> World {
    let dir = tempfile::tempdir().unwrap();
    let project = kiln_spec::parse(spec, std::path::Path::new("kiln.toml"), dir.path()).unwrap();
    let store = Store::open(dir.path().join(".kiln")).unwrap();
    image(&store, "base", 1);
    image(&store, "app", 1);
    let state = State::open(&dir.path().join(".kiln/state.db")).unwrap();
    World {
        _dir: dir,
        project,
        store,
        state,
        fake: Fake::default(),
        seq: RefCell::new(0),
    }
}

fn world() -> World {
    world_with(SPEC)
}

impl World {
    fn engine(&self) -> Engine<'_> {
        Engine {
            project: &self.project,
            store: &self.store,
            state: &self.state,
            provider: &self.fake,
            progress: &|_| {},
            clock: &|| 1_000,
            options: Options {
                health_timeout: Duration::from_millis(50),
                health_interval: Duration::from_millis(1),
                heal_probes: 3,
                heal_spacing: Duration::from_millis(1),
                forget: false,
            },
        }
    }

    fn random(&self) -> impl FnMut() -> u16 + '_ {
        || {
            *self.seq.borrow_mut() += 1;
            *self.seq.borrow()
        }
    }

    fn plan(&self) -> Plan {
        self.engine()
            .plan("staging", PlanKind::Apply, &mut self.random())
            .unwrap()
    }

    fn apply(&self) -> Applied {
        self.engine().apply(&self.plan()).unwrap()
    }

    fn ids(&self) -> Vec<String> {
        self.state
            .servers(Some("staging"))
            .unwrap()
            .into_iter()
            .map(|s| format!("{} {} {}", s.id, s.image, s.status.as_str()))
            .collect()
    }

    /// The detail of each event recorded for staging.
    fn events(&self) -> Vec<String> {
        self.state
            .events("staging")
            .unwrap()
            .into_iter()
            .map(|e| e.detail)
            .collect()
    }

    fn app_mut(&mut self) -> &mut kiln_model::RoleSpec {
        self.project
            .envs
            .get_mut("staging")
            .unwrap()
            .roles
            .get_mut("app")
            .unwrap()
    }
}

#[test]
fn apply_creates_in_dependency_order_and_converges() {
    let w = world();
    w.apply();
    assert_eq!(
        *w.fake.calls.borrow(),
        [
            "prepare app@1",
            "prepare base@1",
            "create db-0001",
            "create app-0002",
            "create app-0003"
        ]
    );
    assert_eq!(
        w.ids(),
        [
            "app-0002 app@1 running",
            "app-0003 app@1 running",
            "db-0001 base@1 running"
        ]
    );
    assert!(w.plan().is_empty(), "a second plan has nothing to do");
    let releases = w.state.releases("staging").unwrap();
    let last = releases.last().unwrap();
    assert_eq!(
        (last.outcome, last.kind),
        (Outcome::Succeeded, PlanKind::Apply)
    );
    assert_eq!(last.targets.len(), 2, "the release keeps its targets");
    assert_eq!(w.state.steps("staging", last.id).unwrap().len(), 3);
}

#[test]
fn servers_launch_from_what_the_plan_carries() {
    let mut w = world();
    let plan = w.plan();
    // kiln.toml is edited after planning: a saved plan is refused, naming
    // the role and every field that changed.
    w.app_mut()
        .env
        .insert("GREETING".into(), "sneaked-in".into());
    w.app_mut().size.memory_bytes = 2 << 30;
    let err = w.engine().check_saved(&plan, "staging").unwrap_err();
    assert_eq!(
        err.to_string(),
        "the plan no longer matches kiln.toml: `env` of role `app` changed, `size` of role `app` changed; plan again (and have it approved again)"
    );
    // Even executed as it is, the plan launches only what it carries: the
    // environment and size reviewed at planning time.
    w.engine().apply(&plan).unwrap();
    let requests = w.fake.requests.borrow();
    let app = requests.iter().find(|r| r.role == "app").unwrap();
    assert!(
        app.launch.env.contains(&"GREETING=reviewed".to_string()),
        "{:?}",
        app.launch.env
    );
    assert!(
        app.launch.env.contains(&"A=1".to_string()),
        "the image's env is kept"
    );
    assert_eq!(app.size.memory_bytes, 256 << 20);
    assert_eq!(app.launch.argv, ["/bin/app"]);
}

#[test]
fn saved_plans_of_other_formats_kinds_or_roles_are_refused() {
    let w = world();
    let plan = w.plan();
    let future = Plan {
        format: 99,
        ..plan.clone()
    };
    assert!(matches!(
        w.engine().check_saved(&future, "staging"),
        Err(EngineError::Format { found: 99, .. })
    ));
    let reconcile = Plan {
        kind: PlanKind::Reconcile,
        ..plan.clone()
    };
    assert!(matches!(
        w.engine().check_saved(&reconcile, "staging"),
        Err(EngineError::NotSavable { .. })
    ));
    let mut ghost = plan.clone();
    ghost.targets.retain(|t| t.role != "app");
    assert!(matches!(
        w.engine().check_saved(&ghost, "staging"),
        Err(EngineError::UnknownRole { ref role }) if role == "app"
    ));
    assert!(matches!(
        w.engine().check_saved(&plan, "production"),
        Err(EngineError::WrongEnv { .. })
    ));
}

#[test]
fn new_image_replaces_create_first() {
    let w = world();
    w.apply();
    image(&w.store, "app", 2);
    w.fake.calls.borrow_mut().clear();
    w.apply();
    assert_eq!(
        *w.fake.calls.borrow(),
        [
            "prepare app@2",
            "create app-0004",
            "destroy app-0002",
            "create app-0005",
            "destroy app-0003"
        ]
    );
    assert_eq!(
        w.ids(),
        [
            "app-0004 app@2 running",
            "app-0005 app@2 running",
            "db-0001 base@1 running"
        ]
    );
}

#[test]
fn stale_plan_is_refused() {
    let w = world();
    let plan = w.plan();
    w.apply();
    let err = w.engine().apply(&plan).unwrap_err();
    assert!(matches!(err, EngineError::Stale { .. }), "{err}");
}

#[test]
fn a_failed_prepare_changes_nothing() {
    let w = world();
    let digest = w.store.current_record("app").unwrap().digest.0;
    w.fake.fail_prepare.borrow_mut().insert(digest);
    let err = w.engine().apply(&w.plan()).unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot make image app@1 available"),
        "{err}"
    );
    assert!(w.state.servers(None).unwrap().is_empty());
    assert!(!w
        .fake
        .calls
        .borrow()
        .iter()
        .any(|c| c.starts_with("create")));
}

#[test]
fn unhealthy_server_fails_rolls_back_and_keeps_the_old_ones() {
    let w = world();
    w.apply();
    image(&w.store, "app", 2);
    let bad = w.store.current_record("app").unwrap().digest.0;
    w.fake.unhealthy_images.borrow_mut().insert(bad);
    let plan = w.plan();
    let err = w.engine().run(&plan, &mut w.random()).unwrap_err();
    // The first new server failed before anything changed: nothing to roll back.
    assert!(
        matches!(err, EngineError::Unhealthy { ref role, .. } if role == "app"),
        "{err}"
    );
    assert_eq!(
        w.ids(),
        [
            "app-0002 app@1 running",
            "app-0003 app@1 running",
            "db-0001 base@1 running"
        ]
    );
    assert!(
        !w.fake.servers.borrow().contains_key("app-0004"),
        "the unhealthy server was removed"
    );
    let kinds: Vec<(PlanKind, Outcome)> = w
        .state
        .releases("staging")
        .unwrap()
        .iter()
        .map(|r| (r.kind, r.outcome))
        .collect();
    assert_eq!(
        kinds,
        [
            (PlanKind::Apply, Outcome::Succeeded),
            (PlanKind::Apply, Outcome::Failed)
        ],
        "nothing changed before the failure, so nothing was rolled back by a release"
    );
}

#[test]
fn crash_leftovers_are_planned_cleaned_and_converged() {
    let w = world();
    w.apply();
    // A crash mid-create: a row in `creating`; a stray sandbox the state
    // never heard of; a server whose process died.
    let mut half = w.state.server("app-0002").unwrap().unwrap();
    half.id = "app-dead".into();
    half.status = ServerStatus::Creating;
    half.address = "10.88.1.99".into();
    w.state.put_server(&half).unwrap();
    w.fake.start_stray("staging", "app", "app-stray");
    w.fake.crash("app-0003");
    let plan = w.plan();
    expect![[r#"
        kiln will make these changes to `staging`:

          - app-dead   destroy  (half-created by an interrupted apply)
          - app-0003   destroy  (its process is gone)
          - app-stray  destroy  (stray: labelled with the environment, unknown to the state)
          + app-0004   create   app@1 at 10.88.1.5  (slot 1 has no running server)

        Plan: 1 to create, 0 to replace, 3 to destroy.
    "#]]
    .assert_eq(&kiln_planner::render(&plan));
    w.engine().apply(&plan).unwrap();
    let ids = w.ids();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert!(ids.iter().all(|s| s.ends_with("running")));
    assert_eq!(
        w.fake.servers.borrow().len(),
        3,
        "no orphan left in the runtime"
    );
    assert!(w.plan().is_empty());
    let events = w.events();
    assert!(
        events.iter().any(|e| e.contains("removed server app-dead")),
        "{events:?}"
    );
}

#[test]
fn a_held_lock_refuses_a_second_writer() {
    let w = world();
    let _held = w.state.lock("staging", "apply").unwrap();
    let other = State::open(w.state.path()).unwrap();
    let engine = Engine {
        state: &other,
        ..w.engine()
    };
    let err = engine.apply(&w.plan()).unwrap_err();
    assert!(err.to_string().contains("is locked by"), "{err}");
}

#[test]
fn tampered_image_is_refused_at_launch() {
    let w = world();
    let rec = w.store.current_record("app").unwrap();
    std::fs::write(w.store.root_path(&rec.digest).join("implant"), "x").unwrap();
    let err = w.engine().apply(&w.plan()).unwrap_err();
    assert!(matches!(err, EngineError::Tampered { .. }), "{err}");
    assert!(w.fake.calls.borrow().is_empty(), "nothing was launched");
}

#[test]
fn approvals_gate_apply_but_not_rollback_or_reconcile() {
    let mut w = world();
    w.project.envs.get_mut("staging").unwrap().approvals = 1;
    let mut plan = w.plan();
    plan.author = "alice".into();
    // Unapproved: refused before anything runs, and the refusal is audited.
    let err = w.engine().apply(&plan).unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::NotApproved {
                required: 1,
                have: 0,
                ..
            }
        ),
        "{err}"
    );
    assert!(w.fake.calls.borrow().is_empty());
    let last = w.state.audit(Some("staging")).unwrap().pop().unwrap();
    assert!(
        last.outcome
            .starts_with("failed: `staging` needs 1 approval"),
        "{}",
        last.outcome
    );
    // The author cannot approve their own plan.
    assert!(matches!(
        w.engine().approve(&plan, "alice").unwrap_err(),
        EngineError::SelfApproval { .. }
    ));
    // An edited plan is another plan: approving the original does not cover it.
    assert_eq!(w.engine().approve(&plan, "bob").unwrap(), ["bob"]);
    let mut edited = plan.clone();
    edited.changes.pop();
    assert!(matches!(
        w.engine().apply(&edited).unwrap_err(),
        EngineError::NotApproved { have: 0, .. }
    ));
    // A second approval by the same person counts once.
    assert_eq!(w.engine().approve(&plan, "bob").unwrap(), ["bob"]);
    w.engine().apply(&plan).unwrap();
    assert_eq!(w.state.servers(Some("staging")).unwrap().len(), 3);
    // Once applied, the generation moved: the plan cannot be approved again.
    assert!(matches!(
        w.engine().approve(&plan, "carol").unwrap_err(),
        EngineError::Stale { .. }
    ));
    assert!(
        w.engine().check_approved(&w.plan()).is_ok(),
        "an empty plan needs nothing"
    );
    image(&w.store, "app", 2);
    let next = w.plan();
    assert!(!next.is_empty());
    for kind in [
        PlanKind::Apply,
        PlanKind::DeployCold,
        PlanKind::Destroy,
        PlanKind::Promote,
    ] {
        let p = Plan {
            kind,
            ..next.clone()
        };
        assert!(w.engine().check_approved(&p).is_err(), "{kind}");
    }
    for kind in [
        PlanKind::Rollback,
        PlanKind::AutoRollback,
        PlanKind::Reconcile,
    ] {
        let p = Plan {
            kind,
            ..next.clone()
        };
        assert!(w.engine().check_approved(&p).is_ok(), "{kind}");
        // ... and no file can carry such a plan past the gate.
        assert!(matches!(
            w.engine().check_saved(&p, "staging"),
            Err(EngineError::NotSavable { .. })
        ));
    }
}

#[test]
fn destroy_takes_dependents_down_first_and_tears_down() {
    let w = world();
    w.apply();
    let plan = w.engine().plan_destroy("staging").unwrap();
    let order: Vec<&str> = plan.changes.iter().map(|c| c.server()).collect();
    assert_eq!(
        order,
        ["app-0002", "app-0003", "db-0001"],
        "app depends on db: it goes first"
    );
    w.fake.calls.borrow_mut().clear();
    w.engine().apply(&plan).unwrap();
    assert_eq!(
        *w.fake.calls.borrow(),
        [
            "destroy app-0002",
            "destroy app-0003",
            "destroy db-0001",
            "remove balancer app",
            "remove balancer db",
            "teardown staging"
        ]
    );
    // The order follows depends_on, not names: make db depend on app.
    let mut w = world();
    let staging = w.project.envs.get_mut("staging").unwrap();
    staging.roles.get_mut("app").unwrap().depends_on.clear();
    staging.roles.get_mut("db").unwrap().depends_on = vec!["app".into()];
    w.apply();
    let plan = w.engine().plan_destroy("staging").unwrap();
    let roles: Vec<&str> = plan.changes.iter().map(|c| c.role()).collect();
    assert_eq!(roles, ["db", "app", "app"]);
}

#[test]
fn rollback_returns_to_the_previous_release_targets() {
    let mut w = world();
    w.apply();
    image(&w.store, "app", 2);
    w.app_mut().env.insert("GREETING".into(), "v2".into());
    w.apply();
    let plan = w
        .engine()
        .plan_rollback("staging", None, &mut w.random())
        .unwrap();
    assert_eq!(plan.rollback_to, Some(1));
    let app = plan.target("app").unwrap();
    assert_eq!(app.image.to_string(), "app@1");
    assert!(
        app.launch.env.contains(&"GREETING=reviewed".to_string()),
        "the release's own spec comes back, not today's"
    );
    w.fake.requests.borrow_mut().clear();
    w.engine().run(&plan, &mut w.random()).unwrap();
    let released = w.state.releases("staging").unwrap();
    assert_eq!(released.last().unwrap().kind, PlanKind::Rollback);
    assert!(w
        .fake
        .requests
        .borrow()
        .iter()
        .all(|r| r.image.to_string() == "app@1"));
}

fn fronted(strategy: &str) -> World {
    let spec = SPEC.replace(
        "env = { GREETING = \"reviewed\" }",
        &format!("env = {{ GREETING = \"reviewed\" }}\nballancer_placeholder = 1\n{strategy}"),
    );
    let spec = spec.replace(
        "ballancer_placeholder = 1",
        "balancer = { listen = \"127.0.0.1:8000\", port = 8080, drain_timeout = \"1s\" }",
    );
    world_with(&spec)
}

#[test]
fn canary_gate_fails_on_the_balancers_error_rate_and_the_old_servers_stay() {
    let w = fronted(
        "strategy = { kind = \"canary\", share = 50, bake = \"1s\", max_error_rate = 0.1 }",
    );
    w.apply();
    assert_eq!(
        w.fake.backends("staging", "app"),
        ["10.88.1.3:8080", "10.88.1.4:8080"]
    );
    image(&w.store, "app", 2);
    let plan = w.plan();
    // The canary (the first replacement) answers one request in two with a 5xx.
    let canary = match &plan.changes[0] {
        Change::Replace(r) => format!("{}:8080", r.address),
        other => panic!("{other:?}"),
    };
    w.fake.traffic.borrow_mut().insert(canary.clone(), (10, 5));
    let err = w.engine().run(&plan, &mut w.random()).unwrap_err();
    assert!(
        matches!(err, EngineError::CanaryFailed { .. }) && err.to_string().contains("above 0.1"),
        "{err}"
    );
    assert_eq!(
        w.fake.backends("staging", "app"),
        ["10.88.1.3:8080", "10.88.1.4:8080"],
        "the old servers serve, the canary is gone"
    );
    assert!(
        w.fake.calls.borrow().contains(&format!("drain {canary}")),
        "drained before destroyed"
    );
}

#[test]
fn canary_that_stays_clean_rolls_the_rest() {
    let w = fronted(
        "strategy = { kind = \"canary\", share = 50, bake = \"0s\", max_error_rate = 0.1 }",
    );
    w.apply();
    image(&w.store, "app", 2);
    w.engine().run(&w.plan(), &mut w.random()).unwrap();
    assert!(w
        .ids()
        .iter()
        .filter(|s| s.starts_with("app"))
        .all(|s| s.contains("app@2")));
}

#[test]
fn reconcile_restarts_a_dead_balancer() {
    let w = fronted("");
    w.apply();
    w.fake.kill_balancer("staging", "app");
    let report = w.engine().drift("staging", false).unwrap();
    assert!(report
        .findings
        .iter()
        .any(|f| f.server == "balancer:app" && f.kind == FindingKind::Config));
    let dry = w
        .engine()
        .reconcile("staging", true, &mut w.random())
        .unwrap();
    assert_eq!(dry.balancers_restarted, ["app"]);
    assert!(
        !w.fake.balancer("staging", "app").unwrap().alive,
        "a dry run changes nothing"
    );
    let pass = w
        .engine()
        .reconcile("staging", false, &mut w.random())
        .unwrap();
    assert_eq!(pass.balancers_restarted, ["app"]);
    assert!(w.fake.balancer("staging", "app").unwrap().alive);
    let events = w.events();
    assert!(
        events
            .iter()
            .any(|e| e.contains("restarted the balancer of `app`")),
        "{events:?}"
    );
}

#[test]
fn a_balancer_that_missed_a_switch_is_drift_and_reconcile_brings_it_up_to_date() {
    let w = fronted("");
    w.apply();
    w.fake.leave_behind("staging", "app", "app-lb-n2");
    let report = w.engine().drift("staging", false).unwrap();
    let finding = report
        .findings
        .iter()
        .find(|f| f.server == "balancer:app")
        .expect("a finding for the balancer");
    assert_eq!(finding.kind, FindingKind::Config);
    assert!(finding.detail.contains("`app-lb-n2`"), "{}", finding.detail);
    let pass = w
        .engine()
        .reconcile("staging", false, &mut w.random())
        .unwrap();
    assert_eq!(pass.balancers_restarted, ["app"]);
    assert!(w.fake.balancer("staging", "app").unwrap().behind.is_empty());
    assert!(w
        .engine()
        .drift("staging", false)
        .unwrap()
        .findings
        .is_empty());
    let events = w.events();
    assert!(
        events
            .iter()
            .any(|e| e.contains("brought the balancer of `app` up to date (app-lb-n2")),
        "{events:?}"
    );
}

#[test]
fn drift_reads_what_the_provider_sees() {
    let mut w = fronted("");
    w.app_mut().watch = vec!["/etc/app".into()];
    w.apply();
    let written = |path: &str, executable: bool, setid: bool, in_volume: bool| Written {
        path: path.into(),
        executable,
        setid,
        in_volume,
    };
    w.fake.inspections.borrow_mut().insert(
        "app-0002".into(),
        Inspection {
            foreign_processes: vec!["4242: /bin/sh".into()],
            written: vec![
                written("/tmp/cache.db", false, false, false),
                written("/tmp/x", true, false, false),
                written("/etc/app/conf", false, false, false),
            ],
            listening: vec![8080, 4444],
            image_digest: Some(w.state.server("app-0002").unwrap().unwrap().image_digest),
            ..Inspection::default()
        },
    );
    w.fake.inspections.borrow_mut().insert(
        "db-0001".into(),
        Inspection {
            written: vec![
                written("/var/lib/db/base/1", false, false, true),
                written("/var/lib/db/suid", false, true, true),
            ],
            memory_limit: Some(1),
            ..Inspection::default()
        },
    );
    w.fake
        .file_differences
        .borrow_mut()
        .insert("app-0003".into(), vec!["changed /bin/app (content)".into()]);
    w.fake.add_backend("staging", "app", "10.88.1.99:8080");
    w.fake.start_stray("staging", "app", "app-beef");
    let report = w.engine().drift("staging", false).unwrap();
    expect![[r#"
        DRIFT in `staging`: 9 findings on 5 servers
          10.88.1.99:8080
            unmanaged balancer of `staging` role `app` routes to it, but no running server of the state has this address
          app-0002
            writable  file written under a watched path /etc/app/conf
            writable  new executable /tmp/x
            process   process not started by the entrypoint (an interactive login?): 4242: /bin/sh
            config    listens on TCP port 4444, which the role does not declare (ports = [])
          app-0003
            files     changed /bin/app (content)
          app-beef
            unmanaged sandbox labelled `staging` (role `app`) that the state does not know
          db-0001
            writable  new setuid/setgid file /var/lib/db/suid
            config    memory limit 1 bytes, declared 268435456
    "#]]
    .assert_eq(&drift::render(&report));
    let files = report
        .findings
        .iter()
        .find(|f| f.kind == FindingKind::Files)
        .unwrap();
    assert_eq!(
        (files.role.as_deref(), files.path.as_deref()),
        (Some("app"), Some("/bin/app"))
    );
    assert!(
        !report
            .findings
            .iter()
            .any(|f| f.detail.contains("cache.db") || f.detail.contains("base/1")),
        "ordinary data is not drift"
    );
}

#[test]
fn reconcile_replaces_hung_servers_within_the_share() {
    let w = world();
    w.apply();
    // Both app servers run but fail every health check.
    w.fake
        .hung
        .borrow_mut()
        .extend(["app-0002".to_string(), "app-0003".to_string()]);
    let dry = w
        .engine()
        .reconcile("staging", true, &mut w.random())
        .unwrap();
    assert_eq!(
        dry.forced.len(),
        1,
        "replace_share (25% of 2) lets one go per pass: {:?}",
        dry.forced
    );
    let (id, why) = dry.forced.iter().next().unwrap();
    assert!(
        why.starts_with("self-heal: failed 3 health checks in a row"),
        "{why}"
    );
    assert_eq!(dry.plan.changes.len(), 1);
    assert!(
        w.fake
            .calls
            .borrow()
            .iter()
            .all(|c| !c.starts_with("destroy")),
        "a dry run changes nothing"
    );
    // db has no health check: never judged unhealthy.
    assert!(!dry.forced.contains_key("db-0001"));
    let id = id.clone();
    let pass = w
        .engine()
        .reconcile("staging", false, &mut w.random())
        .unwrap();
    assert!(pass.release.is_some());
    assert!(
        w.fake.calls.borrow().contains(&format!("destroy {id}")),
        "{:?}",
        w.fake.calls.borrow()
    );
    // A server that answers even once is not replaced.
    w.fake.hung.borrow_mut().clear();
    assert!(w
        .engine()
        .reconcile("staging", true, &mut w.random())
        .unwrap()
        .forced
        .is_empty());
}

#[test]
fn reconcile_kills_drifted_servers_into_quarantine_and_strays_by_policy() {
    let w = world_with(&SPEC.replace(
        "[env.staging]\n",
        "[env.staging]\ndrift = \"kill\"\nunmanaged = \"kill\"\n",
    ));
    w.apply();
    w.fake
        .file_differences
        .borrow_mut()
        .insert("app-0002".into(), vec!["added /bin/implant".into()]);
    w.fake.start_stray("staging", "app", "app-beef");
    let pass = w
        .engine()
        .reconcile("staging", false, &mut w.random())
        .unwrap();
    assert_eq!(pass.quarantined, ["app-0002"]);
    let kept = w.fake.quarantined.borrow();
    assert!(
        kept["app-0002"].1.contains("/bin/implant"),
        "{:?}",
        kept["app-0002"]
    );
    assert!(
        !w.fake.servers.borrow().contains_key("app-beef"),
        "the stray was killed"
    );
    assert!(!w.fake.servers.borrow().contains_key("app-0002"));
    let stray_alarm = world();
    stray_alarm.apply();
    stray_alarm.fake.start_stray("staging", "app", "app-beef");
    let pass = stray_alarm
        .engine()
        .reconcile("staging", false, &mut stray_alarm.random())
        .unwrap();
    assert!(
        pass.plan.is_empty(),
        "`alarm` leaves it: {}",
        kiln_planner::render(&pass.plan)
    );
    assert!(stray_alarm.fake.servers.borrow().contains_key("app-beef"));
}

#[test]
fn drift_report_renders_grouped_by_server() {
    use crate::drift::{render, Finding, Report};
    let f = |server: &str, kind: FindingKind, detail: &str| Finding {
        server: server.into(),
        kind,
        role: None,
        path: None,
        detail: detail.into(),
    };
    let report = Report {
        env: "staging".into(),
        checked_at: 1_000,
        servers: 3,
        images_verified: vec!["web@2".into()],
        findings: vec![
            f("web-0001", FindingKind::Files, "changed /srv/www/index.html (content)"),
            f("web-0001", FindingKind::Process, "process not started by the entrypoint (an interactive login?): 4242: /bin/sleep 300"),
            f("web-0002", FindingKind::Config, "listens on TCP port 4444, which the role does not declare (ports = [8080])"),
            f("10.88.1.99:8080", FindingKind::Unmanaged, "balancer of `staging` role `web` routes to it, but no running server of the state has this address"),
        ],
        ignored: 1,
        warnings: vec![],
    };
    expect![[r#"
        DRIFT in `staging`: 4 findings on 3 servers (1 ignored)
          web-0001
            files     changed /srv/www/index.html (content)
            process   process not started by the entrypoint (an interactive login?): 4242: /bin/sleep 300
          web-0002
            config    listens on TCP port 4444, which the role does not declare (ports = [8080])
          10.88.1.99:8080
            unmanaged balancer of `staging` role `web` routes to it, but no running server of the state has this address
    "#]]
    .assert_eq(&render(&report));
    let clean = Report {
        findings: vec![],
        ignored: 0,
        ..report
    };
    expect![[r#"
        no drift in `staging`: 3 servers match their declaration (1 image versions verified).
    "#]]
    .assert_eq(&render(&clean));
}

#[test]
fn subnets_in_use_elsewhere_move_or_are_refused() {
    // Derived from names: moved to the next free /24 of the default pool.
    let w = world_with(&SPEC.replace("subnet = \"10.88.1.0/24\"\n", ""));
    let derived = w.project.envs["staging"].subnet;
    assert!(derived.pool_index().is_some(), "{derived}");
    w.fake
        .conflicts
        .borrow_mut()
        .insert(derived, "interface eth9 (10.64.0.1/24)".into());
    let plan = w.plan();
    assert_ne!(plan.target.subnet, derived);
    assert_eq!(
        plan.target.subnet.pool_index(),
        derived
            .pool_index()
            .map(|i| (i + 1) % kiln_model::DEFAULT_POOL)
    );
    assert!(w
        .engine()
        .check_saved(
            &Plan {
                kind: PlanKind::Apply,
                ..plan
            },
            "staging"
        )
        .is_ok());
    // Declared: refused, naming who uses it.
    let w = world();
    let declared = w.project.envs["staging"].subnet;
    w.fake
        .conflicts
        .borrow_mut()
        .insert(declared, "kiln environment /srv/other/.kiln:staging".into());
    let err = w
        .engine()
        .plan("staging", PlanKind::Apply, &mut w.random())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "subnet 10.88.1.0/24 of `staging` is in use by kiln environment /srv/other/.kiln:staging; declare another `subnet` for `staging`"
    );
}

#[test]
fn roles_and_servers_are_named_in_dns_and_withdrawn_before_they_stop() {
    let w = world();
    w.apply();
    let names = w.fake.names.borrow()["staging"].clone();
    let app = &names.names["app"];
    assert_eq!(app.len(), 2, "{names:?}");
    assert_eq!(&names.names["app.staging"], app);
    assert_eq!(names.names["db-0001"].len(), 1);
    assert_eq!(names.ttl_secs, 0);
    drop(names);
    // A replacement: the old server leaves the name before it is destroyed.
    image(&w.store, "app", 2);
    w.apply();
    let after = w.fake.names.borrow()["staging"].clone();
    assert!(
        !after.names.contains_key("app-0002"),
        "destroyed servers lose their name"
    );
    let now: Vec<String> = after.names["app"].iter().map(|a| a.to_string()).collect();
    let servers = w.state.servers(Some("staging")).unwrap();
    let expected: Vec<String> = servers
        .iter()
        .filter(|s| s.role == "app")
        .map(|s| s.address.clone())
        .collect();
    assert_eq!(now, expected);
}
