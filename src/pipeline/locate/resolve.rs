//! Part of **locate** for the egress proxy: turn a destination name into
//! addresses, once.
//!
//! The addresses returned here are the only ones the policy judges and the
//! only ones rempart connects to: there is no second lookup between the
//! decision and the connection, so a DNS answer that changes in between
//! (DNS rebinding) cannot redirect the data.

use std::net::IpAddr;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfigGroup, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::TokioResolver;

use super::canonical_ip;

/// Addresses kept from one answer; a name with more is judged on these.
pub const MAX_ADDRESSES: usize = 16;

/// Why a name gave no address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveError {
    /// No answer within the configured timeout.
    Timeout,
    /// The name does not exist or has no address record.
    NotFound(String),
    /// The resolver failed (server unreachable, refused, malformed answer).
    Failed(String),
}

impl ResolveError {
    pub fn code(&self) -> &'static str {
        match self {
            ResolveError::Timeout => "dns_timeout",
            ResolveError::NotFound(_) => "dns_not_found",
            ResolveError::Failed(_) => "dns_failure",
        }
    }
}

impl std::fmt::Display for ResolveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResolveError::Timeout => f.write_str("no DNS answer in time"),
            ResolveError::NotFound(m) | ResolveError::Failed(m) => f.write_str(m),
        }
    }
}

/// One worker's resolver.
pub enum Resolver {
    /// The operating system's resolver (`getaddrinfo`: `/etc/hosts`, then
    /// DNS as `/etc/resolv.conf` says), run on tokio's blocking pool.
    System { timeout: Duration },
    /// The configured DNS servers, queried directly.
    Servers {
        resolver: Box<TokioResolver>,
        timeout: Duration,
    },
}

impl Resolver {
    pub fn new(servers: &[std::net::SocketAddr], timeout: Duration) -> Resolver {
        if servers.is_empty() {
            return Resolver::System { timeout };
        }
        let mut group = NameServerConfigGroup::new();
        for s in servers {
            group.merge(NameServerConfigGroup::from_ips_clear(
                &[s.ip()],
                s.port(),
                true,
            ));
        }
        let config = ResolverConfig::from_parts(None, vec![], group);
        let mut opts = ResolverOpts::default();
        opts.timeout = timeout;
        opts.attempts = 1;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
        // The answer is used for one decision; a cache would only widen the
        // window in which a stale answer is believed.
        opts.cache_size = 0;
        let resolver = hickory_resolver::Resolver::builder_with_config(
            config,
            TokioConnectionProvider::default(),
        )
        .with_options(opts)
        .build();
        Resolver::Servers {
            resolver: Box::new(resolver),
            timeout,
        }
    }

    /// All addresses of `name` (canonical, without duplicates, at most
    /// [`MAX_ADDRESSES`]), in the resolver's order.
    pub async fn resolve(&self, name: &str, port: u16) -> Result<Vec<IpAddr>, ResolveError> {
        let found: Vec<IpAddr> = match self {
            Resolver::System { timeout } => {
                let lookup = tokio::net::lookup_host((name.to_string(), port));
                match tokio::time::timeout(*timeout, lookup).await {
                    Err(_) => return Err(ResolveError::Timeout),
                    Ok(Err(e)) => {
                        return Err(ResolveError::NotFound(format!(
                            "cannot resolve {name}: {e}"
                        )))
                    }
                    Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
                }
            }
            Resolver::Servers { resolver, timeout } => {
                // Fully qualified: no search domain is appended.
                let fqdn = format!("{name}.");
                // The resolver has its own per-query timeout; this bounds
                // the whole lookup (A and AAAA, retries) as well.
                match tokio::time::timeout(*timeout, resolver.lookup_ip(fqdn)).await {
                    Err(_) => return Err(ResolveError::Timeout),
                    Ok(Err(e)) if e.is_no_records_found() => {
                        return Err(ResolveError::NotFound(format!(
                            "{name} has no address record"
                        )))
                    }
                    Ok(Err(e)) => {
                        let text = e.to_string();
                        if text.contains("timed out") || text.contains("timeout") {
                            return Err(ResolveError::Timeout);
                        }
                        return Err(ResolveError::Failed(format!(
                            "cannot resolve {name}: {text}"
                        )));
                    }
                    Ok(Ok(lookup)) => lookup.iter().collect(),
                }
            }
        };
        let mut out: Vec<IpAddr> = Vec::with_capacity(found.len().min(MAX_ADDRESSES));
        for ip in found.into_iter().map(canonical_ip) {
            if !out.contains(&ip) && out.len() < MAX_ADDRESSES {
                out.push(ip);
            }
        }
        if out.is_empty() {
            return Err(ResolveError::NotFound(format!("{name} has no address")));
        }
        Ok(out)
    }
}
