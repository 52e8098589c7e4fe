//! What must hold for any `kiln.toml` text, checked by the fuzz targets:
//! the loader never panics and every refusal points inside the text; a
//! spec that loads can be planned (created, then rolled to a new image,
//! then destroyed) without a panic, a loop, or a plan that breaks its own
//! invariants (every server planned once, distinct ids and addresses
//! inside the subnet, a plan file that reads back as the same plan).

pub mod gen;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kiln_model::{
    Change, EnvSpec, ImageRef, Launch, Plan, PlanKind, ProviderSpec, RoleTarget, Server,
    ServerStatus,
};
use kiln_planner::{plan, plan_destroy, render, spec_hash, Input, PlanError};
use kiln_spec::SpecError;

/// Random picks the planner may take per new server id: the first one and
/// sixteen retries, after which it walks (see `kiln_planner`'s allocator).
const PICKS_PER_ID: u64 = 17;

/// Most servers an environment may have for the passes after the first
/// (replan, cold deploy, destroy, plan file round trip): they cost far more
/// per server under the fuzzer's instrumentation, and what they exercise
/// (batching, ordering, the file format) does not depend on the count. The
/// first plan, which allocates every id and address, runs at any size.
const DEEP_SERVERS: u64 = 256;

/// A project directory for relative paths: holds a rootfs tarball and an
/// OCI layout, so `from` tables that name them load.
pub fn project_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("kiln-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("oci")).expect("create the fuzz project directory");
        std::fs::write(dir.join("base.tar"), b"").expect("write base.tar");
        std::fs::write(dir.join("oci/index.json"), b"{}").expect("write oci/index.json");
        dir
    })
}

/// Loads `text` as `kiln.toml` and, if it loads, plans every environment.
pub fn spec(text: &str) {
    match kiln_spec::parse(text, Path::new("kiln.toml"), project_dir()) {
        Ok(project) => {
            for env in project.envs.values() {
                environment(env, text.len() as u64);
            }
        }
        Err(e) => located(text, &e),
    }
}

/// A refusal names a line and column of the text itself.
fn located(text: &str, e: &SpecError) {
    let Some((line, column)) = e.location() else {
        panic!("a spec error without a position: {e}");
    };
    let lines = text.split('\n').count();
    assert!((1..=lines).contains(&line), "{e}: line {line} of {lines}");
    let width = text
        .split('\n')
        .nth(line - 1)
        .map_or(0, |l| l.chars().count());
    assert!(
        (1..=width + 1).contains(&column),
        "{e}: column {column} of a {width}-character line"
    );
}

/// A deterministic stand-in for randomness (xorshift), counting its picks.
struct Picks {
    state: u64,
    taken: u64,
}

impl Picks {
    fn next(&mut self) -> u16 {
        self.taken += 1;
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        (self.state >> 32) as u16
    }
}

fn targets(env: &EnvSpec, version: u32) -> Vec<RoleTarget> {
    env.roles
        .values()
        .map(|r| RoleTarget {
            role: r.name.clone(),
            image: ImageRef {
                name: r.image.clone(),
                version,
                digest: format!("sha256:{version}"),
            },
            spec_hash: spec_hash(r),
            servers: r.servers,
            cold: r.cold_only || !r.volumes.is_empty(),
            launch: Launch::default(),
            spec: r.clone(),
        })
        .collect()
}

fn input<'a>(
    env: &'a EnvSpec,
    targets: &'a [RoleTarget],
    observed: &'a [Server],
    kind: PlanKind,
    none: &'a (BTreeSet<String>, BTreeMap<String, String>),
) -> Input<'a> {
    Input {
        env,
        targets,
        observed,
        dead: &none.0,
        generation: 1,
        now: 1_000_000,
        kind,
        force: &none.1,
        taken: &none.0,
        strays: &[],
        nodes: &[],
    }
}

