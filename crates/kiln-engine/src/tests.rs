//! Hermetic engine tests: a real SQLite state and a real image store on a
//! temporary directory, images written by hand, and the in-memory provider.

use std::cell::RefCell;

use kiln_image::store::{Digest, Inputs, Outcome, VersionRecord};
use kiln_provider::fake::Fake;

use super::*;

const SPEC: &str = r#"
[project]
name = "t"
[images.base]
from = "scratch"
[images.app]
from = "scratch"
[env.staging]
[env.staging.roles.db]
image = "base"
servers = 1
[env.staging.roles.app]
image = "app"
servers = 2
depends_on = ["db"]
health = { tcp = 8080 }
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
    let config = serde_json::json!({"architecture": "amd64", "os": "linux", "config": {"Entrypoint": ["/bin/app"], "Env": ["A=1"]}, "rootfs": {"type": "layers", "diff_ids": []}});
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
        outcome: Outcome::Ok,
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
    };
    store.put_version(&rec).unwrap();
    store.set_current(name, version).unwrap();
}

fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let project = kiln_spec::parse(SPEC, std::path::Path::new("kiln.toml"), dir.path()).unwrap();
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
            },
        }
    }
    fn plan(&self) -> Plan {
        let mut r = || {
            *self.seq.borrow_mut() += 1;
            *self.seq.borrow()
        };
        self.engine().plan("staging", false, &mut r).unwrap()
    }
    fn ids(&self) -> Vec<String> {
        self.state
            .servers(Some("staging"))
            .unwrap()
            .into_iter()
            .map(|s| format!("{} {} {}", s.id, s.image, s.status.as_str()))
            .collect()
    }
}

