//! Copies of the trail for the tools a team already runs: JSON lines on
//! standard output (container log collectors) and syslog RFC 5424 (SIEMs).
//!
//! The file stays the source of truth: the writer hands a sink only lines
//! that are already in the file. Each sink has its own bounded queue and
//! thread, so a slow or absent collector never slows requests or the file;
//! when its queue is full, lines are dropped for that sink only and
//! counted (`rempart_audit_sink_dropped_total{sink}`).

use std::io::Write;
use std::net::{TcpStream, UdpSocket};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};

use crate::metrics::Metrics;

/// Where syslog messages go, parsed from `udp://host:port`,
/// `tcp://host:port` or `unix:///path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyslogTarget {
    Udp(String),
    Tcp(String),
    Unix(std::path::PathBuf),
}

impl SyslogTarget {
    pub fn parse(s: &str) -> anyhow::Result<SyslogTarget> {
        if let Some(addr) = s.strip_prefix("udp://") {
            Ok(SyslogTarget::Udp(addr.to_string()))
        } else if let Some(addr) = s.strip_prefix("tcp://") {
            Ok(SyslogTarget::Tcp(addr.to_string()))
        } else if let Some(path) = s.strip_prefix("unix://") {
            Ok(SyslogTarget::Unix(path.into()))
        } else {
            bail!("syslog target {s:?}: write udp://HOST:PORT, tcp://HOST:PORT or unix:///PATH")
        }
    }
}

/// Syslog facility names (RFC 5424 table 1) accepted in the configuration.
pub fn facility_code(name: &str) -> Option<u8> {
    Some(match name {
        "kern" => 0,
        "user" => 1,
        "daemon" => 3,
        "auth" => 4,
        "authpriv" => 10,
        "local0" => 16,
        "local1" => 17,
        "local2" => 18,
        "local3" => 19,
        "local4" => 20,
        "local5" => 21,
        "local6" => 22,
        "local7" => 23,
        _ => return None,
    })
}

/// One sink's sending side, held by the writer.
pub struct SinkHandle {
    name: &'static str,
    /// The sink reads what its queue could not take back from the trail
    /// file (the decision log): a full queue defers lines, it drops none.
    rereads_trail: bool,
    tx: Option<SyncSender<Vec<u8>>>,
    handle: Option<std::thread::JoinHandle<()>>,
    metrics: Arc<Metrics>,
}

impl SinkHandle {
    /// Hands over a batch of complete lines (already in the file).
    pub fn send(&self, lines: &[u8]) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(lines.to_vec()) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) if self.rereads_trail => {}
            Err(TrySendError::Full(batch)) | Err(TrySendError::Disconnected(batch)) => {
                let n = batch.iter().filter(|&&b| b == b'\n').count() as u64;
                self.metrics.audit_sink_dropped(self.name).inc_by(n);
            }
        }
    }

    /// Lets the sink send what it holds, then stops it.
    pub fn finish(mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            if h.join().is_err() {
                tracing::error!(sink = self.name, "audit sink thread panicked");
            }
        }
    }
}

/// Starts a sink thread draining a queue of `capacity` batches into `out`.
fn start(
    name: &'static str,
    capacity: usize,
    metrics: Arc<Metrics>,
    mut out: impl Output + Send + 'static,
) -> anyhow::Result<SinkHandle> {
    let m = Arc::clone(&metrics);
    spawn(name, capacity, metrics, false, move |rx| {
        run(name, rx, &mut out, &m)
    })
}

/// Starts a sink thread running `body` on the receiving end of a queue of
/// `capacity` batches of trail lines.
pub(super) fn spawn(
    name: &'static str,
    capacity: usize,
    metrics: Arc<Metrics>,
    rereads_trail: bool,
    body: impl FnOnce(Receiver<Vec<u8>>) + Send + 'static,
) -> anyhow::Result<SinkHandle> {
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(capacity);
    let handle = std::thread::Builder::new()
        .name(format!("audit-{name}"))
        .spawn(move || body(rx))
        .with_context(|| format!("cannot start the audit {name} thread"))?;
    Ok(SinkHandle {
        name,
        rereads_trail,
        tx: Some(tx),
        handle: Some(handle),
        metrics,
    })
}

fn run(name: &'static str, rx: Receiver<Vec<u8>>, out: &mut dyn Output, metrics: &Metrics) {
    for batch in rx {
        for line in batch.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            if let Err(e) = out.send(line) {
                metrics.audit_sink_errors(name).inc();
                tracing::warn!(sink = name, "audit sink: {e}");
            }
        }
        if let Err(e) = out.flush() {
            metrics.audit_sink_errors(name).inc();
            tracing::warn!(sink = name, "audit sink: {e}");
        }
    }
}

