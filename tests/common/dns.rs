//! A real DNS server on UDP loopback for the egress proxy's resolver
//! (`[egress] dns_servers`): answers A and AAAA queries from a table.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use tokio::net::UdpSocket;

/// A real DNS server on UDP loopback answering A/AAAA from a table.
/// `silent.test` never gets an answer; names not in the table get NXDOMAIN.
pub struct Dns {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Dns {
    pub async fn start(records: &[(&str, &[&str])]) -> Dns {
        let table: HashMap<String, Vec<IpAddr>> = records
            .iter()
            .map(|(n, ips)| {
                (
                    n.to_string(),
                    ips.iter().map(|i| i.parse().unwrap()).collect(),
                )
            })
            .collect();
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                if let Some(reply) = dns_answer(&buf[..n], &table) {
                    let _ = socket.send_to(&reply, from).await;
                }
            }
        });
        Dns { addr, task }
    }
}

fn dns_answer(q: &[u8], table: &HashMap<String, Vec<IpAddr>>) -> Option<Vec<u8>> {
    if q.len() < 12 {
        return None;
    }
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let question_end = i + 4;
    let name = labels.join(".");
    if name == "silent.test" {
        return None;
    }
    let found = table.get(&name);
    let answers: Vec<&IpAddr> = found
        .map(|ips| {
            ips.iter()
                .filter(|ip| matches!((ip, qtype), (IpAddr::V4(_), 1) | (IpAddr::V6(_), 28)))
                .collect()
        })
        .unwrap_or_default();
    let mut r = Vec::new();
    r.extend_from_slice(&q[0..2]);
    r.push(0x80 | (q[2] & 0x01)); // response, recursion desired copied
    r.push(0x80 | if found.is_some() { 0 } else { 3 }); // RA, NOERROR/NXDOMAIN
    r.extend_from_slice(&1u16.to_be_bytes());
    r.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(&q[12..question_end]);
    for ip in answers {
        r.extend_from_slice(&[0xc0, 0x0c]);
        let (t, data) = match ip {
            IpAddr::V4(v4) => (1u16, v4.octets().to_vec()),
            IpAddr::V6(v6) => (28u16, v6.octets().to_vec()),
        };
        r.extend_from_slice(&t.to_be_bytes());
        r.extend_from_slice(&1u16.to_be_bytes());
        r.extend_from_slice(&60u32.to_be_bytes());
        r.extend_from_slice(&(data.len() as u16).to_be_bytes());
        r.extend_from_slice(&data);
    }
    Some(r)
}
