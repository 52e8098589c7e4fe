//! Supply-chain figures: the SBOM plus vulnerability scan of a Debian
//! bookworm image with nginx-light against an OSV Debian 12 database of
//! realistic size, and the cost of checking an image signature before a
//! server launch.
//!
//! The advisory database is synthetic (this machine cannot download the
//! real `Debian/all.zip`): 6,000 records in OSV 1.6 schema, in a zip like
//! the export, shaped like Debian's (DSA/DLA/DEBIAN-CVE ids, CVE aliases,
//! source package names, `ECOSYSTEM` ranges with Debian versions, CVSS
//! vectors or urgencies, a paragraph of details). A third name source
//! packages of the image, so matching does real work; the rest name other
//! Debian sources.
//!
//! The Debian base is the test fixture's tarball when the tests built it
//! (`target/tmp/kiln-debian/bookworm-minbase.tar`), else `debootstrap`.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kiln_image::store::Store;
use kiln_image::{sbom, scan, sign};

use crate::{ms, percentile};

/// Advisories in the synthetic database.
const ADVISORIES: usize = 6_000;

pub fn run(kiln: &Path) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("kiln-bench-supply-")
        .tempdir()?;
    let p = dir.path();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/tmp/kiln-debian/bookworm-minbase.tar");
    let from = if fixture.is_file() {
        format!("{{ rootfs = \"{}\" }}", fixture.canonicalize()?.display())
    } else {
        "{ debootstrap = \"bookworm\" }".to_string()
    };
    fs::write(
        p.join("kiln.toml"),
        format!("[project]\nname = \"bench\"\nvulnerabilities = {{ osv = \"osv.zip\" }}\n[images.base]\nfrom = {from}\n[images.web]\nfrom = \"base\"\n"),
    )?;
    let scripts = p.join("images/web/scripts");
    fs::create_dir_all(&scripts)?;
    fs::write(
        scripts.join("10_nginx.sh"),
        "#!/bin/sh\nset -e\napt-get update -qq\napt-get install -y -qq --no-install-recommends nginx-light >/dev/null\napt-get clean\nrm -rf /var/lib/apt/lists/*\n",
    )?;
    let out = Command::new(kiln)
        .arg("-C")
        .arg(p)
        .args(["image", "build", "web"])
        .env("NO_COLOR", "1")
        .output()?;
    if !out.status.success() {
        bail!(
            "building the Debian + nginx image failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let store = Store::open(p.join(".kiln"))?;
    let record = store.current_record("web")?;
    let root = store.root_path(&record.digest);
    let release = sbom::release(&root)?;
    let packages =
        sbom::dpkg_packages(&root, &release)?.context("the image has a dpkg database")?;
    let sources: Vec<(String, String)> = packages
        .iter()
        .map(|p| (p.source.clone(), p.source_version.clone()))
        .collect();
    let unpacked = write_osv_zip(&p.join("osv.zip"), &sources)?;

    // SBOM: dpkg database + os-release → CycloneDX JSON (what a bake adds).
    let seal: kiln_image::seal::Seal = store.read_json_blob(&record.seal)?;
    let mut sbom_times = Vec::new();
    let mut json = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        let bom = sbom::bom(&record, &root, &seal)?;
        json.clear();
        bom.output_as_json_v1_5(&mut json)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        sbom_times.push(t.elapsed());
    }
    let inventory = sbom::inventory(&json)?;
    // Scan: load the zip (parse every record) and match.
    let mut load_times = Vec::new();
    let mut match_times = Vec::new();
    let mut findings = 0;
    for _ in 0..5 {
        let t = Instant::now();
        let adv = scan::Advisories::from_path(&p.join("osv.zip"))?;
        load_times.push(t.elapsed());
        let t = Instant::now();
        let report = scan::scan(
            &record,
            &inventory,
            &adv,
            &scan::default_policy(),
            chrono_today(),
        );
        match_times.push(t.elapsed());
        findings = report.findings.len();
    }
    // The whole command a pipeline runs, process start included.
    let mut cli_times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let out = Command::new(kiln)
            .arg("-C")
            .arg(p)
            .args(["image", "scan", "web", "--json"])
            .env("NO_COLOR", "1")
            .output()?;
        cli_times.push(t.elapsed());
        if !matches!(out.status.code(), Some(0) | Some(2)) {
            bail!(
                "kiln image scan failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let total = percentile(&mut sbom_times.clone(), 0.5)
        + percentile(&mut load_times.clone(), 0.5)
        + percentile(&mut match_times.clone(), 0.5);
    println!(
        "| SBOM of Debian bookworm + nginx-light ({} packages → CycloneDX 1.5 JSON, {} KiB) | p50 {} (10 runs) |",
        packages.len(),
        json.len() / 1024,
        ms(percentile(&mut sbom_times, 0.5))
    );
    println!(
        "| load {ADVISORIES} synthetic OSV Debian 12 advisories from a zip ({} MiB unpacked) | p50 {} (5 runs) |",
        unpacked >> 20,
        ms(percentile(&mut load_times, 0.5))
    );
    println!(
        "| match {} packages against them ({findings} findings) | p50 {} (5 runs) |",
        packages.len(),
        ms(percentile(&mut match_times, 0.5))
    );
    println!(
        "| **SBOM + scan, in-process** (goal < 1 s) | **{}** |",
        ms(total)
    );
    println!(
        "| `kiln image scan web --json` (process, stored SBOM, load + match) | p50 {} (5 runs) |",
        ms(percentile(&mut cli_times, 0.5))
    );
    signature(&store, &record, p)
}

fn chrono_today() -> chrono::NaiveDate {
    chrono::Utc::now().date_naive()
}

/// A fast deterministic generator (xorshift), so every run has the same data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Debian source packages that a minbase + nginx image does not have.
const OTHER_SOURCES: &[&str] = &[
    "linux",
    "chromium",
    "firefox-esr",
    "thunderbird",
    "php8.2",
    "postgresql-15",
    "mariadb",
    "imagemagick",
    "ffmpeg",
    "qemu",
    "xen",
    "samba",
    "bind9",
    "openjdk-17",
    "ruby3.1",
    "python3.11",
    "nodejs",
    "golang-1.19",
    "rustc",
    "webkit2gtk",
    "libreoffice",
    "ghostscript",
    "exim4",
    "postfix",
    "dovecot",
    "apache2",
    "tomcat10",
    "jetty9",
    "redis",
    "memcached",
    "git",
    "subversion",
    "curl",
    "wget",
    "openssh",
    "sudo",
    "vim",
    "emacs",
    "tiff",
    "libxml2",
    "libxslt",
    "expat",
    "sqlite3",
    "zlib",
    "libpng1.6",
    "libjpeg-turbo",
    "freetype",
    "cups",
    "gnutls28",
    "nss",
    "krb5",
    "openldap",
    "cyrus-sasl2",
    "libssh",
    "libssh2",
    "nghttp2",
];

const VECTORS: &[&str] = &[
    "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H",
    "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:N/I:N/A:H",
    "CVSS:3.1/AV:N/AC:H/PR:N/UI:N/S:U/C:H/I:N/A:N",
    "CVSS:3.1/AV:L/AC:L/PR:L/UI:N/S:U/C:H/I:H/A:H",
    "CVSS:3.1/AV:N/AC:L/PR:N/UI:R/S:C/C:L/I:L/A:N",
    "CVSS:3.1/AV:L/AC:H/PR:H/UI:R/S:U/C:L/I:N/A:N",
];

const URGENCIES: &[&str] = &[
    "unimportant",
    "low",
    "medium",
    "high",
    "not yet assigned",
    "low*",
];

/// Writes the synthetic export: one `ID.json` per advisory in a zip;
/// returns the bytes of JSON written.
fn write_osv_zip(path: &Path, image_sources: &[(String, String)]) -> Result<u64> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut z = zip::ZipWriter::new(fs::File::create(path)?);
    let mut unpacked = 0u64;
    let details = "Multiple vulnerabilities were discovered which could result in denial of service, information disclosure or the execution of arbitrary code if a malformed input is processed. For the stable distribution (bookworm), these problems have been fixed in the version named below. We recommend that you upgrade your packages.";
    for i in 0..ADVISORIES {
        let (source, installed) = if i % 3 == 0 && !image_sources.is_empty() {
            let (s, v) = &image_sources[rng.below(image_sources.len())];
            (s.clone(), Some(v.clone()))
        } else {
            (
                OTHER_SOURCES[rng.below(OTHER_SOURCES.len())].to_string(),
                None,
            )
        };
        // Mostly fixed long ago (below the installed version), some above, some unfixed.
        let fixed = match (rng.below(10), &installed) {
            (0, _) => None,
            (1, Some(v)) => Some(format!("{v}+deb12u{}", 1 + rng.below(9))),
            (_, _) => Some(format!(
                "{}.{}.{}-{}",
                rng.below(3),
                rng.below(20),
                rng.below(30),
                1 + rng.below(5)
            )),
        };
        let year = 2016 + rng.below(11);
        let cve = format!("CVE-{year}-{}", 1000 + rng.below(50_000));
        let (id, aliases) = match rng.below(3) {
            0 => (format!("DSA-{}-1", 3000 + i), vec![cve]),
            1 => (format!("DLA-{}-1", 1000 + i), vec![cve]),
            _ => (format!("DEBIAN-{cve}-{i}"), vec![]),
        };
        let mut events = vec![serde_json::json!({ "introduced": "0" })];
        if let Some(f) = &fixed {
            events.push(serde_json::json!({ "fixed": f }));
        }
        let mut affected = serde_json::json!({
            "package": { "ecosystem": "Debian:12", "name": source, "purl": format!("pkg:deb/debian/{source}?arch=source") },
            "ranges": [{ "type": "ECOSYSTEM", "events": events }],
            "database_specific": { "source": format!("https://storage.googleapis.com/debian-osv/{id}.json") }
        });
        let mut rec = serde_json::json!({
            "schema_version": "1.6.0",
            "id": id,
            "modified": "2026-10-01T12:00:00Z",
            "published": format!("{year}-06-01T00:00:00Z"),
            "aliases": aliases,
            "summary": format!("{source} - security update"),
            "details": details,
            "references": [{ "type": "ADVISORY", "url": format!("https://security-tracker.debian.org/tracker/{id}") }],
        });
        if rng.below(2) == 0 {
            rec["severity"] = serde_json::json!([{ "type": "CVSS_V3", "score": VECTORS[rng.below(VECTORS.len())] }]);
        } else {
            affected["ecosystem_specific"] =
                serde_json::json!({ "urgency": URGENCIES[rng.below(URGENCIES.len())] });
        }
        rec["affected"] = serde_json::json!([affected]);
        let bytes = serde_json::to_vec_pretty(&rec)?;
        unpacked += bytes.len() as u64;
        z.start_file(
            format!("{}.json", rec["id"].as_str().unwrap_or_default()),
            zip::write::SimpleFileOptions::default(),
        )?;
        z.write_all(&bytes)?;
    }
    z.finish()?;
    Ok(unpacked)
}

/// `verify_signature` of a signed version, as a launch would call it.
fn signature(store: &Store, record: &kiln_image::VersionRecord, dir: &Path) -> Result<()> {
    let key = dir.join("signer");
    let st = Command::new("ssh-keygen")
        .args(["-t", "ed25519", "-N", "", "-q", "-C", "release@ops", "-f"])
        .arg(&key)
        .status()
        .context("ssh-keygen (openssh-client)")?;
    anyhow::ensure!(st.success(), "ssh-keygen failed");
    let public = fs::read_to_string(dir.join("signer.pub"))?
        .trim()
        .to_string();
    {
        let _lock = store.lock()?;
        sign::sign(store, record, &key)?;
    }
    let signers = vec![public];
    let mut times: Vec<Duration> = Vec::new();
    for _ in 0..1000 {
        let t = Instant::now();
        sign::verify_signature(store, record, &signers)?;
        times.push(t.elapsed());
    }
    let max = *times.iter().max().unwrap_or(&Duration::ZERO);
    println!(
        "| signature check before a launch (`verify_signature`, Ed25519, store on disk; goal < 5 ms) | p50 {} · p99 {} · max {} (1000 runs) |",
        us(percentile(&mut times.clone(), 0.5)),
        us(percentile(&mut times, 0.99)),
        us(max)
    );
    Ok(())
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}
