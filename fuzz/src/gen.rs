//! `kiln.toml` texts generated from fuzzer bytes: projects with images,
//! environments (inheriting each other) and roles, every key drawn from
//! values at and around its limits (and some far beyond), written in the
//! forms TOML allows (table headers, inline tables, quoted names). Byte
//! mutation of a text rarely turns `servers = 5` into `servers = 70000` or
//! a valid spec into another valid one; generation reaches the planner
//! with every strategy, size and subnet on most inputs.

use std::fmt::Write as _;

use arbitrary::{Result, Unstructured};

const NAMES: [&str; 8] = ["a", "web", "db", "api", "x-1", "b_2", "cache", "lb"];
const BAD_NAMES: [&str; 7] = ["A", "a/b", "..", "web x", "", "ünï", "-a"];

/// The fuzzer's bytes, and whether this spec already took its one bad
/// value.
pub struct Gen<'u, 'a> {
    u: &'u mut Unstructured<'a>,
    spent: bool,
}

impl Gen<'_, '_> {
    /// Whether this choice goes wrong: one in 24, at most once per spec,
    /// so a spec is refused for one reason or loads. Decided by the byte
    /// at this choice, so one mutation there turns a good value bad.
    fn bad(&mut self) -> bool {
        if self.spent || self.u.is_empty() {
            return false;
        }
        self.spent = self.u.ratio(1u8, 24).unwrap_or(false);
        self.spent
    }

    fn choose<'b, T>(&mut self, choices: &'b [T]) -> Result<&'b T> {
        self.u.choose(choices)
    }

    fn int_in_range(&mut self, r: std::ops::RangeInclusive<u32>) -> Result<u32> {
        self.u.int_in_range(r)
    }

    fn is_empty(&self) -> bool {
        self.u.is_empty()
    }

    fn ratio(&mut self, n: u8, d: u8) -> Result<bool> {
        self.u.ratio(n, d)
    }
}

/// A pool of values for a key: ones that load, and ones at or past a limit
/// for the one bad choice.
struct Pool<T: 'static> {
    good: &'static [T],
    bad: &'static [T],
}

const COUNTS: Pool<i64> = Pool {
    good: &[0, 1, 2, 3, 5, 13, 100, 253],
    bad: &[14, 254, 1000, 32768, 32769, 65533, 70000, 4294967296],
};
const SMALL: Pool<i64> = Pool {
    good: &[1, 2, 3, 10, 50, 100],
    bad: &[0, 101, 1000, -1],
};
const CPUS: Pool<&str> = Pool {
    good: &["0.5", "1.0", "0.01", "1024.0", "0.25", "2.0"],
    bad: &[
        "0.009", "1025.0", "inf", "-inf", "nan", "1e-9", "-0.0", "0.0",
    ],
};
const RATES: Pool<&str> = Pool {
    good: &["0.0", "0.01", "0.5", "1.0", "-0.0"],
    bad: &["2.0", "nan", "inf", "-1.0", "1.0000001"],
};
/// Durations where zero is meaningful (drain, warm window, bake, checks).
const DURATIONS: Pool<&str> = Pool {
    good: &["1s", "28d", "1h30m", "10m", "2h", "1w", "0s"],
    bad: &[
        "500ms",
        "1500ms",
        "99ms",
        "18446744073709551615s1s",
        "5",
        "",
        "36501d",
    ],
};
/// `ttl` and `quarantine`: never zero.
const LIFETIMES: Pool<&str> = Pool {
    good: &["1s", "28d", "1h30m", "10m", "2h", "1w"],
    bad: &["0s", "500ms", "18446744073709551615s1s", "36501d"],
};
const SIZES: Pool<&str> = Pool {
    good: &["4M", "256M", "1G", "64M", "1024M"],
    bad: &["0", "1K", "4095K", "17179869184G", "1048576G", "1024"],
};
const SUBNETS: Pool<&str> = Pool {
    good: &[
        "10.0.0.0/16",
        "10.88.1.0/24",
        "10.88.2.0/24",
        "10.0.0.16/28",
        "192.168.7.0/24",
        "10.89.0.0/16",
    ],
    bad: &[
        "10.0.0.0/8",
        "10.88.1.5/24",
        "127.0.0.0/24",
        "224.0.0.0/24",
        "10.0.0.0/29",
        "",
    ],
};
const LISTENS: Pool<&str> = Pool {
    good: &[
        "127.0.0.1:8000",
        "127.0.0.1:8001",
        "127.0.0.2:8000",
        "[::1]:8002",
        "0.0.0.0:8003",
    ],
    bad: &[
        "[::]:8000",
        "127.0.0.1:0",
        "192.0.2.1:80",
        "nonsense",
        "0.0.0.0:8000",
    ],
};
const PATHS: Pool<&str> = Pool {
    good: &["/data", "/var/lib/db", "/srv", "/data/"],
    bad: &["/", "www", "/a/../b", "//"],
};
const ENV_KEYS: Pool<&str> = Pool {
    good: &["A", "PORT", "path"],
    bad: &["", "A=B", "A\u{0}"],
};
const VOLUMES: Pool<&str> = Pool {
    good: &["data", "logs", "a.b"],
    bad: &["/tmp/x", "..", "a/b"],
};
const PORTS: Pool<i64> = Pool {
    good: &[8080, 80, 65535, 9090],
    bad: &[0, 65536],
};
const PROGRAMS: Pool<&str> = Pool {
    good: &["/app"],
    bad: &["", "a\u{0}"],
};

