//! The supply-chain keys of `kiln.toml`: the advisory source and scan gate
//! (`[project] vulnerabilities`, `scan`), an image's hardening policy
//! (`forbid`, `forbid_packages`, `setuid`), an environment's `secrets` and
//! `trust`, and a role's `secrets`. Every value is checked here, so that
//! the image and secret layers never see a malformed key, date, glob,
//! recipient or signer.

use std::ops::Range;

use kiln_model::*;
use toml::Spanned;

use crate::raw::*;
use crate::{SpecError, Validator};

impl Validator<'_> {
    /// `[project] vulnerabilities = { osv = "PATH|URL" }`.
    pub(crate) fn advisories(
        &self,
        project: &RawProject,
    ) -> Result<Option<AdvisorySource>, SpecError> {
        let Some(v) = &project.vulnerabilities else {
            return Ok(None);
        };
        let osv = v.get_ref().osv.trim();
        if osv.is_empty() {
            return Err(self.cx.err(
                v.span(),
                "`vulnerabilities.osv` is empty; expected a directory, a .zip or an http(s) URL of OSV JSON",
            ));
        }
        if osv.starts_with("http://") || osv.starts_with("https://") {
            return Ok(Some(AdvisorySource::Url(osv.to_string())));
        }
        if osv.contains("://") {
            return Err(self.cx.err(
                v.span(),
                format!("`vulnerabilities.osv` URL `{osv}` is not http or https"),
            ));
        }
        Ok(Some(AdvisorySource::Path(self.dir.join(osv))))
    }

    /// The image's `scan` (or the project's), `forbid`, `forbid_packages`
    /// and `setuid`, into `spec`.
    pub(crate) fn supply_chain(
        &self,
        project: &RawProject,
        name: &str,
        img: &RawImage,
        spec: &mut ImageSpec,
    ) -> Result<(), SpecError> {
        let scan = img.scan.as_ref().or(project.scan.as_ref());
        if let Some(s) = scan {
            if project.vulnerabilities.is_none() {
                return Err(self.cx.err(
                    s.span(),
                    format!("image `{name}` has a `scan` gate but the project names no advisories; add `vulnerabilities = {{ osv = \"PATH|URL\" }}` to [project]"),
                ));
            }
            spec.scan = Some(self.scan(s)?);
        }
        for g in img.forbid.iter().flatten() {
            let pattern = g.get_ref();
            if !pattern.starts_with('/') {
                return Err(self.cx.err(
                    g.span(),
                    format!("forbid pattern `{pattern}` must be an absolute path glob like \"/usr/bin/ssh*\""),
                ));
            }
            if let Err(e) = globset::Glob::new(pattern) {
                return Err(self.cx.err(
                    g.span(),
                    format!("forbid pattern `{pattern}`: {}", e.kind()),
                ));
            }
            spec.hardening.forbid.push(pattern.clone());
        }
        for p in img.forbid_packages.iter().flatten() {
            let pkg = p.get_ref();
            let ok = pkg.len() >= 2
                && pkg
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric())
                && pkg
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
            if !ok {
                return Err(self
                    .cx
                    .err(p.span(), format!("`{pkg}` is not a Debian package name")));
            }
            spec.hardening.forbid_packages.push(pkg.clone());
        }
        if let Some(s) = &img.setuid {
            spec.hardening.setuid = match s.get_ref().as_str() {
                "deny" => SetuidPolicy::Deny,
                "report" => SetuidPolicy::Report,
                other => {
                    return Err(self.cx.err(
                        s.span(),
                        format!("unknown setuid policy `{other}`; expected \"deny\" or \"report\""),
                    ))
                }
            };
        }
        Ok(())
    }

    fn scan(&self, s: &Spanned<RawScan>) -> Result<ScanPolicy, SpecError> {
        let r = s.get_ref();
        let severity = |v: &Option<String>, key: &str, default: Severity| {
            match v {
            None => Ok(default),
            Some(v) => Severity::parse(v).ok_or_else(|| {
                self.cx.err(
                    s.span(),
                    format!("scan.{key} `{v}` is not a severity; expected \"low\", \"medium\", \"high\" or \"critical\""),
                )
            }),
        }
        };
        let mut ignore = Vec::new();
        for i in r.ignore.iter().flatten() {
            if i.id.trim().is_empty() {
                return Err(self.cx.err(s.span(), "scan.ignore entry has an empty `id`"));
            }
            if i.reason.trim().is_empty() {
                return Err(self.cx.err(
                    s.span(),
                    format!("scan.ignore entry `{}` needs a `reason`", i.id),
                ));
            }
            if let Some(u) = &i.until {
                if !is_date(u) {
                    return Err(self.cx.err(
                        s.span(),
                        format!(
                            "scan.ignore `{}`: until `{u}` is not a date; expected \"YYYY-MM-DD\"",
                            i.id
                        ),
                    ));
                }
            }
            ignore.push(ScanIgnore {
                id: i.id.trim().to_string(),
                until: i.until.clone(),
                reason: i.reason.clone(),
            });
        }
        Ok(ScanPolicy {
            fail_on: severity(&r.fail_on, "fail_on", Severity::High)?,
            unknown: severity(&r.unknown, "unknown", Severity::High)?,
            ignore_unfixed: r.ignore_unfixed.unwrap_or(false),
            ignore,
        })
    }

    /// `secrets = { recipients = ["age1..."] }` of an environment.
    pub(crate) fn env_secrets(&self, env: &RawEnv) -> Result<Option<SecretsSpec>, SpecError> {
        let Some(s) = &env.secrets else {
            return Ok(None);
        };
        if s.get_ref().recipients.is_empty() {
            return Err(self.cx.err(
                s.span(),
                "`secrets.recipients` is empty; expected at least one age recipient (\"age1...\")",
            ));
        }
        let mut recipients = Vec::new();
        for r in &s.get_ref().recipients {
            if !is_age_recipient(r.get_ref()) {
                return Err(self.cx.err(
                    r.span(),
                    format!(
                        "`{}` is not an age X25519 recipient; expected \"age1\" and 58 more characters (`age-keygen -y KEYFILE` prints it)",
                        r.get_ref()
                    ),
                ));
            }
            recipients.push(r.get_ref().clone());
        }
        Ok(Some(SecretsSpec { recipients }))
    }

    /// `trust = { signers = ["ssh-ed25519 AAAA... who"] }` of an environment.
    pub(crate) fn trust(&self, env: &RawEnv) -> Result<Option<Trust>, SpecError> {
        let Some(t) = &env.trust else {
            return Ok(None);
        };
        if t.get_ref().signers.is_empty() {
            return Err(self.cx.err(
                t.span(),
                "`trust.signers` is empty; expected at least one SSH public key",
            ));
        }
        let mut signers = Vec::new();
        for k in &t.get_ref().signers {
            if let Err(e) = ssh_key::PublicKey::from_openssh(k.get_ref().trim()) {
                return Err(self.cx.err(
                    k.span(),
                    format!("signer is not an OpenSSH public key ({e}); expected \"ssh-ed25519 AAAA... comment\" as in a .pub file"),
                ));
            }
            signers.push(k.get_ref().trim().to_string());
        }
        Ok(Some(Trust { signers }))
    }

    /// A role's `secrets = ["db_password"]`: names of its environment's secrets.
    pub(crate) fn role_secrets(
        &self,
        env_name: &str,
        role: &str,
        r: &RawRole,
        env: &RawEnv,
    ) -> Result<Vec<String>, SpecError> {
        let mut out: Vec<String> = Vec::new();
        for s in r.secrets.iter().flatten() {
            let name = s.get_ref();
            if !is_secret_name(name) {
                return Err(self.cx.err(
                    s.span(),
                    format!("secret name `{name}` is invalid; expected letters, digits, `_`, `-` or `.`, starting with a letter or digit, at most 64 characters"),
                ));
            }
            if env.secrets.is_none() {
                return Err(self.cx.err(
                    s.span(),
                    format!("role `{role}` receives secret `{name}` but environment `{env_name}` declares no `secrets = {{ recipients = [...] }}`"),
                ));
            }
            if out.contains(name) {
                return Err(self.cx.err(
                    s.span(),
                    format!("role `{role}` lists secret `{name}` twice"),
                ));
            }
            out.push(name.clone());
        }
        Ok(out)
    }
}

/// `YYYY-MM-DD` with a plausible month and day.
pub(crate) fn is_date(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return false;
    }
    let num = |r: Range<usize>| s[r].parse::<u32>().ok();
    let all_digits = s
        .char_indices()
        .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    match (all_digits, num(0..4), num(5..7), num(8..10)) {
        (true, Some(_), Some(m), Some(d)) => (1..=12).contains(&m) && (1..=31).contains(&d),
        _ => false,
    }
}

/// An age X25519 recipient: `age1` and 58 bech32 characters.
pub(crate) fn is_age_recipient(s: &str) -> bool {
    const BECH32: &str = "qpzry9x8gf2tvdw0s3jn54khce6mua7l";
    s.len() == 62 && s.starts_with("age1") && s[4..].chars().all(|c| BECH32.contains(c))
}

/// A secret's name is also a file name (`secrets/ENV/NAME.age`,
/// `/run/secrets/NAME`): no separators, no leading dot.
pub fn is_secret_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
}
