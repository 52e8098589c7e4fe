//! The project `kiln init` writes: a Debian `base` image, an `app` image
//! layered on it serving HTTP with busybox httpd, and a `staging`
//! environment (with `production` inheriting it).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::Result;

pub fn kiln_toml(name: &str) -> String {
    format!(
        r#"# kiln project: images are baked from images/<name>/{{files,scripts}};
# environments are fired from them. See `kiln --help`.
[project]
name = "{name}"

[images.base]
from = {{ debootstrap = "bookworm" }}
test = [["/bin/sh", "-c", "test -f /etc/kiln-base"]]

[images.app]
from = "base"
entrypoint = ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/srv/www"]
ports = [8080]
health = {{ http = "/healthz", port = 8080 }}
test = [["/bin/busybox", "test", "-f", "/srv/www/index.html"]]

[env.staging]
provider = "local"

[env.staging.roles.app]
image = "app"
servers = 2
size = {{ cpus = 0.5, memory = "128M" }}
ports = [8080]
strategy = "rolling"
balancer = {{ listen = "127.0.0.1:8080", port = 8080 }}
ttl = "28d"
drift = "replace"

[env.production]
inherit = "staging"
approvals = 1

[env.production.roles.app]
servers = 4
balancer = {{ listen = "127.0.0.1:8090", port = 8080 }}
"#
    )
}

const BASE_SCRIPT: &str = r#"#!/bin/sh
# Runs inside the build sandbox over the image's root, as root.
set -eu
apt-get update
apt-get install -y --no-install-recommends busybox ca-certificates
apt-get clean
rm -rf /var/lib/apt/lists/*
echo "baked by kiln" > /etc/kiln-base
"#;

const APP_SCRIPT: &str = r#"#!/bin/sh
set -eu
# The root is read-only once the image is sealed; everything is set up now.
chmod -R a+rX /srv/www
"#;

const INDEX: &str =
    "<!doctype html>\n<title>kiln</title>\n<h1>Hello from an immutable server</h1>\n";

/// Writes the scaffold into `dir`; returns the files written, relative.
pub fn write(dir: &Path, name: &str) -> Result<Vec<String>> {
    let files: Vec<(&str, String, u32)> = vec![
        ("kiln.toml", kiln_toml(name), 0o644),
        (
            "images/base/scripts/10_packages.sh",
            BASE_SCRIPT.into(),
            0o755,
        ),
        ("images/app/files/srv/www/index.html", INDEX.into(), 0o644),
        ("images/app/files/srv/www/healthz", "ok\n".into(), 0o644),
        ("images/app/scripts/10_www.sh", APP_SCRIPT.into(), 0o755),
        (".gitignore", ".kiln/\n".into(), 0o644),
    ];
    let mut written = Vec::new();
    for (rel, content, mode) in files {
        let path = dir.join(rel);
        fs::create_dir_all(path.parent().expect("has a parent"))?;
        fs::write(&path, content)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        written.push(rel.to_string());
    }
    Ok(written)
}