#[test]
fn apply_creates_in_dependency_order_and_converges() {
    let w = world();
    let plan = w.plan();
    w.engine().apply(&plan, "apply").unwrap();
    assert_eq!(
        *w.fake.calls.borrow(),
        ["create db-0001", "create app-0002", "create app-0003"]
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
    assert_eq!(releases.last().unwrap().outcome, "succeeded");
    assert_eq!(
        w.state
            .steps("staging", releases.last().unwrap().id)
            .unwrap()
            .len(),
        3
    );
}

#[test]
fn new_image_replaces_create_first() {
    let w = world();
    w.engine().apply(&w.plan(), "apply").unwrap();
    image(&w.store, "app", 2);
    w.fake.calls.borrow_mut().clear();
    w.engine().apply(&w.plan(), "apply").unwrap();
    assert_eq!(
        *w.fake.calls.borrow(),
        [
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
    w.engine().apply(&w.plan(), "apply").unwrap();
    let err = w.engine().apply(&plan, "apply").unwrap_err();
    assert!(matches!(err, EngineError::Stale { .. }), "{err}");
}

#[test]
fn unhealthy_server_fails_and_keeps_the_old_ones() {
    let w = world();
    w.engine().apply(&w.plan(), "apply").unwrap();
    image(&w.store, "app", 2);
    let bad = w.store.current_record("app").unwrap().digest.0;
    w.fake.unhealthy_images.borrow_mut().insert(bad);
    let err = w.engine().apply(&w.plan(), "apply").unwrap_err();
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
    assert_eq!(
        w.state.releases("staging").unwrap().last().unwrap().outcome,
        "failed"
    );
}

#[test]
fn crash_leftovers_are_cleaned_and_converged() {
    let w = world();
    w.engine().apply(&w.plan(), "apply").unwrap();
    // A crash mid-create: a row in `creating` and its sandbox; a stray
    // sandbox the state never heard of; a server whose process died.
    let mut half = w.state.server("app-0002").unwrap().unwrap();
    half.id = "app-dead".into();
    half.status = ServerStatus::Creating;
    half.address = "10.88.1.99".into();
    w.state.put_server(&half).unwrap();
    let req = w
        .engine()
        .request(
            "staging",
            &Change {
                address: Some("10.88.1.98".into()),
                image: Some("app@1".into()),
                ..Change::new(Action::Create, "app", "app-stray", 0, "")
            },
            "app-stray",
            1,
        )
        .unwrap();
    w.fake.create(&req).unwrap();
    w.fake
        .servers
        .borrow_mut()
        .get_mut("app-0003")
        .unwrap()
        .alive = false;
    let plan = w.plan();
    assert_eq!(
        kiln_planner::render(&plan)
            .lines()
            .filter(|l| l.starts_with("  +"))
            .count(),
        1,
        "{}",
        kiln_planner::render(&plan)
    );
    w.engine().apply(&plan, "apply").unwrap();
    let ids = w.ids();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert!(ids.iter().all(|s| s.ends_with("running")));
    assert_eq!(
        w.fake.servers.borrow().len(),
        3,
        "no orphan left in the runtime"
    );
    assert!(w.plan().is_empty());
    let events: Vec<String> = w
        .state
        .events("staging")
        .unwrap()
        .into_iter()
        .map(|e| e.detail)
        .collect();
    assert!(
        events.iter().any(|e| e.contains("stray server app-stray")),
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
    let err = engine.apply(&w.plan(), "apply").unwrap_err();
    assert!(err.to_string().contains("is locked by"), "{err}");
}

#[test]
fn tampered_image_is_refused_at_launch() {
    let w = world();
    let rec = w.store.current_record("app").unwrap();
    std::fs::write(w.store.root_path(&rec.digest).join("implant"), "x").unwrap();
    let err = w.engine().apply(&w.plan(), "apply").unwrap_err();
    assert!(matches!(err, EngineError::Tampered { .. }), "{err}");
    assert!(w.fake.calls.borrow().is_empty(), "nothing was launched");
    let _ = Digest::of(b"");
}

#[test]
fn approvals_gate_apply_but_not_rollback_or_reconcile() {
    let mut w = world();
    w.project.envs.get_mut("staging").unwrap().approvals = 1;
    let mut plan = w.plan();
    plan.author = "alice".into();
    // Unapproved: refused before anything runs, and the refusal is audited.
    let err = w.engine().apply(&plan, "apply").unwrap_err();
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
        w.engine().apply(&edited, "apply").unwrap_err(),
        EngineError::NotApproved { have: 0, .. }
    ));
    // A second approval by the same person counts once.
    assert_eq!(w.engine().approve(&plan, "bob").unwrap(), ["bob"]);
    w.engine().apply(&plan, "apply").unwrap();
    assert_eq!(w.state.servers(Some("staging")).unwrap().len(), 3);
    // Once applied, the generation moved: the plan cannot be approved again.
    assert!(matches!(
        w.engine().approve(&plan, "carol").unwrap_err(),
        EngineError::Stale { .. }
    ));
    // Rollbacks and reconcile passes are not gated; apply, cold deploys
    // and destroys are.
    assert!(
        w.engine().check_approved(&w.plan(), "apply").is_ok(),
        "an empty plan needs nothing"
    );
    image(&w.store, "app", 2);
    let next = w.plan();
    assert!(!next.is_empty());
    for kind in ["apply", "deploy --cold", "destroy"] {
        assert!(w.engine().check_approved(&next, kind).is_err(), "{kind}");
    }
    for kind in ["rollback", "rollback (automatic)", "reconcile"] {
        assert!(w.engine().check_approved(&next, kind).is_ok(), "{kind}");
    }
}

#[test]
fn destroy_takes_dependents_down_first() {
    let w = world();
    w.engine().apply(&w.plan(), "apply").unwrap();
    let plan = w.engine().plan_destroy("staging").unwrap();
    let order: Vec<&str> = plan.changes.iter().map(|c| c.server.as_str()).collect();
    assert_eq!(
        order,
        ["app-0002", "app-0003", "db-0001"],
        "app depends on db: it goes first"
    );
    w.fake.calls.borrow_mut().clear();
    w.engine().apply(&plan, "destroy").unwrap();
    assert_eq!(
        *w.fake.calls.borrow(),
        ["destroy app-0002", "destroy app-0003", "destroy db-0001"]
    );
    // The order follows depends_on, not names: make db depend on app.
    let mut w = world();
    let staging = w.project.envs.get_mut("staging").unwrap();
    staging.roles.get_mut("app").unwrap().depends_on.clear();
    staging.roles.get_mut("db").unwrap().depends_on = vec!["app".into()];
    w.engine().apply(&w.plan(), "apply").unwrap();
    let plan = w.engine().plan_destroy("staging").unwrap();
    assert_eq!(
        plan.changes
            .iter()
            .map(|c| c.role.as_str())
            .collect::<Vec<_>>(),
        ["db", "app", "app"]
    );
}

#[test]
fn reconcile_replaces_hung_servers_within_the_share() {
    let w = world();
    w.engine().apply(&w.plan(), "apply").unwrap();
    // Both app servers run but fail every health check.
    w.fake
        .hung
        .borrow_mut()
        .extend(["app-0002".to_string(), "app-0003".to_string()]);
    let mut r = || {
        *w.seq.borrow_mut() += 1;
        *w.seq.borrow()
    };
    let dry = w.engine().reconcile("staging", true, &mut r).unwrap();
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
    let pass = w.engine().reconcile("staging", false, &mut r).unwrap();
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
        .reconcile("staging", true, &mut r)
        .unwrap()
        .forced
        .is_empty());
}

#[test]
fn drift_report_renders_grouped_by_server() {
    use crate::drift::{render, Finding, Report};
    let f = |server: &str, kind: &str, detail: &str| Finding {
        server: server.into(),
        kind: kind.into(),
        detail: detail.into(),
    };
    let report = Report {
        env: "staging".into(),
        checked_at: 1_000,
        servers: 3,
        images_verified: vec!["web@2".into()],
        findings: vec![
            f("web-0001", "files", "changed /srv/www/index.html (content)"),
            f("web-0001", "process", "process not started by the entrypoint (an interactive login?): 4242: /bin/sleep 300"),
            f("web-0002", "config", "listens on TCP port 4444, which the role does not declare (ports = [8080])"),
            f("10.88.1.99:8080", "unmanaged", "balancer of `staging` role `web` routes to it, but no running server of the state has this address"),
        ],
        ignored: 1,
    };
    assert_eq!(
        render(&report),
        "\
DRIFT in `staging`: 4 findings on 3 servers (1 ignored)
  web-0001
    files     changed /srv/www/index.html (content)
    process   process not started by the entrypoint (an interactive login?): 4242: /bin/sleep 300
  web-0002
    config    listens on TCP port 4444, which the role does not declare (ports = [8080])
  10.88.1.99:8080
    unmanaged balancer of `staging` role `web` routes to it, but no running server of the state has this address
"
    );
    let clean = Report {
        findings: vec![],
        ignored: 0,
        ..report
    };
    assert_eq!(
        render(&clean),
        "no drift in `staging`: 3 servers match their declaration (1 image versions verified).\n"
    );
}
