use super::*;
use crate::sbom::{Inventory, Release};
use crate::store::{Inputs, Outcome};
use kiln_model::ScanIgnore;
use std::io::{BufRead, Write};

fn v(s: &str) -> Version {
    Version::from_str(s).unwrap()
}

#[test]
fn debian_version_ordering_corner_cases() {
    // Epochs beat everything after them.
    assert!(v("1:1.0-1") > v("9.9-9"));
    assert!(v("2:0.1") > v("1:99"));
    // `~` sorts before anything, even the end of the string.
    assert!(v("1.0~rc1-1") < v("1.0-1"));
    assert!(v("3.0.11-1~deb12u2") < v("3.0.11-1"));
    assert!(v("1.0~~") < v("1.0~"));
    // Stable updates: +deb12u1 is newer than the release it patches, and
    // ordered numerically, not as text.
    assert!(v("1.22.1-9+deb12u1") > v("1.22.1-9"));
    assert!(v("1.22.1-9+deb12u10") > v("1.22.1-9+deb12u2"));
    assert!(
        "1.22.1-9+deb12u10" < "1.22.1-9+deb12u2",
        "as strings it is the other way round"
    );
    // binNMUs are newer than their source upload.
    assert!(v("5.2.15-2+b2") > v("5.2.15-2"));
    // Numeric runs compare as numbers.
    assert!(v("1.10") > v("1.9"));
    assert_eq!(v("0:1.0-1"), v("1.0-1"));
}

fn ev(introduced: Option<&str>, fixed: Option<&str>, last: Option<&str>) -> OsvEvent {
    OsvEvent {
        introduced: introduced.map(Into::into),
        fixed: fixed.map(Into::into),
        last_affected: last.map(Into::into),
        limit: None,
    }
}

#[test]
fn osv_ranges_follow_the_evaluation_rules() {
    let mut bad = Vec::new();
    let fixed_in_update = [
        ev(Some("0"), None, None),
        ev(None, Some("1.22.1-9+deb12u1"), None),
    ];
    assert_eq!(
        in_range(&v("1.22.1-9"), &fixed_in_update, &mut bad),
        (true, Some("1.22.1-9+deb12u1".into()))
    );
    assert_eq!(
        in_range(&v("1.22.1-9+deb12u1"), &fixed_in_update, &mut bad),
        (false, None)
    );
    assert_eq!(
        in_range(&v("1:0.1"), &fixed_in_update, &mut bad),
        (false, None),
        "epoch 1 is above"
    );
    // Introduced later, last_affected, and two windows.
    let windows = [
        ev(Some("2.0-1"), None, None),
        ev(None, Some("2.0-3"), None),
        ev(Some("3.0-1"), None, None),
        ev(None, None, Some("3.0-4")),
    ];
    assert!(!in_range(&v("1.9-1"), &windows, &mut bad).0);
    assert_eq!(
        in_range(&v("2.0-2"), &windows, &mut bad),
        (true, Some("2.0-3".into()))
    );
    assert!(!in_range(&v("2.5-1"), &windows, &mut bad).0);
    assert_eq!(in_range(&v("3.0-4"), &windows, &mut bad), (true, None));
    assert!(!in_range(&v("3.0-4+deb12u1"), &windows, &mut bad).0);
    // No fix yet.
    assert_eq!(
        in_range(&v("1.0"), &[ev(Some("0"), None, None)], &mut bad),
        (true, None)
    );
    assert!(bad.is_empty());
    // A bad version is reported, not fatal.
    in_range(
        &v("1.0"),
        &[ev(Some("0"), Some("not a version!"), None)],
        &mut bad,
    );
    assert_eq!(bad, ["not a version!"]);
}

/// An OSV record as the Debian export writes one.
fn osv(id: &str, source: &str, fixed: Option<&str>, extra: serde_json::Value) -> Vec<u8> {
    let mut events = vec![serde_json::json!({ "introduced": "0" })];
    if let Some(f) = fixed {
        events.push(serde_json::json!({ "fixed": f }));
    }
    let mut rec = serde_json::json!({
        "schema_version": "1.6.0",
        "id": id,
        "modified": "2026-10-01T00:00:00Z",
        "published": "2026-09-01T00:00:00Z",
        "aliases": [format!("CVE-{}", id.len())],
        "summary": format!("{source} security update"),
        "affected": [{
            "package": { "ecosystem": "Debian:12", "name": source, "purl": format!("pkg:deb/debian/{source}?arch=source") },
            "ranges": [{ "type": "ECOSYSTEM", "events": events }],
        }],
    });
    if let (Some(o), Some(extra)) = (rec.as_object_mut(), extra.as_object()) {
        for (k, val) in extra {
            o.insert(k.clone(), val.clone());
        }
    }
    serde_json::to_vec(&rec).unwrap()
}

