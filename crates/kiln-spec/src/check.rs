//! Range checks of single values of `kiln.toml`, as pure functions from a
//! value to the message that refuses it. The validator in `lib.rs` says
//! where the value is written; these say what is wrong with it.
//!
//! The bounds are chosen so that every accepted value means something to
//! the layers below (cgroups, the kernel's `execve`, the balancer) and no
//! arithmetic on it can overflow; each is documented where it is defined.

use std::collections::BTreeMap;
use std::time::Duration;

/// Smallest CPU share: the kernel's smallest CFS quota is 1 ms per 100 ms
/// period.
pub const MIN_CPUS: f64 = 0.01;
/// Largest CPU share: more cores than any one host kiln runs on has.
pub const MAX_CPUS: f64 = 1024.0;
/// Smallest memory limit: below this no process starts (the runtime's own
/// init needs a few MiB).
pub const MIN_MEMORY: u64 = 4 << 20;
/// The latest file time accepted: 9999-12-31T23:59:59Z, the last second an
/// OCI config's RFC 3339 `created` can state.
pub const MAX_MTIME: u64 = 253_402_300_799;
/// Most approvals one plan can need.
pub const MAX_APPROVALS: u32 = 100;
/// Most consecutive balancer checks before a backend changes state.
pub const MAX_CHECK_STREAK: u32 = 100;
/// Shortest balancer check interval other than `0s` (off): more often
/// loads the backends without telling more.
pub const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// Most requests a balancer's `max_requests` lets a backend have at once.
pub const MAX_REQUESTS: u32 = 100_000;
/// Longest balancer `queue_timeout`.
pub const MAX_QUEUE_TIMEOUT: Duration = Duration::from_secs(600);
/// Most images, environments, and roles of one environment. Far above any
/// real project; they bound the work (and the depth of the walks) that
/// validating and planning a file can take.
pub const MAX_IMAGES: usize = 1000;
pub const MAX_ENVS: usize = 100;
pub const MAX_ROLES: usize = 1000;
/// Most servers of one role: half of the 65,536 server ids a role has
/// (`ROLE-XXXX`), so that replacing every server at once (blue-green, or a
/// rolling update whose new servers start before the old ones go) always
/// finds an id for each new server.
pub const MAX_SERVERS: u32 = 1 << 15;

/// `size.cpus`: a finite share between [`MIN_CPUS`] and [`MAX_CPUS`].
pub fn cpus(c: f64) -> Result<(), String> {
    if c.is_finite() && (MIN_CPUS..=MAX_CPUS).contains(&c) {
        Ok(())
    } else {
        Err(format!(
            "size.cpus = {c} is out of range; expected a number of CPUs from {MIN_CPUS} to {MAX_CPUS}"
        ))
    }
}

/// `size.memory`: at least [`MIN_MEMORY`] (the upper bound is `parse_size`'s).
pub fn memory(bytes: u64, written: &str) -> Result<(), String> {
    if bytes < MIN_MEMORY {
        return Err(format!(
            "size.memory `{written}` is too small; a server needs at least \"4M\""
        ));
    }
    Ok(())
}

/// A port a server listens on, or the balancer's: 0 means "any port" to
/// the kernel, never one a client can reach.
pub fn port(p: u16, what: &str) -> Result<(), String> {
    if p == 0 {
        Err(format!("{what} 0 is not a port; expected 1 to 65535"))
    } else {
        Ok(())
    }
}

/// A canary's `max_error_rate`: a fraction of requests, 0 to 1.
pub fn error_rate(r: f64) -> Result<(), String> {
    if (0.0..=1.0).contains(&r) {
        Ok(())
    } else {
        Err(format!(
            "max_error_rate = {r} is out of range; expected a fraction from 0 to 1 (like 0.01)"
        ))
    }
}

/// A share of a role in percent: 1 to 100 (0 would never replace anything).
pub fn percent(p: u32, what: &str) -> Result<(), String> {
    if (1..=100).contains(&p) {
        Ok(())
    } else {
        Err(format!(
            "{what} = {p} is out of range; expected a percentage from 1 to 100"
        ))
    }
}

/// A duration kept in whole seconds: sub-second parts would silently be
/// dropped (`1500ms` would be `1s`, `500ms` would be `0s`).
pub fn whole_secs(d: Duration, written: &str, what: &str) -> Result<u64, String> {
    if d.subsec_nanos() != 0 {
        return Err(format!(
            "{what} `{written}` is not a whole number of seconds; {what} is counted in seconds"
        ));
    }
    Ok(d.as_secs())
}

/// A duration that must not be zero, with why zero makes no sense.
pub fn nonzero(d: Duration, written: &str, what: &str, why: &str) -> Result<(), String> {
    if d.is_zero() {
        Err(format!("{what} `{written}` is zero; {why}"))
    } else {
        Ok(())
    }
}

/// Balancer `fall` and `rise`: consecutive checks, 1 to [`MAX_CHECK_STREAK`].
pub fn streak(n: u32, what: &str) -> Result<(), String> {
    if (1..=MAX_CHECK_STREAK).contains(&n) {
        Ok(())
    } else {
        Err(format!(
            "balancer {what} = {n} is out of range; expected 1 to {MAX_CHECK_STREAK} consecutive checks"
        ))
    }
}

/// A balancer's `max_requests`: 1 to [`MAX_REQUESTS`] per backend.
pub fn max_requests(n: u32) -> Result<(), String> {
    if (1..=MAX_REQUESTS).contains(&n) {
        Ok(())
    } else {
        Err(format!(
            "max_requests {n} is out of range; expected 1 to {MAX_REQUESTS} requests at once per backend"
        ))
    }
}

