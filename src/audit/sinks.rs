//! Copies of the trail for the tools a team already runs: JSON lines on
//! standard output (container log collectors) and syslog RFC 5424 (SIEMs)
//! over UDP, TCP, TLS (RFC 5425) or a unix socket. The OPA-compatible
//! decision log ([`super::decision_log`]) is started through [`spawn`].
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
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use crate::metrics::Metrics;

/// Where syslog messages go, parsed from `udp://host:port`,
/// `tcp://host:port`, `tls://host:port` or `unix:///path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyslogTarget {
    Udp(String),
    Tcp(String),
    /// RFC 5425: the TCP framing inside TLS.
    Tls(String),
    Unix(std::path::PathBuf),
}

impl SyslogTarget {
    pub fn parse(s: &str) -> anyhow::Result<SyslogTarget> {
        if let Some(addr) = s.strip_prefix("udp://") {
            Ok(SyslogTarget::Udp(addr.to_string()))
        } else if let Some(addr) = s.strip_prefix("tcp://") {
            Ok(SyslogTarget::Tcp(addr.to_string()))
        } else if let Some(addr) = s.strip_prefix("tls://") {
            server_name(addr)?;
            Ok(SyslogTarget::Tls(addr.to_string()))
        } else if let Some(path) = s.strip_prefix("unix://") {
            Ok(SyslogTarget::Unix(path.into()))
        } else {
            bail!(
                "syslog target {s:?}: write udp://HOST:PORT, tcp://HOST:PORT, tls://HOST:PORT or unix:///PATH"
            )
        }
    }
}

/// The name a `tls://HOST:PORT` collector's certificate must carry.
fn server_name(addr: &str) -> anyhow::Result<ServerName<'static>> {
    let host = match addr.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => addr.rsplit_once(':').map_or(addr, |(h, _)| h),
    };
    if host.is_empty() || !addr.contains(':') {
        bail!("syslog target tls://{addr}: write tls://HOST:PORT");
    }
    ServerName::try_from(host.to_string()).map_err(|e| {
        anyhow::anyhow!("syslog target tls://{addr}: {host:?} is not a valid name: {e}")
    })
}

/// The TLS side of a `tls://` target: how to verify the collector and
/// which certificate to present (`[audit] syslog_ca`, `syslog_client_cert`,
/// `syslog_client_key`).
#[derive(Debug, Clone, Default)]
pub struct SyslogTls {
    pub ca: Option<std::path::PathBuf>,
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
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
    tls_config: Option<Arc<ClientConfig>>,
    tls: Option<Box<StreamOwned<ClientConnection, TcpStream>>>,
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

impl Syslog {
    /// A connected TCP stream to `addr`, or an error without trying when
    /// the last attempt failed less than a second ago.
    fn connect(&mut self, addr: &str) -> std::io::Result<TcpStream> {
        if self.retry_at.is_some_and(|t| Instant::now() < t) {
            return Err(std::io::Error::other("collector down; line dropped"));
        }
        let attempt = TcpStream::connect(addr).and_then(|s| {
            s.set_write_timeout(Some(Duration::from_secs(5)))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            Ok(s)
        });
        match attempt {
            Ok(s) => {
                self.retry_at = None;
                Ok(s)
            }
            Err(e) => {
                self.retry_at = Some(Instant::now() + Duration::from_secs(1));
                Err(e)
            }
        }
    }

    /// Connects and completes the TLS handshake (so that a collector with
    /// the wrong certificate is reported at once, not after a write).
    fn connect_tls(
        &mut self,
        addr: &str,
    ) -> std::io::Result<StreamOwned<ClientConnection, TcpStream>> {
        let config = self
            .tls_config
            .clone()
            .ok_or_else(|| std::io::Error::other("no TLS configuration"))?;
        let name = server_name(addr).map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        let mut sock = self.connect(addr)?;
        let mut conn = ClientConnection::new(config, name).map_err(std::io::Error::other)?;
        let handshake = (|| {
            while conn.is_handshaking() {
                conn.complete_io(&mut sock)?;
            }
            Ok(())
        })();
        if let Err(e) = handshake {
            self.retry_at = Some(Instant::now() + Duration::from_secs(1));
            return Err(e);
        }
        Ok(StreamOwned::new(conn, sock))
    }
}

/// RFC 6587 / RFC 5425 octet counting: `LEN SP MSG`.
fn octet_counted(msg: &[u8]) -> Vec<u8> {
    let mut framed = format!("{} ", msg.len()).into_bytes();
    framed.extend_from_slice(msg);
    framed
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
            SyslogTarget::Tls(addr) => {
                if self.tls.is_none() {
                    let addr = addr.clone();
                    self.tls = Some(Box::new(self.connect_tls(&addr)?));
                }
                if let Some(s) = &mut self.tls {
                    if let Err(e) = s.write_all(&octet_counted(&msg)).and_then(|()| s.flush()) {
                        self.tls = None;
                        return Err(e);
                    }
                }
                Ok(())
            }
            SyslogTarget::Tcp(addr) => {
                if self.tcp.is_none() {
                    let addr = addr.clone();
                    self.tcp = Some(self.connect(&addr)?);
                }
                let framed = octet_counted(&msg);
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
    tls: &SyslogTls,
    capacity: usize,
    metrics: Arc<Metrics>,
) -> anyhow::Result<SinkHandle> {
    let tls_config = match &target {
        SyslogTarget::Tls(_) => {
            let pair = tls
                .client_cert
                .as_ref()
                .map(|(c, k)| (c.as_path(), k.as_path()));
            Some(Arc::new(
                crate::tls::client_config(tls.ca.as_deref(), pair).context(
                    "[audit] syslog TLS (syslog_ca, syslog_client_cert, syslog_client_key)",
                )?,
            ))
        }
        _ => None,
    };
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
            tls_config,
            tls: None,
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
        assert_eq!(
            SyslogTarget::parse("tls://logs.example:6514").unwrap(),
            SyslogTarget::Tls("logs.example:6514".into())
        );
        assert!(SyslogTarget::parse("tls://[::1]:6514").is_ok());
        assert!(SyslogTarget::parse("tls://logs.example").is_err());
        assert_eq!(facility_code("local0"), Some(16));
        assert_eq!(facility_code("local9"), None);
    }
}
