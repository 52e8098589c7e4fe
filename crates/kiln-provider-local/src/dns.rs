//! Each environment's DNS server on the local provider: `kiln dns-server
//! serve` on the environment's gateway address (UDP and TCP 53), with its
//! control directory `<store>/dns/<env>/`, forwarding what it does not
//! know to the host's resolvers; and the `resolv.conf` every server of the
//! environment gets, pointing at it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use kiln_provider::{Names, ProviderError};

use crate::{daemon, net, Local};

impl Local {
    /// `<store>/dns/<env>/`: the DNS server's control directory.
    pub(crate) fn dns_dir(&self, env: &str) -> PathBuf {
        self.dir.join("dns").join(env)
    }

    /// The gateway of `env`'s network, once it has one.
    pub(crate) fn gateway(&self, env: &str) -> Option<Ipv4Addr> {
        net::registered_subnet(&net::bridge_name(&self.net_key(env))).map(|s| s.gateway())
    }

    /// The `resolv.conf` servers of `env` get: the environment's DNS
    /// server, and its name as the search domain (so `app.staging` and
    /// `app` both resolve).
    pub(crate) fn resolv_conf(&self, env: &str, gateway: Ipv4Addr) -> Result<PathBuf, String> {
        let dir = self.dns_dir(env);
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let path = dir.join("resolv.conf");
        let text =
            format!("nameserver {gateway}\nsearch {env}\noptions ndots:1 timeout:1 attempts:3\n");
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            let tmp = dir.join("resolv.conf.tmp");
            std::fs::write(&tmp, &text)
                .and_then(|_| std::fs::rename(&tmp, &path))
                .map_err(|e| format!("write {}: {e}", path.display()))?;
        }
        Ok(path)
    }

    /// Publishes `names` to `env`'s DNS server, starting it if it does not
    /// run, and returns once it answers from them.
    pub(crate) fn publish_names(&self, env: &str, names: &Names) -> Result<(), ProviderError> {
        let fail = |detail: String| ProviderError::Other {
            what: format!("DNS of `{env}`"),
            detail,
        };
        let Some(gateway) = self.gateway(env) else {
            // No network yet: nothing can ask.
            return Ok(());
        };
        let dir = self.dns_dir(env);
        std::fs::create_dir_all(&dir).map_err(|e| fail(e.to_string()))?;
        let records = kiln_dns::Records {
            env: env.to_string(),
            ttl: names.ttl_secs,
            names: names.names.clone(),
        };
        let generation = kiln_dns::set_records(&dir, &records).map_err(|e| fail(e.to_string()))?;
        if kiln_dns::running(&dir).is_none() {
            self.start_dns(env, gateway).map_err(fail)?;
        }
        kiln_dns::wait_generation(&dir, generation, Duration::from_secs(5))
            .map_err(|e| fail(e.to_string()))?;
        Ok(())
    }

    fn start_dns(&self, env: &str, gateway: Ipv4Addr) -> Result<(), String> {
        let dir = self.dns_dir(env);
        let listen = SocketAddr::new(IpAddr::V4(gateway), 53).to_string();
        let mut args: Vec<std::ffi::OsString> = vec![
            "dns-server".into(),
            "serve".into(),
            "--dir".into(),
            dir.clone().into(),
            "--listen".into(),
            listen.into(),
            // One socket: many small environments share the host's cores.
            "--udp-sockets".into(),
            "1".into(),
        ];
        for up in host_resolvers()
            .into_iter()
            .filter(|u| u.ip() != IpAddr::V4(gateway))
        {
            args.push("--upstream".into());
            args.push(up.to_string().into());
        }
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let child = daemon::spawn(&args, &dir.join("dns.log"))?;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if kiln_dns::running(&dir).is_some_and(|s| s.pid == child.id()) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Err(format!(
            "the DNS server did not start; see {}",
            dir.join("dns.log").display()
        ))
    }

    /// Stops `env`'s DNS server and removes its directory; idempotent.
    pub(crate) fn stop_dns(&self, env: &str) {
        let dir = self.dns_dir(env);
        if let Some(status) = kiln_dns::running(&dir) {
            daemon::stop(status.pid as i32);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The host's resolvers, from `/etc/resolv.conf`.
fn host_resolvers() -> Vec<SocketAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}