fn pick<T: Copy>(u: &mut Gen, pool: &Pool<T>) -> Result<T> {
    if u.bad() {
        u.choose(pool.bad).copied()
    } else {
        u.choose(pool.good).copied()
    }
}

/// True `n` times in `d`; false once the bytes are used up (where
/// `ratio` would say true every time, and every spec would end in bad
/// values).
fn chance(u: &mut Gen, n: u8, d: u8) -> Result<bool> {
    Ok(!u.is_empty() && u.ratio(n, d)?)
}

/// A TOML key: bare when it can be, quoted otherwise.
fn key(k: &str) -> String {
    let bare = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if bare {
        k.to_string()
    } else {
        string(k)
    }
}

/// A TOML basic string.
fn string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn name(u: &mut Gen, valid: &[String]) -> Result<String> {
    if !valid.is_empty() && !u.bad() {
        return Ok(u.choose(valid)?.clone());
    }
    if u.bad() {
        return Ok(u.choose(&BAD_NAMES)?.to_string());
    }
    Ok(u.choose(&NAMES)?.to_string())
}

/// One optional `key = value` line (or inline-table entry).
fn opt(
    u: &mut Gen,
    out: &mut Vec<String>,
    k: &str,
    v: impl FnOnce(&mut Gen) -> Result<String>,
) -> Result<()> {
    if chance(u, 1, 3)? {
        let v = v(u)?;
        out.push(format!("{k} = {v}"));
    }
    Ok(())
}

fn int(u: &mut Gen, pool: &Pool<i64>) -> Result<String> {
    Ok(pick(u, pool)?.to_string())
}

fn str_of(u: &mut Gen, pool: &Pool<&str>) -> Result<String> {
    Ok(string(pick(u, pool)?))
}

fn float(u: &mut Gen, pool: &Pool<&str>) -> Result<String> {
    Ok(pick(u, pool)?.to_string())
}

fn inline(entries: &[String]) -> String {
    format!("{{ {} }}", entries.join(", "))
}

fn health(u: &mut Gen) -> Result<String> {
    if u.bad() {
        return Ok("{ http = \"/a b\" }".into());
    }
    Ok(match u.int_in_range(0..=2)? {
        0 => format!("{{ http = \"/healthz\", port = {} }}", int(u, &PORTS)?),
        1 => format!("{{ tcp = {} }}", int(u, &PORTS)?),
        _ => "{ command = [\"/bin/true\"] }".into(),
    })
}