trait Output {
    /// Sends one line (without its newline).
    fn send(&mut self, line: &[u8]) -> std::io::Result<()>;
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Stdout(std::io::BufWriter<std::io::Stdout>);

impl Output for Stdout {
    fn send(&mut self, line: &[u8]) -> std::io::Result<()> {
        self.0.write_all(line)?;
        self.0.write_all(b"\n")
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

pub fn stdout(capacity: usize, metrics: Arc<Metrics>) -> anyhow::Result<SinkHandle> {
    start(
        "stdout",
        capacity,
        metrics,
        Stdout(std::io::BufWriter::new(std::io::stdout())),
    )
}

/// RFC 5424 messages over UDP (one datagram each), TCP (octet-counting
/// framing, RFC 6587) or a unix datagram socket (like `/dev/log`).
struct Syslog {
    target: SyslogTarget,
    pri: u8,
    hostname: String,
    pid: u32,
    udp: Option<UdpSocket>,
    tcp: Option<TcpStream>,
    unix: Option<std::os::unix::net::UnixDatagram>,
    /// After a failed TCP connect, when to try again.
    retry_at: Option<Instant>,
}

impl Syslog {
    fn message(&self, line: &[u8]) -> Vec<u8> {
        let ts = humantime::format_rfc3339_micros(SystemTime::now());
        let mut m = format!(
            "<{}>1 {ts} {} rempart {} audit - ",
            self.pri, self.hostname, self.pid
        )
        .into_bytes();
        m.extend_from_slice(line);
        m
    }
}

impl Output for Syslog {
    fn send(&mut self, line: &[u8]) -> std::io::Result<()> {
        let msg = self.message(line);
        match &self.target {
            SyslogTarget::Udp(addr) => {
                if self.udp.is_none() {
                    let sock = UdpSocket::bind(if addr.starts_with('[') {
                        "[::]:0"
                    } else {
                        "0.0.0.0:0"
                    })?;
                    sock.connect(addr)?;
                    self.udp = Some(sock);
                }
                if let Some(sock) = &self.udp {
                    sock.send(&msg)?;
                }
                Ok(())
            }
            SyslogTarget::Unix(path) => {
                if self.unix.is_none() {
                    let sock = std::os::unix::net::UnixDatagram::unbound()?;
                    sock.connect(path)?;
                    self.unix = Some(sock);
                }
                if let Some(sock) = &self.unix {
                    if let Err(e) = sock.send(&msg) {
                        // The listener may have been restarted: reconnect next time.
                        self.unix = None;
                        return Err(e);
                    }
                }
                Ok(())
            }
            SyslogTarget::Tcp(addr) => {
                if self.tcp.is_none() {
                    if self.retry_at.is_some_and(|t| Instant::now() < t) {
                        return Err(std::io::Error::other("collector down; line dropped"));
                    }
                    match TcpStream::connect(addr) {
                        Ok(s) => {
                            s.set_write_timeout(Some(Duration::from_secs(5)))?;
                            self.tcp = Some(s);
                            self.retry_at = None;
                        }
                        Err(e) => {
                            self.retry_at = Some(Instant::now() + Duration::from_secs(1));
                            return Err(e);
                        }
                    }
                }
                let mut framed = format!("{} ", msg.len()).into_bytes();
                framed.extend_from_slice(&msg);
                if let Some(s) = &mut self.tcp {
                    if let Err(e) = s.write_all(&framed) {
                        self.tcp = None;
                        return Err(e);
                    }
                }
                Ok(())
            }
        }
    }
}

pub fn syslog(
    target: SyslogTarget,
    facility: u8,
    capacity: usize,
    metrics: Arc<Metrics>,
) -> anyhow::Result<SinkHandle> {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty() && h.is_ascii() && !h.contains(' '))
        .unwrap_or_else(|| "-".to_string());
    start(
        "syslog",
        capacity,
        metrics,
        Syslog {
            target,
            // Severity 6 (informational): a record is evidence, not an alert.
            pri: facility * 8 + 6,
            hostname,
            pid: std::process::id(),
            udp: None,
            tcp: None,
            unix: None,
            retry_at: None,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_facilities_parse() {
        assert_eq!(
            SyslogTarget::parse("udp://127.0.0.1:514").unwrap(),
            SyslogTarget::Udp("127.0.0.1:514".into())
        );
        assert_eq!(
            SyslogTarget::parse("unix:///dev/log").unwrap(),
            SyslogTarget::Unix("/dev/log".into())
        );
        assert!(SyslogTarget::parse("127.0.0.1:514")
            .unwrap_err()
            .to_string()
            .contains("udp://"));
        assert_eq!(facility_code("local0"), Some(16));
        assert_eq!(facility_code("local9"), None);
    }
}
