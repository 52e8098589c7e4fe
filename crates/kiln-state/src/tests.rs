use kiln_model::{Outcome, PlanKind, Server, ServerStatus};

use crate::{schema, State, StateError};

fn open(dir: &tempfile::TempDir) -> State {
    State::open(&dir.path().join(".kiln/state.db")).expect("open state")
}

fn server(id: &str, env: &str, role: &str, slot: u32) -> Server {
    Server {
        id: id.into(),
        env: env.into(),
        role: role.into(),
        slot,
        image: "app@2".into(),
        image_digest: "sha256:ab".into(),
        spec_hash: "h1".into(),
        address: "10.77.1.5".into(),
        created: 1_700_000_000,
        status: ServerStatus::Creating,
        pid: None,
        release: 3,
        standby_until: None,
        node: None,
        published: Default::default(),
    }
}

#[test]
fn migrations_are_idempotent_on_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let st = open(&dir);
    assert_eq!(schema::schema_version(&st.conn), schema::KNOWN);
    st.bump_generation("staging").unwrap();
    drop(st);
    let st = open(&dir);
    assert_eq!(schema::schema_version(&st.conn), schema::KNOWN);
    assert_eq!(st.generation("staging").unwrap(), 1);
    let mode: String = st
        .conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let st = open(&dir);
    st.conn
        .execute(
            "UPDATE meta SET value = 999 WHERE key = 'schema_version'",
            [],
        )
        .unwrap();
    drop(st);
    let err = State::open(&dir.path().join(".kiln/state.db")).unwrap_err();
    assert!(
        matches!(err, StateError::TooNew { found: 999, .. }),
        "{err}"
    );
}

#[test]
fn servers_round_trip_in_order_and_bump_generation() {
    let dir = tempfile::tempdir().unwrap();
    let st = open(&dir);
    let b = server("app-0002", "staging", "app", 1);
    let a = server("app-0001", "staging", "app", 0);
    let db = server("db-0001", "prod", "db", 0);
    for s in [&b, &a, &db] {
        st.put_server(s).unwrap();
    }
    assert_eq!(st.generation("staging").unwrap(), 2);
    assert_eq!(
        st.servers(Some("staging")).unwrap(),
        vec![a.clone(), b.clone()]
    );
    assert_eq!(
        st.servers(None).unwrap(),
        vec![db.clone(), a.clone(), b.clone()]
    );
    assert_eq!(st.server("app-0001").unwrap(), Some(a.clone()));
    assert_eq!(st.server("nope").unwrap(), None);

    st.set_server_status("app-0001", ServerStatus::Running, Some(4242))
        .unwrap();
    let got = st.server("app-0001").unwrap().unwrap();
    assert_eq!((got.status, got.pid), (ServerStatus::Running, Some(4242)));
    assert!(matches!(
        st.set_server_status("nope", ServerStatus::Running, None),
        Err(StateError::Missing { .. })
    ));
    st.remove_server("app-0002").unwrap();
    st.remove_server("app-0002").unwrap();
    assert_eq!(st.generation("staging").unwrap(), 4);
    assert_eq!(
        st.envs().unwrap(),
        vec!["prod".to_string(), "staging".to_string()]
    );
}

#[test]
fn generation_starts_at_zero_and_bumps() {
    let dir = tempfile::tempdir().unwrap();
    let st = open(&dir);
    assert_eq!(st.generation("staging").unwrap(), 0);
    assert!(st.envs().unwrap().is_empty());
    assert_eq!(st.bump_generation("staging").unwrap(), 1);
    assert_eq!(st.bump_generation("staging").unwrap(), 2);
    assert_eq!(st.generation("staging").unwrap(), 2);
    assert_eq!(st.generation("prod").unwrap(), 0);
}

#[test]
fn held_lock_refuses_second_handle_and_drop_releases() {
    let dir = tempfile::tempdir().unwrap();
    let one = open(&dir);
    let two = open(&dir);
    let guard = one.lock("staging", "apply").unwrap();
    assert_eq!(guard.env(), "staging");
    match two.lock("staging", "destroy") {
        Err(StateError::Locked {
            env,
            holder,
            holder_alive,
        }) => {
            assert_eq!(env, "staging");
            assert_eq!(
                (holder.pid, holder.op.as_str()),
                (std::process::id(), "apply")
            );
            assert!(holder_alive);
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    // Other environments are independent.
    drop(two.lock("prod", "apply").unwrap());
    drop(guard);
    assert!(two.lock_info("staging").unwrap().is_none());
    drop(two.lock("staging", "destroy").unwrap());
}

#[test]
fn a_dead_holders_lock_is_taken_over_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let st = open(&dir);
    let plant = |pid: u32, start: Option<i64>| {
        st.conn
            .execute(
                "INSERT INTO locks (env, holder, pid, host, since, op, start) VALUES ('staging', 'root', ?1, ?2, 1700000000, 'apply', ?3)",
                rusqlite::params![pid, crate::lock::hostname(), start],
            )
            .unwrap();
    };
    // A pid that does not exist.
    plant(999_999, None);
    let lock = st.lock("staging", "apply").unwrap();
    let old = lock.took_over().expect("took over the dead holder's lock");
    assert_eq!((old.holder.as_str(), old.pid), ("root", 999_999));
    drop(lock);
    // A pid that exists but is another process: it started at another time.
    plant(std::process::id(), Some(1));
    assert!(st.lock("staging", "apply").unwrap().took_over().is_some());
    let events = st.events("staging").unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].action, "lock takeover");
    assert!(
        events[0].detail.contains("root (pid 999999 on host") && events[0].detail.contains("gone"),
        "{}",
        events[0].detail
    );
}