/// A balancer's `queue_timeout`, as milliseconds: at most
/// [`MAX_QUEUE_TIMEOUT`].
pub fn queue_timeout(d: Duration, written: &str) -> Result<u64, String> {
    if d > MAX_QUEUE_TIMEOUT {
        return Err(format!(
            "queue_timeout `{written}` is longer than {}; a request waiting that long has long been given up by its client",
            crate::format_duration(MAX_QUEUE_TIMEOUT.as_secs())
        ));
    }
    // At most MAX_QUEUE_TIMEOUT: fits.
    Ok(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Why an environment variable's name is refused, if it is: `execve`
/// passes `NAME=VALUE` strings, so a name with `=` or NUL, or none at all,
/// cannot be passed.
pub fn env_key(k: &str) -> Result<(), String> {
    if k.is_empty() {
        Err("environment variable has an empty name".into())
    } else if k.contains('=') {
        Err(format!(
            "environment variable name `{}` contains `=`",
            k.escape_debug()
        ))
    } else if k.contains('\0') {
        Err(format!(
            "environment variable name `{}` contains a NUL byte",
            k.escape_debug()
        ))
    } else {
        Ok(())
    }
}

/// An environment variable's value: anything but NUL.
pub fn env_value(k: &str, v: &str) -> Result<(), String> {
    if v.contains('\0') {
        Err(format!(
            "environment variable `{k}` has a NUL byte in its value"
        ))
    } else {
        Ok(())
    }
}

/// The first of `vars` refused, as (name, message).
pub fn env_vars(vars: &BTreeMap<String, String>) -> Result<(), (&str, String)> {
    for (k, v) in vars {
        env_key(k)
            .and_then(|()| env_value(k, v))
            .map_err(|m| (k.as_str(), m))?;
    }
    Ok(())
}

/// A label's key and value: no empty key, no control characters (they end
/// up in the OCI config and in listings).
pub fn label(k: &str, v: &str) -> Result<(), String> {
    if k.is_empty() {
        Err("label has an empty name".into())
    } else if k.chars().any(char::is_control) {
        Err(format!(
            "label name `{}` contains a control character",
            k.escape_debug()
        ))
    } else if v.contains('\0') {
        Err(format!("label `{k}` has a NUL byte in its value"))
    } else {
        Ok(())
    }
}

/// The index of the first refused element of an argv and why: a program
/// name must be given, and no argument can hold NUL (`execve` takes C
/// strings).
pub fn argv(args: &[String], what: &str) -> Result<(), (usize, String)> {
    if args.first().is_some_and(|a| a.is_empty()) {
        return Err((0, format!("{what} names an empty program")));
    }
    match args.iter().position(|a| a.contains('\0')) {
        Some(i) => Err((i, format!("{what} argument {i} contains a NUL byte"))),
        None => Ok(()),
    }
}

/// An absolute path inside a server: starts with `/`, no `..` component,
/// no NUL.
pub fn abs_path(p: &str, what: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        Err(format!(
            "{what} `{}` is not absolute; expected a path starting with `/`",
            p.escape_debug()
        ))
    } else if p.split('/').any(|c| c == "..") {
        Err(format!("{what} `{}` contains `..`", p.escape_debug()))
    } else if p.contains('\0') {
        Err(format!("{what} `{}` contains a NUL byte", p.escape_debug()))
    } else {
        Ok(())
    }
}

/// `/a//b/` and `/a/b` are one mount point.
pub fn normal_path(p: &str) -> String {
    let parts: Vec<&str> = p
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    format!("/{}", parts.join("/"))
}

/// A volume name: a plain name, never a path. Volumes live in a directory
/// of the store named after them, so `/tmp/x`, `a/b` or `..` would reach
/// outside it.
pub fn volume_name(n: &str) -> Result<(), String> {
    let plain = !n.is_empty()
        && n.len() <= 64
        && n != "."
        && n != ".."
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if plain {
        Ok(())
    } else {
        Err(format!("volume name `{}` is not a plain name; expected letters, digits, `-`, `_` or `.` (not `.` or `..`), at most 64 characters", n.escape_debug()))
    }
}

/// An HTTP health path: it goes into a request line, so it starts with `/`
/// and holds no whitespace or control characters.
pub fn http_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        Err("http health path must start with `/`".into())
    } else if p.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err(format!(
            "http health path `{}` contains whitespace or a control character",
            p.escape_debug()
        ))
    } else {
        Ok(())
    }
}

/// A Debian mirror for debootstrap: an http(s) or file URL, which also
/// keeps it from being read as an option.
pub fn mirror(m: &str) -> Result<(), String> {
    let scheme = ["http://", "https://", "file:///"]
        .iter()
        .any(|s| m.starts_with(s) && m.len() > s.len());
    if scheme && !m.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Ok(())
    } else {
        Err(format!(
            "debootstrap mirror `{}` is not a URL; expected http://, https:// or file:///",
            m.escape_debug()
        ))
    }
}

/// debootstrap's variants.
pub fn variant(v: &str) -> Result<(), String> {
    const VARIANTS: [&str; 3] = ["minbase", "buildd", "fakechroot"];
    if VARIANTS.contains(&v) {
        Ok(())
    } else {
        Err(format!(
            "debootstrap variant `{}` is unknown; expected \"minbase\", \"buildd\" or \"fakechroot\"",
            v.escape_debug()
        ))
    }
}

/// Strings passed on (alarm hooks, pipeline identities): not empty, no NUL.
pub fn text(s: &str, what: &str) -> Result<(), String> {
    if s.trim().is_empty() {
        Err(format!("{what} is empty"))
    } else if s.contains('\0') {
        Err(format!("{what} `{}` contains a NUL byte", s.escape_debug()))
    } else {
        Ok(())
    }
}