fn record() -> VersionRecord {
    VersionRecord {
        name: "web".into(),
        version: 2,
        digest: Digest::of(b"m"),
        parent: None,
        parent_digest: None,
        created: "2026-11-22T00:00:00Z".into(),
        size: 0,
        outcome: Outcome::Ok,
        error: None,
        seal_root: String::new(),
        seal: Digest::of(b"s"),
        config: Digest::of(b"c"),
        layers: vec![],
        inputs: Inputs {
            source: "x".into(),
            files: vec![],
            scripts: vec![],
            tests: 0,
            cache_key: String::new(),
        },
        build_ms: 0,
        user: None,
    }
}

fn pkg(name: &str, version: &str, source: &str, source_version: &str) -> Package {
    Package {
        name: name.into(),
        version: version.into(),
        architecture: "amd64".into(),
        source: source.into(),
        source_version: source_version.into(),
        purl: String::new(),
    }
}

fn inventory() -> Inventory {
    Inventory {
        release: Release {
            id: Some("debian".into()),
            version_id: Some("12".into()),
            codename: Some("bookworm".into()),
        },
        packages: Some(vec![
            pkg("nginx-light", "1.22.1-9", "nginx", "1.22.1-9"),
            pkg("libnginx-mod-http-echo", "1.22.1-9", "nginx", "1.22.1-9"),
            pkg("libssl3", "3.0.11-1~deb12u2", "openssl", "3.0.11-1~deb12u2"),
            pkg("bash", "5.2.15-2+b2", "bash", "5.2.15-2"),
        ]),
        files: vec![],
    }
}

fn day(s: &str) -> chrono::NaiveDate {
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
}

fn db() -> Advisories {
    let docs = vec![
        // Fixed above the installed version: a finding, through `Source: nginx`.
        (
            "DSA-9001-1.json".to_string(),
            osv(
                "DSA-9001-1",
                "nginx",
                Some("1.22.1-9+deb12u1"),
                serde_json::json!({ "severity": [{ "type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H" }] }),
            ),
        ),
        // Already fixed in the installed version (`~deb12u2` > `~deb12u1`).
        (
            "DSA-9002-1.json".to_string(),
            osv(
                "DSA-9002-1",
                "openssl",
                Some("3.0.11-1~deb12u1"),
                serde_json::json!({}),
            ),
        ),
        // Another release's advisory.
        ("DSA-9003-1.json".to_string(), {
            let mut r: serde_json::Value = serde_json::from_slice(&osv(
                "DSA-9003-1",
                "bash",
                Some("9.9"),
                serde_json::json!({}),
            ))
            .unwrap();
            r["affected"][0]["package"]["ecosystem"] = "Debian:11".into();
            serde_json::to_vec(&r).unwrap()
        }),
        // Unfixed, Debian urgency low.
        ("DEBIAN-CVE-2026-0001.json".to_string(), {
            let mut r: serde_json::Value = serde_json::from_slice(&osv(
                "DEBIAN-CVE-2026-0001",
                "bash",
                None,
                serde_json::json!({}),
            ))
            .unwrap();
            r["affected"][0]["ecosystem_specific"] = serde_json::json!({ "urgency": "low*" });
            serde_json::to_vec(&r).unwrap()
        }),
        // No severity at all, compared at the source version of a binNMU.
        (
            "DSA-9004-1.json".to_string(),
            osv(
                "DSA-9004-1",
                "bash",
                Some("5.2.15-3"),
                serde_json::json!({}),
            ),
        ),
    ];
    Advisories::from_documents(docs, "test".into()).unwrap()
}