#[test]
fn a_holder_on_another_host_is_kept_and_unlock_records_breaking_it() {
    let dir = tempfile::tempdir().unwrap();
    let st = open(&dir);
    st.conn
        .execute(
            "INSERT INTO locks (env, holder, pid, host, since, op) VALUES ('staging', 'root', 999999, 'elsewhere', 1700000000, 'apply')",
            [],
        )
        .unwrap();
    let err = st.lock("staging", "apply").unwrap_err();
    assert!(
        matches!(
            err,
            StateError::Locked {
                holder_alive: true,
                ..
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.starts_with("environment `staging` is locked by root (pid 999999 on host elsewhere)"),
        "{msg}"
    );
    assert!(
        msg.contains("since 2023-11-14T22:13:20Z for apply"),
        "{msg}"
    );
    let removed = st
        .unlock("staging", "alice")
        .unwrap()
        .expect("a lock was held");
    assert_eq!((removed.holder.as_str(), removed.pid), ("root", 999999));
    assert!(st.lock_info("staging").unwrap().is_none());
    assert!(st.unlock("staging", "alice").unwrap().is_none());
    let events = st.events("staging").unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].actor.as_str(), events[0].action.as_str()),
        ("alice", "unlock")
    );
    drop(st.lock("staging", "apply").unwrap());
}

#[test]
fn releases_are_numbered_per_env() {
    let dir = tempfile::tempdir().unwrap();
    let st = open(&dir);
    assert_eq!(
        st.begin_release("staging", "al", PlanKind::Apply, "p1", "+1", &[])
            .unwrap(),
        1
    );
    assert_eq!(
        st.begin_release("staging", "al", PlanKind::Destroy, "p2", "-1", &[])
            .unwrap(),
        2
    );
    assert_eq!(
        st.begin_release("prod", "bo", PlanKind::Apply, "p3", "+2", &[])
            .unwrap(),
        1
    );
    st.finish_release("staging", 1, Outcome::Succeeded, "")
        .unwrap();
    st.finish_release("staging", 2, Outcome::Failed, "boom")
        .unwrap();
    assert!(matches!(
        st.finish_release("staging", 9, Outcome::Failed, ""),
        Err(StateError::Missing { .. })
    ));
    let rs = st.releases("staging").unwrap();
    assert_eq!(rs.iter().map(|r| r.id).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(
        (rs[0].outcome.as_str(), rs[0].kind.as_str()),
        ("succeeded", "apply")
    );
    assert_eq!(
        (rs[1].outcome.as_str(), rs[1].detail.as_str()),
        ("failed", "boom")
    );
    assert!(rs.iter().all(|r| r.finished.is_some()));
    let prod = st.releases("prod").unwrap();
    assert_eq!(
        (prod[0].outcome.as_str(), prod[0].finished),
        ("running", None)
    );
}

#[test]
fn steps_journal_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let st = open(&dir);
    let rel = st
        .begin_release("staging", "al", PlanKind::Apply, "p", "", &[])
        .unwrap();
    st.step_started("staging", rel, 0, "create", "app-0001", "new server")
        .unwrap();
    st.step_started("staging", rel, 1, "destroy", "app-0000", "spec changed")
        .unwrap();
    st.step_finished("staging", rel, 0, true, "").unwrap();
    st.step_finished("staging", rel, 1, false, "timeout")
        .unwrap();
    st.step_started("staging", rel, 2, "create", "app-0002", "")
        .unwrap();
    assert!(matches!(
        st.step_finished("staging", rel, 7, true, ""),
        Err(StateError::Missing { .. })
    ));
    let steps = st.steps("staging", rel).unwrap();
    let view: Vec<_> = steps
        .iter()
        .map(|s| {
            (
                s.idx,
                s.status.as_str(),
                s.detail.as_str(),
                s.finished.is_some(),
            )
        })
        .collect();
    assert_eq!(
        view,
        vec![
            (0, "done", "new server", true),
            (1, "failed", "timeout", true),
            (2, "running", "", false)
        ]
    );
    assert_eq!(steps[0].server, "app-0001");
    assert!(st.steps("prod", rel).unwrap().is_empty());
}

#[test]
fn a_reset_audit_log_does_not_reach_its_anchor() {
    let dir = tempfile::tempdir().unwrap();
    let st = open(&dir);
    for i in 0..3 {
        st.append_audit(
            "staging",
            "ci",
            "apply",
            &format!("p{i}"),
            "succeeded",
            true,
        )
        .unwrap();
    }
    assert_eq!(st.verify_audit().unwrap(), None);
    drop(st);
    // The database is emptied; the anchor beside it is not.
    for f in ["state.db", "state.db-wal", "state.db-shm"] {
        let _ = std::fs::remove_file(dir.path().join(".kiln").join(f));
    }
    let st = open(&dir);
    st.append_audit("staging", "ci", "apply", "p9", "succeeded", true)
        .unwrap();
    let (seq, why) = st.verify_audit().unwrap().expect("the reset is detected");
    assert_eq!(seq, 3, "the anchor still names the lost head");
    assert!(why.contains("reset or cut short"), "{why}");
}

/// A small tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(tempfile::TempDir);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.0.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn a_full_disk_is_named() {
    let dir = Tmpfs(tempfile::tempdir().unwrap());
    nix::mount::mount(
        Some("tmpfs"),
        dir.0.path(),
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=256k"),
    )
    .expect("mount a tmpfs (the tests run as root)");
    // Fill the disk to its last byte, then open a state database on it.
    let filler = dir.0.path().join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 256 << 10]);
    let err = State::open(&dir.0.path().join("state.db")).unwrap_err();
    assert!(
        matches!(err, StateError::DiskFull { .. }) && err.to_string().contains("is full"),
        "{err:?}"
    );
}
