//! Health probes over the network, shared by providers: one HTTP client
//! (`ureq`, with connect and overall timeouts) and one TCP connect check.
//! A probe is healthy on a 2xx or 3xx HTTP status, or an accepted TCP
//! connection.

use std::net::{SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::time::Duration;

/// How long one probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

fn agent() -> &'static ureq::Agent {
    static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
    AGENT.get_or_init(|| client(PROBE_TIMEOUT, "kiln-health"))
}

/// An HTTP client for kiln's own endpoints: every request bounded by
/// `timeout` (connect included), statuses returned rather than raised, no
/// redirects followed.
pub fn client(timeout: Duration, user_agent: &str) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(timeout))
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .max_redirects(0)
        .user_agent(user_agent)
        .build()
        .into()
}

/// `GET http://addr/path`: healthy on 2xx or 3xx.
pub fn http(addr: SocketAddr, path: &str) -> bool {
    let url = format!("http://{addr}{path}");
    match agent().get(&url).call() {
        Ok(resp) => {
            let status = resp.status().as_u16();
            (200..400).contains(&status)
        }
        Err(_) => false,
    }
}

/// Whether something accepts a TCP connection at `addr`.
pub fn tcp(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn serve(status: &'static str) -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten().take(4) {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf);
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        addr
    }

    #[test]
    fn http_status_decides() {
        assert!(http(serve("200 OK"), "/healthz"));
        assert!(http(serve("302 Found"), "/"));
        assert!(!http(serve("500 Internal Server Error"), "/"));
        assert!(!http(serve("404 Not Found"), "/"));
    }

    #[test]
    fn closed_ports_fail_fast() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        assert!(tcp(addr));
        drop(l);
        assert!(!tcp(addr));
        assert!(!http(addr, "/"));
    }
}
