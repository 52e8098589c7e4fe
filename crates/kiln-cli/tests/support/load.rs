//! Steady HTTP load for the zero-downtime tests: clients that send
//! `GET PATH` over and over until stopped, counting every answer that is
//! not a 200 as a failure.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `GET path` from `addr` (`host:port`) over HTTP/1.0: the body of a 200,
/// else an error saying what went wrong.
pub fn get(addr: &str, path: &str) -> Result<String, String> {
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read: {e}"))?;
    if !out.starts_with("HTTP/1.") || !out.contains(" 200 ") {
        return Err(format!("bad response: {:?}", out.lines().next()));
    }
    Ok(out.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

/// Requests until stopped: (ok, failed, errors seen).
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    handles: Vec<std::thread::JoinHandle<Vec<String>>>,
}

impl Load {
    /// `clients` clients asking `127.0.0.1:port` for `/`.
    pub fn local(port: u16, clients: usize) -> Load {
        Load::start(format!("127.0.0.1:{port}"), "/", clients)
    }

    /// `clients` clients asking `addr` for `path`.
    pub fn start(addr: String, path: &'static str, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let handles = (0..clients)
            .map(|_| {
                let (stop, ok, failed, addr) =
                    (stop.clone(), ok.clone(), failed.clone(), addr.clone());
                std::thread::spawn(move || {
                    let mut errors = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        match get(&addr, path) {
                            Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                errors.push(e);
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                    errors
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            handles,
        }
    }

    /// Successful requests so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the load and asserts that every request succeeded and that
    /// more than `min` were sent (so zero failures means something).
    pub fn finish_clean(self, min: u64) -> u64 {
        let (ok, failed, errors) = self.finish();
        assert_eq!(
            failed,
            0,
            "{failed} of {} requests failed: {:?}",
            ok + failed,
            &errors[..errors.len().min(5)]
        );
        assert!(ok > min, "only {ok} requests were sent");
        eprintln!("{ok} requests, 0 failed");
        ok
    }

    /// Stops the load: (ok, failed, errors).
    pub fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let errors = self
            .handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            errors,
        )
    }
}