#[test]
fn matches_binary_packages_through_their_source() {
    let policy = default_policy();
    let r = scan(&record(), &inventory(), &db(), &policy, day("2026-11-22"));
    assert_eq!(r.ecosystem.as_deref(), Some("Debian:12"));
    let rows: Vec<(String, String, Option<String>, Severity, bool)> = r
        .findings
        .iter()
        .map(|f| {
            (
                f.id.clone(),
                f.package.clone(),
                f.fixed.clone(),
                f.severity,
                f.blocking,
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (
                "DSA-9001-1".into(),
                "libnginx-mod-http-echo".into(),
                Some("1.22.1-9+deb12u1".into()),
                Severity::Critical,
                true
            ),
            (
                "DSA-9001-1".into(),
                "nginx-light".into(),
                Some("1.22.1-9+deb12u1".into()),
                Severity::Critical,
                true
            ),
            (
                "DSA-9004-1".into(),
                "bash".into(),
                Some("5.2.15-3".into()),
                Severity::High,
                true
            ),
            (
                "DEBIAN-CVE-2026-0001".into(),
                "bash".into(),
                None,
                Severity::Low,
                false
            ),
        ]
    );
    assert!(r.fails());
    let bash = r.findings.iter().find(|f| f.id == "DSA-9004-1").unwrap();
    assert_eq!(bash.severity_basis, SeverityBasis::Assumed);
    assert_eq!(bash.installed, "5.2.15-2+b2");
    assert_eq!(bash.source_version, "5.2.15-2");
    assert_eq!(
        bash.to_string(),
        "DSA-9004-1 high in bash 5.2.15-2+b2 (source bash 5.2.15-2), fixed in 5.2.15-3 [severity not stated; assumed]"
    );
    let nginx = r
        .findings
        .iter()
        .find(|f| f.package == "nginx-light")
        .unwrap();
    assert!(matches!(&nginx.severity_basis, SeverityBasis::Cvss { score, .. } if *score == 9.8));
}

#[test]
fn ignore_entries_apply_through_their_day() {
    let mut policy = default_policy();
    policy.fail_on = Severity::Critical;
    policy.ignore = vec![ScanIgnore {
        id: "CVE-10".into(), // an alias of DSA-9001-1 (the fixture's alias is CVE-<len(id)>)
        until: Some("2027-03-01".into()),
        reason: "not reachable".into(),
    }];
    let before = scan(&record(), &inventory(), &db(), &policy, day("2027-03-01"));
    assert!(!before.fails(), "{:#?}", before.findings);
    assert!(before
        .findings
        .iter()
        .filter(|f| f.id == "DSA-9001-1")
        .all(|f| f.ignored.is_some()));
    assert!(before.expired_ignores.is_empty());
    let after = scan(&record(), &inventory(), &db(), &policy, day("2027-03-02"));
    assert!(after.fails());
    assert_eq!(
        after.expired_ignores,
        ["CVE-10 (until 2027-03-01: not reachable)"]
    );
}

#[test]
fn unfixed_and_unknown_severity_follow_the_policy() {
    let mut policy = default_policy();
    policy.fail_on = Severity::Low;
    let r = scan(&record(), &inventory(), &db(), &policy, day("2026-11-22"));
    assert!(
        r.findings.iter().all(|f| f.blocking),
        "low and up all block"
    );
    policy.ignore_unfixed = true;
    policy.unknown = Severity::Low;
    policy.fail_on = Severity::Medium;
    let r = scan(&record(), &inventory(), &db(), &policy, day("2026-11-22"));
    let blocking: Vec<&str> = r.blocking().map(|f| f.id.as_str()).collect();
    assert_eq!(
        blocking,
        ["DSA-9001-1", "DSA-9001-1"],
        "assumed low and unfixed do not block"
    );
}

#[test]
fn severity_sources_map_as_documented() {
    let word =
        |w: &str| severity_of(&[], Some(&serde_json::json!({ "severity": w })), None).map(|s| s.0);
    assert_eq!(word("MODERATE"), Some(Severity::Medium));
    assert_eq!(word("important"), Some(Severity::High));
    assert_eq!(word("CRITICAL"), Some(Severity::Critical));
    assert_eq!(word("whatever"), None);
    let urgency =
        |u: &str| severity_of(&[], None, Some(&serde_json::json!({ "urgency": u }))).map(|s| s.0);
    assert_eq!(urgency("unimportant"), Some(Severity::Low));
    assert_eq!(urgency("medium**"), Some(Severity::Medium));
    assert_eq!(urgency("not yet assigned"), None);
    let cvss = |v: &str| {
        severity_of(
            &[OsvSeverity {
                kind: "CVSS_V3".into(),
                score: v.into(),
            }],
            None,
            None,
        )
        .map(|s| s.0)
    };
    assert_eq!(
        cvss("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"),
        Some(Severity::Critical)
    );
    assert_eq!(
        cvss("CVSS:3.1/AV:N/AC:H/PR:N/UI:N/S:U/C:H/I:N/A:N"),
        Some(Severity::Medium)
    );
    assert_eq!(
        cvss("CVSS:3.1/AV:L/AC:H/PR:H/UI:R/S:U/C:L/I:N/A:N"),
        Some(Severity::Low)
    );
    // CVSS wins over the words.
    let both = severity_of(
        &[OsvSeverity {
            kind: "CVSS_V3".into(),
            score: "CVSS:3.1/AV:L/AC:H/PR:H/UI:R/S:U/C:L/I:N/A:N".into(),
        }],
        Some(&serde_json::json!({ "severity": "CRITICAL" })),
        None,
    );
    assert_eq!(both.map(|s| s.0), Some(Severity::Low));
}

#[test]
fn a_malformed_record_is_named() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("DSA-1-1.json"),
        osv("DSA-1-1", "x", None, serde_json::json!({})),
    )
    .unwrap();
    fs::create_dir(dir.path().join("sub")).unwrap();
    fs::write(
        dir.path().join("sub/BROKEN.json"),
        br#"{"id": "X", "affected": "nope"}"#,
    )
    .unwrap();
    let e = Advisories::from_path(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("sub/BROKEN.json is not an OSV record: invalid type"),
        "{e}"
    );
    let e = Advisories::from_path(&dir.path().join("missing.zip"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.zip: cannot read it"), "{e}");
    let not_zip = dir.path().join("x.zip");
    fs::write(&not_zip, b"garbage").unwrap();
    let e = Advisories::from_path(&not_zip).unwrap_err().to_string();
    assert!(e.contains("not a directory or a zip of OSV JSON"), "{e}");
}

fn write_zip(path: &Path, docs: &[(&str, Vec<u8>)]) {
    let mut z = zip::ZipWriter::new(fs::File::create(path).unwrap());
    for (name, bytes) in docs {
        z.start_file(*name, zip::write::SimpleFileOptions::default())
            .unwrap();
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap();
}

#[test]
fn loads_a_zip_export() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("all.zip");
    write_zip(
        &path,
        &[
            (
                "DSA-9001-1.json",
                osv(
                    "DSA-9001-1",
                    "nginx",
                    Some("1.22.1-9+deb12u1"),
                    serde_json::json!({}),
                ),
            ),
            ("README.txt", b"not json".to_vec()),
        ],
    );
    let a = Advisories::from_path(&path).unwrap();
    assert_eq!(a.len(), 1);
    let r = scan(
        &record(),
        &inventory(),
        &a,
        &default_policy(),
        day("2026-11-22"),
    );
    assert_eq!(r.findings.len(), 2);
}

/// Serves `body` with an ETag over HTTP/1.1 on 127.0.0.1 until `requests`
/// requests were answered; answers 304 to a matching If-None-Match.
fn serve(body: Vec<u8>, requests: usize) -> (String, std::thread::JoinHandle<Vec<String>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/Debian/all.zip", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for stream in listener.incoming().take(requests) {
            let mut stream = stream.unwrap();
            let mut reader = io::BufReader::new(stream.try_clone().unwrap());
            let mut conditional = false;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
                if line
                    .to_ascii_lowercase()
                    .starts_with("if-none-match: \"v1\"")
                {
                    conditional = true;
                }
            }
            seen.push(if conditional { "304" } else { "200" }.to_string());
            if conditional {
                stream
                    .write_all(
                        b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nConnection: close\r\n\r\n",
                    )
                    .unwrap();
            } else {
                write!(stream, "HTTP/1.1 200 OK\r\nETag: \"v1\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).unwrap();
                stream.write_all(&body).unwrap();
            }
        }
        seen
    });
    (url, handle)
}