/// Plans `env` from nothing, then a new image over what the first plan
/// created, then a cold deploy and a destroy of it.
fn environment(env: &EnvSpec, seed: u64) {
    if !matches!(env.provider, ProviderSpec::Local) {
        // Placement on a provider's nodes needs its node inventory; the
        // planner's node logic has its own tests.
        return;
    }
    let none = Default::default();
    let total: u64 = env.roles.values().map(|r| u64::from(r.servers)).sum();
    let mut picks = Picks {
        state: seed | 1,
        taken: 0,
    };
    let v1 = targets(env, 1);
    let first = plan(&input(env, &v1, &[], PlanKind::Apply, &none), &mut || {
        picks.next()
    })
    .unwrap_or_else(|e| panic!("a loaded spec could not be planned: {e}"));
    assert!(
        picks.taken <= PICKS_PER_ID * total,
        "{} picks for {total} servers",
        picks.taken
    );
    assert_eq!(
        first.changes.len() as u64,
        total,
        "one change per declared server"
    );
    let mut ids = BTreeSet::new();
    let mut addresses = BTreeSet::new();
    let mut running = Vec::new();
    for c in &first.changes {
        let Change::Create(c) = c else {
            panic!("planning from nothing made {c:?}");
        };
        assert!(ids.insert(c.server.clone()), "id {} twice", c.server);
        let a: Ipv4Addr = c.address.parse().expect("an IPv4 address");
        assert!(env.subnet.is_host(a), "{a} is not a host of {}", env.subnet);
        assert!(addresses.insert(a), "address {a} twice");
        running.push(Server {
            id: c.server.clone(),
            env: env.name.clone(),
            role: c.role.clone(),
            slot: c.slot,
            image: c.image.clone(),
            image_digest: "sha256:1".into(),
            spec_hash: v1
                .iter()
                .find(|t| t.role == c.role)
                .expect("target")
                .spec_hash
                .clone(),
            address: c.address.clone(),
            created: 1,
            status: ServerStatus::Running,
            pid: Some(1),
            release: 1,
            standby_until: None,
            node: None,
            published: BTreeMap::new(),
        });
    }
    if total > DEEP_SERVERS {
        return;
    }
    contract(&first);

    // Every server on a new image: replaced exactly once, in batches of
    // the role's strategy. A subnet or id space too small for the surge
    // is a plan error, not a panic.
    let v2 = targets(env, 2);
    for kind in [PlanKind::Apply, PlanKind::DeployCold] {
        let before = picks.taken;
        match plan(&input(env, &v2, &running, kind, &none), &mut || {
            picks.next()
        }) {
            Ok(p) => {
                assert!(picks.taken - before <= PICKS_PER_ID * total);
                let mut replaced = BTreeSet::new();
                for c in &p.changes {
                    let s = c.server();
                    let first = replaced.insert(s.to_string());
                    assert!(first || kind == PlanKind::DeployCold, "{s} changed twice");
                }
                contract(&p);
            }
            Err(PlanError::SubnetFull { .. } | PlanError::IdsExhausted { .. }) => {}
            Err(e) => panic!("replanning failed: {e}"),
        }
    }
    let gone = plan_destroy(env, &running, &[], 2, 1_000_000);
    assert_eq!(gone.changes.len(), running.len());
    contract(&gone);
}

/// A plan renders, and reads back from its file format as the same plan.
fn contract(plan: &Plan) {
    let _ = render(plan);
    let json = serde_json::to_string(plan).expect("a plan serializes");
    let back: Plan = serde_json::from_str(&json).expect("a plan file reads back");
    assert_eq!(&back, plan, "the plan file changed the plan");
}

/// A generated `kiln.toml` (see [`gen`]) through [`spec`].
pub fn generated(data: &[u8]) {
    let mut u = arbitrary::Unstructured::new(data);
    if let Ok(text) = gen::kiln_toml(&mut u) {
        spec(&text);
    }
}
