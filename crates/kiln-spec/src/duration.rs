//! Human durations (`28d`, `90s`, `500ms`) and sizes (`256M`, `1G`) as
//! written in `kiln.toml`. Small enough that a dependency would cost more
//! than these twenty lines.

use std::time::Duration;

/// Parses `500ms`, `30s`, `5m`, `2h`, `28d`, `1w`, or a sum like `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!("`{s}` is not a duration; expected a number with a unit: ms, s, m, h, d or w (like \"28d\")")
    };
    let too_long = || format!("`{s}` is longer than the longest duration accepted (100 years)");
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| too_long())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let millis_per = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "w" => 7 * 86_400_000,
            _ => return Err(bad()),
        };
        let millis = n.checked_mul(millis_per).ok_or_else(too_long)?;
        total = total
            .checked_add(Duration::from_millis(millis))
            .filter(|t| *t <= MAX_DURATION)
            .ok_or_else(too_long)?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// The longest duration accepted anywhere: a hundred years is a typo, not
/// a plan, and every sum below it fits every clock kiln uses.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Formats whole seconds the way people write them: `28d`, `1h30m`, `45s`.
pub fn format_duration(secs: u64) -> String {
    if secs == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    let mut rest = secs;
    for (unit, len) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if rest >= len {
            out.push_str(&format!("{}{unit}", rest / len));
            rest %= len;
        }
    }
    out
}

/// Parses `256M`, `1G`, `512K`, `1024` (bytes); units are powers of 1024.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().trim_end_matches("iB").trim_end_matches('B');
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n = num.trim().parse::<u64>().map_err(|_| {
        format!("`{s}` is not a size; expected a number with K, M or G (like \"256M\")")
    })?;
    n.checked_mul(mult)
        .filter(|b| *b <= MAX_SIZE)
        .ok_or_else(|| format!("`{s}` is larger than the largest size accepted (1 PiB)"))
}

/// The largest size accepted: anything above is a typo.
pub const MAX_SIZE: u64 = 1 << 50;