#[test]
fn a_url_is_cached_revalidated_and_used_stale_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let zip_path = dir.path().join("src.zip");
    write_zip(
        &zip_path,
        &[(
            "DSA-9001-1.json",
            osv(
                "DSA-9001-1",
                "nginx",
                Some("1.22.1-9+deb12u1"),
                serde_json::json!({}),
            ),
        )],
    );
    let (url, server) = serve(fs::read(&zip_path).unwrap(), 2);
    let cache = dir.path().join("cache");
    let first = fetch(&url, &cache, Duration::from_secs(10)).unwrap();
    assert!(first.warning.is_none());
    assert_eq!(Advisories::from_path(&first.path).unwrap().len(), 1);
    let second = fetch(&url, &cache, Duration::from_secs(10)).unwrap();
    assert!(second.warning.is_none());
    assert_eq!(
        server.join().unwrap(),
        ["200", "304"],
        "the second fetch revalidates"
    );
    // The server is gone: the cache is used, with its age.
    let third = fetch(&url, &cache, Duration::from_secs(10)).unwrap();
    let w = third.warning.expect("a warning about the stale copy");
    assert!(
        w.starts_with(&format!("cannot fetch advisories from {url} (")),
        "{w}"
    );
    assert!(
        w.contains("using the copy fetched") && w.contains(" ago ("),
        "{w}"
    );
    assert_eq!(Advisories::from_path(&third.path).unwrap().len(), 1);
}

#[test]
fn an_unreachable_url_without_cache_is_an_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{port}/all.zip");
    let e = fetch(&url, dir.path(), Duration::from_secs(5))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!("cannot fetch advisories from {url} (")) && e.ends_with("and there is no cached copy; check the URL or point `vulnerabilities.osv` at a local copy"),
        "{e}"
    );
}