fn strategy(u: &mut Gen) -> Result<String> {
    let kind = pick(
        u,
        &Pool {
            good: &["rolling", "blue_green", "canary"],
            bad: &["bogus"],
        },
    )?;
    if chance(u, 1, 4)? {
        return Ok(string(kind));
    }
    let mut e = vec![format!("kind = {}", string(kind))];
    opt(u, &mut e, "max_surge", |u| int(u, &SMALL))?;
    opt(u, &mut e, "max_unavailable", |u| int(u, &SMALL))?;
    opt(u, &mut e, "min_healthy", |u| str_of(u, &DURATIONS))?;
    opt(u, &mut e, "rollback_window", |u| str_of(u, &DURATIONS))?;
    opt(u, &mut e, "share", |u| int(u, &SMALL))?;
    opt(u, &mut e, "bake", |u| str_of(u, &DURATIONS))?;
    opt(u, &mut e, "max_error_rate", |u| float(u, &RATES))?;
    Ok(inline(&e))
}

fn balancer(u: &mut Gen) -> Result<String> {
    let mut e = vec![format!("listen = {}", str_of(u, &LISTENS)?)];
    if !u.bad() {
        e.push(format!("port = {}", int(u, &PORTS)?));
    }
    opt(u, &mut e, "drain_timeout", |u| str_of(u, &DURATIONS))?;
    opt(u, &mut e, "check_interval", |u| str_of(u, &DURATIONS))?;
    opt(u, &mut e, "fall", |u| int(u, &SMALL))?;
    opt(u, &mut e, "rise", |u| int(u, &SMALL))?;
    Ok(inline(&e))
}

fn map(u: &mut Gen, keys: &Pool<&str>, values: &Pool<&str>) -> Result<String> {
    let n = u.int_in_range(0..=2)?;
    let mut e = Vec::new();
    let mut seen = Vec::new();
    for _ in 0..n {
        let k = pick(u, keys)?;
        if !seen.contains(&k) {
            seen.push(k);
            e.push(format!("{} = {}", key(k), str_of(u, values)?));
        }
    }
    Ok(inline(&e))
}

fn role(u: &mut Gen, images: &[String], roles: &[String]) -> Result<Vec<String>> {
    let mut l = Vec::new();
    if !u.bad() {
        l.push(format!("image = {}", string(&name(u, images)?)));
    }
    opt(u, &mut l, "servers", |u| int(u, &COUNTS))?;
    opt(u, &mut l, "size", |u| {
        let mut e = Vec::new();
        opt(u, &mut e, "cpus", |u| float(u, &CPUS))?;
        opt(u, &mut e, "memory", |u| str_of(u, &SIZES))?;
        Ok(inline(&e))
    })?;
    opt(u, &mut l, "ports", |u| {
        let (a, b) = (int(u, &PORTS)?, int(u, &PORTS)?);
        Ok(if a == b && !u.bad() {
            format!("[{a}]")
        } else {
            format!("[{a}, {b}]")
        })
    })?;
    opt(u, &mut l, "health", health)?;
    if !roles.is_empty() || u.bad() {
        opt(u, &mut l, "depends_on", |u| {
            Ok(format!("[{}]", string(&name(u, roles)?)))
        })?;
    }
    opt(u, &mut l, "cold_only", |u| Ok(chance(u, 1, 2)?.to_string()))?;
    opt(u, &mut l, "volumes", |u| map(u, &VOLUMES, &PATHS))?;
    opt(u, &mut l, "strategy", strategy)?;
    opt(u, &mut l, "balancer", balancer)?;
    opt(u, &mut l, "ttl", |u| str_of(u, &LIFETIMES))?;
    opt(u, &mut l, "replace_share", |u| int(u, &SMALL))?;
    opt(u, &mut l, "env", |u| {
        let values = Pool {
            good: &["x", "8080"],
            bad: &["a\u{0}"],
        };
        map(u, &ENV_KEYS, &values)
    })?;
    opt(u, &mut l, "drift", |u| {
        str_of(
            u,
            &Pool {
                good: &["alarm", "replace", "kill"],
                bad: &["ignore"],
            },
        )
    })?;
    opt(u, &mut l, "watch", |u| {
        Ok(format!("[{}]", str_of(u, &PATHS)?))
    })?;
    Ok(l)
}

