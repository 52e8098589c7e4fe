//! End-to-end tests of saved plans as a contract: an approved plan is
//! exactly what runs, and a plan that no longer matches `kiln.toml`, names
//! a role that is gone or comes from another kiln is refused with a clear
//! error before anything starts. Also: output cut short by a closed pipe.

mod support;

use std::fs;

use support::*;

fn saved_and_approved(p: &Project, file: &str) -> String {
    let plan = p.path().join(file);
    let plan = plan.to_str().unwrap().to_string();
    p.kiln_env(
        &["plan", "staging", "-o", &plan],
        &[("KILN_ACTOR", "alice")],
    )
    .ok();
    p.kiln_env(&["approve", "staging", &plan], &[("KILN_ACTOR", "bob")])
        .ok();
    plan
}

#[test]
fn an_approved_plan_is_refused_once_kiln_toml_changed() {
    let p = web_fleet(
        "10.77.30.0/24",
        1,
        "approvals = 1",
        "env = { GREETING = \"reviewed\" }\nsize = { cpus = 0.5, memory = \"64M\" }",
    );
    let original = fs::read_to_string(p.path().join("kiln.toml")).unwrap();
    let edits = [
        ("env", "\"reviewed\"", "\"sneaked-in\""),
        ("size", "\"64M\"", "\"2G\""),
        ("ports", "ports = [8080]", "ports = [8080, 9090]"),
        (
            "health",
            "ports = [8080]",
            "ports = [8080]\nhealth = { tcp = 8080 }",
        ),
    ];
    for (i, (field, from, to)) in edits.iter().enumerate() {
        fs::write(p.path().join("kiln.toml"), &original).unwrap();
        let plan = saved_and_approved(&p, &format!("plan-{i}.json"));
        fs::write(p.path().join("kiln.toml"), original.replace(from, to)).unwrap();
        let refused = p.kiln(&["apply", "staging", &plan]).expect(1);
        let want = format!("`{field}` of role `web` changed");
        assert!(
            refused.stderr.contains(&want) && refused.stderr.contains("plan again"),
            "{field}: {}",
            refused.stderr
        );
        assert!(!refused.stderr.contains("panicked"), "{}", refused.stderr);
        assert!(
            p.servers().is_empty(),
            "nothing started after editing {field}"
        );
    }
    // Unedited, the approved plan applies, and runs what was reviewed.
    fs::write(p.path().join("kiln.toml"), &original).unwrap();
    let plan = saved_and_approved(&p, "plan-ok.json");
    p.kiln(&["apply", "staging", &plan]).ok();
    let servers = p.servers();
    assert_eq!(servers.len(), 1);
    let pid = servers[0]["pid"].as_i64().unwrap();
    let environ = fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        String::from_utf8_lossy(&environ).contains("GREETING=reviewed"),
        "the server runs with the reviewed environment"
    );
    // Clean up through an approved destroy plan.
    let down = p.path().join("down.json");
    let down = down.to_str().unwrap();
    p.kiln_env(
        &["plan", "staging", "--destroy", "-o", down],
        &[("KILN_ACTOR", "alice")],
    )
    .ok();
    p.kiln_env(&["approve", "staging", down], &[("KILN_ACTOR", "bob")])
        .ok();
    p.kiln(&["apply", "staging", down]).ok();
    assert!(p.servers().is_empty());
}

#[test]
fn plans_naming_a_deleted_role_or_of_another_format_are_clear_errors() {
    let p = web_fleet("10.77.31.0/24", 1, "", "");
    let plan = p.path().join("plan.json");
    let plan = plan.to_str().unwrap();
    p.kiln(&["plan", "staging", "-o", plan]).ok();
    let original = fs::read_to_string(p.path().join("kiln.toml")).unwrap();
    // The role goes; another takes its place.
    fs::write(
        p.path().join("kiln.toml"),
        original.replace("[env.staging.roles.web]", "[env.staging.roles.api]"),
    )
    .unwrap();
    let refused = p.kiln(&["apply", "staging", plan]).expect(1);
    assert!(
        refused.stderr.contains("role `web` was added or removed")
            && refused.stderr.contains("role `api` was added or removed"),
        "{}",
        refused.stderr
    );
    fs::write(p.path().join("kiln.toml"), &original).unwrap();
    // A plan of a future kiln.
    let text = fs::read_to_string(plan).unwrap();
    let future = p.path().join("future.json");
    fs::write(&future, text.replace("\"format\": 2", "\"format\": 99")).unwrap();
    let refused = p
        .kiln(&["apply", "staging", future.to_str().unwrap()])
        .expect(1);
    assert!(
        refused
            .stderr
            .contains("plan of format 99; this kiln reads format 2"),
        "{}",
        refused.stderr
    );
    // Not a plan at all.
    let junk = p.path().join("junk.json");
    fs::write(&junk, "{\"format\": 2, \"changes\": 7}").unwrap();
    let refused = p
        .kiln(&["apply", "staging", junk.to_str().unwrap()])
        .expect(1);
    assert!(
        refused.stderr.contains("is not a kiln plan"),
        "{}",
        refused.stderr
    );
    assert!(!refused.stderr.contains("panicked"), "{}", refused.stderr);
    assert!(p.servers().is_empty());
}

#[test]
fn output_cut_short_by_a_closed_pipe_ends_quietly() {
    let p = web_fleet("10.77.32.0/24", 1, "", "");
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let dir = p.path().display().to_string();
    for args in ["image show web --json", "image list --json", "plan staging"] {
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "'{kiln}' -C '{dir}' {args} | head -c1 >/dev/null; echo ${{PIPESTATUS[0]}}"
            ))
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let status = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            status == "0" || status == "141",
            "{args}: exit {status}, stderr {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "{args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
