//! Egress proxy load: CONNECT set-up rate and tunnel throughput against a
//! direct connection, on loopback, with the real `rempart` binary.
//!
//! `cargo bench --bench egress` (knobs: `REMPART_BENCH_BYTES`, default
//! 2 GiB per throughput run; `REMPART_BENCH_CONNECTS`, default 5000;
//! `REMPART_BENCH_ROUNDS`, default 3; `REMPART_BENCH_PIPE_BUDGET`, e.g.
//! `0`, sets `[egress] tunnel_pipe_budget`). Prints one line per
//! measurement; the numbers in docs/performance.md come from it.
//!
//! Two more knobs put the destination on the other side of a network link
//! (`benches/egress_link.sh` drives them, in network namespaces of its
//! own): `REMPART_BENCH_SINK_ONLY=ADDR` only serves the sink on `ADDR`
//! until killed; `REMPART_BENCH_TARGET=ADDR` pushes to that sink instead
//! of starting one, and lets rempart's policy through to its address.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A sink that reads and discards everything, then answers with the byte
/// count so that the sender knows the receiver saw it all.
fn sink(on: &str) -> SocketAddr {
    let l = TcpListener::bind(on).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0u64;
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k as u64,
                    }
                }
                let _ = s.write_all(&n.to_be_bytes());
            });
        }
    });
    addr
}

fn start_rempart(dir: &Path, target: SocketAddr) -> (Child, SocketAddr) {
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    for e in std::fs::read_dir(repo).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, policies.join(p.file_name().unwrap())).unwrap();
    }
    let data = policies.join("data.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&data).unwrap()).unwrap();
    v["settings"]["egress"]["internal_networks"] =
        serde_json::json!(["127.0.0.0/8", format!("{}/32", target.ip())]);
    std::fs::write(&data, v.to_string()).unwrap();
    let mut config = String::from("[egress]\n");
    if let Ok(budget) = std::env::var("REMPART_BENCH_PIPE_BUDGET") {
        config.push_str(&format!("tunnel_pipe_budget = {budget:?}\n"));
    }
    let config_path = dir.join("rempart.toml");
    std::fs::write(&config_path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_rempart"))
        .args([
            "serve",
            "--config",
            config_path.to_str().unwrap(),
            "--egress",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--policies",
            policies.to_str().unwrap(),
            "--audit",
            dir.join("audit.jsonl").to_str().unwrap(),
        ])
        .env("RUST_LOG", "warn,rempart::serve=info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines.next().expect("rempart exited").unwrap();
        if let Some(i) = line.find(" egress=") {
            let a = line[i + 8..].split_whitespace().next().unwrap();
            break a.parse().unwrap();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

fn open_tunnel(proxy: SocketAddr, target: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_nodelay(true).unwrap();
    write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// The yardstick "a plain copy": a relay that accepts a connection, opens
/// one to `target`, and copies each way with a 64 KiB buffer in two
/// threads. Like the tunnel, every byte crosses two TCP connections.
fn plain_relay(target: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(client) = s else { continue };
            let Ok(upstream) = TcpStream::connect(target) else {
                continue;
            };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), upstream.try_clone().unwrap()),
                (upstream, client),
            ] {
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if to.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    addr
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat(5): 12 and 13 here.
    // The kernel reports them in USER_HZ, 100 on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

fn push(mut s: TcpStream, bytes: u64) -> Duration {
    let block = vec![0x5au8; 256 * 1024];
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        s.write_all(&block).unwrap();
        sent += block.len() as u64;
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut n = [0u8; 8];
    s.read_exact(&mut n).unwrap();
    assert_eq!(
        u64::from_be_bytes(n),
        sent,
        "the sink did not get every byte"
    );
    started.elapsed()
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing
    // useful either way: run only when benchmarking.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    if let Ok(on) = std::env::var("REMPART_BENCH_SINK_ONLY") {
        println!("sink on {}", sink(&on));
        loop {
            std::thread::park();
        }
    }
    let bytes = env_or("REMPART_BENCH_BYTES", 2 << 30);
    let connects = env_or("REMPART_BENCH_CONNECTS", 5000);
    let rounds = env_or("REMPART_BENCH_ROUNDS", 3);
    let dir = tempfile::tempdir().unwrap();
    let target = match std::env::var("REMPART_BENCH_TARGET") {
        Ok(addr) => addr.parse().expect("REMPART_BENCH_TARGET: an IP:port"),
        Err(_) => sink("127.0.0.1:0"),
    };
    let (mut child, proxy) = start_rempart(dir.path(), target);

    let relay = plain_relay(target);
    for round in 1..=rounds {
        let direct = push(TcpStream::connect(target).unwrap(), bytes);
        let copied = push(TcpStream::connect(relay).unwrap(), bytes);
        let cpu_before = cpu_seconds(child.id());
        let tunnel = push(open_tunnel(proxy, target), bytes);
        let cpu = cpu_seconds(child.id()) - cpu_before;
        let gbps = |d: Duration| bytes as f64 * 8.0 / d.as_secs_f64() / 1e9;
        println!(
            "round {round}: throughput direct {:.2} Gbit/s, plain copy relay {:.2} Gbit/s, tunnel {:.2} Gbit/s; \
             tunnel/direct {:.2}, tunnel/relay {:.2}; rempart CPU {:.2} s per GiB",
            gbps(direct),
            gbps(copied),
            gbps(tunnel),
            direct.as_secs_f64() / tunnel.as_secs_f64(),
            copied.as_secs_f64() / tunnel.as_secs_f64(),
            cpu / (bytes as f64 / f64::from(1u32 << 30)),
        );
        let started = Instant::now();
        for _ in 0..connects {
            let s = open_tunnel(proxy, target);
            drop(s);
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "round {round}: CONNECT set-up {:.0} tunnels/s sequential ({:.1} µs each, decision + connect + 200)",
            connects as f64 / secs,
            secs * 1e6 / connects as f64
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}