/// A whole `kiln.toml`.
pub fn kiln_toml(u: &mut Unstructured) -> Result<String> {
    let mut g = Gen { u, spent: false };
    spec(&mut g)
}

fn spec(u: &mut Gen) -> Result<String> {
    let mut t = String::from("[project]\nname = \"fuzz\"\n");
    let mut images: Vec<String> = Vec::new();
    for _ in 0..u.int_in_range(1..=3)? {
        let n = name(u, &[])?;
        if images.contains(&n) {
            continue;
        }
        let from = match u.int_in_range(0..=5)? {
            0 | 1 => string("scratch"),
            2 if !images.is_empty() => string(&name(u, &images)?),
            3 => "{ rootfs = \"base.tar\" }".into(),
            4 => "{ oci = \"oci:latest\" }".into(),
            _ => "{ debootstrap = \"bookworm\", variant = \"minbase\" }".into(),
        };
        let mut l = vec![format!("from = {from}")];
        opt(u, &mut l, "entrypoint", |u| {
            str_of(u, &PROGRAMS).map(|s| format!("[{s}]"))
        })?;
        opt(u, &mut l, "ports", |u| Ok(format!("[{}]", int(u, &PORTS)?)))?;
        opt(u, &mut l, "health", health)?;
        opt(u, &mut l, "workdir", |u| str_of(u, &PATHS))?;
        opt(u, &mut l, "env", |u| {
            let values = Pool {
                good: &["x"],
                bad: &["a\u{0}"],
            };
            map(u, &ENV_KEYS, &values)
        })?;
        opt(u, &mut l, "mtime", |u| {
            let times = Pool {
                good: &[0, 1_700_000_000, 253_402_300_799],
                bad: &[253_402_300_800],
            };
            int(u, &times)
        })?;
        let _ = write!(t, "[images.{}]\n{}\n", key(&n), l.join("\n"));
        images.push(n);
    }
    let mut envs: Vec<String> = Vec::new();
    for _ in 0..u.int_in_range(1..=3)? {
        let e = name(u, &[])?;
        if envs.contains(&e) {
            continue;
        }
        let mut l = Vec::new();
        if !envs.is_empty() && chance(u, 1, 3)? {
            l.push(format!("inherit = {}", string(u.choose(&envs)?)));
        }
        opt(u, &mut l, "subnet", |u| str_of(u, &SUBNETS))?;
        opt(u, &mut l, "ttl", |u| str_of(u, &LIFETIMES))?;
        opt(u, &mut l, "replace_share", |u| int(u, &SMALL))?;
        opt(u, &mut l, "quarantine", |u| str_of(u, &LIFETIMES))?;
        opt(u, &mut l, "approvals", |u| int(u, &SMALL))?;
        let mut roles: Vec<String> = Vec::new();
        let mut headers = String::new();
        for _ in 0..u.int_in_range(1..=3)? {
            let r = name(u, &[])?;
            if roles.contains(&r) {
                continue;
            }
            let body = role(u, &images, &roles)?;
            if chance(u, 1, 4)? {
                // The role as an inline table in the environment's table.
                l.push(format!("roles.{} = {}", key(&r), inline(&body)));
            } else {
                let _ = write!(
                    headers,
                    "[env.{}.roles.{}]\n{}\n",
                    key(&e),
                    key(&r),
                    body.join("\n")
                );
            }
            roles.push(r);
        }
        let _ = write!(t, "[env.{}]\n{}\n{headers}", key(&e), l.join("\n"));
        envs.push(e);
    }
    Ok(t)
}
