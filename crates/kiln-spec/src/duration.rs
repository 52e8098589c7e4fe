//! Human durations (`28d`, `90s`, `500ms`) and sizes (`256M`, `1G`) as
//! written in `kiln.toml`. Small enough that a dependency would cost more
//! than these twenty lines.

use std::time::Duration;

/// Parses `500ms`, `30s`, `5m`, `2h`, `28d`, `1w`, or a sum like `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!("`{s}` is not a duration; expected a number with a unit: ms, s, m, h, d or w (like \"28d\")")
    };
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
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let too_long = || format!("`{s}` is too long a duration");
        let secs = |per: u64| {
            n.checked_mul(per)
                .map(Duration::from_secs)
                .ok_or_else(too_long)
        };
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => secs(60)?,
            "h" => secs(3600)?,
            "d" => secs(86_400)?,
            "w" => secs(7 * 86_400)?,
            _ => return Err(bad()),
        };
        total = total.checked_add(unit).ok_or_else(too_long)?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

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
        .ok_or_else(|| format!("`{s}` is too large a size"))
}
