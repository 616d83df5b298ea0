//! TLS with rustls: termination on the ingress listener (with optional
//! client certificates), and the client side towards an `https://` upstream
//! or JWKS endpoint.
//!
//! The crypto provider is *ring*: it builds from a small amount of C and
//! assembly with no CMake step, where aws-lc-rs needs a long native build.
//! Only TLS 1.2 and 1.3 are offered.
//!
//! The ingress certificate is served through [`CertResolver`], which holds
//! the key pair in an `ArcSwap`: a reload swaps it for new handshakes while
//! open connections keep the session they negotiated.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};

use crate::config::{ClientAuth, ServerTlsConfig, UpstreamTlsConfig};

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The process's one crypto provider.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate of a PEM file, in order.
pub fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: invalid PEM", path.display()))?;
    if certs.is_empty() {
        bail!("{}: no CERTIFICATE block found", path.display());
    }
    Ok(certs)
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("cannot read a private key from {}", path.display()))
}

/// A trust store made of the certificates of a PEM bundle.
pub fn read_roots(path: &Path) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots
            .add(cert)
            .with_context(|| format!("{}: not a usable CA certificate", path.display()))?;
    }
    Ok(roots)
}

/// Loads a certificate chain and its key, checking that they belong together.
pub fn certified_key(cert: &Path, key: &Path) -> anyhow::Result<CertifiedKey> {
    let chain = read_certs(cert)?;
    let key_der = read_key(key)?;
    CertifiedKey::from_der(chain, key_der, &provider()).with_context(|| {
        format!(
            "{} and {} do not make a usable certificate and key pair",
            cert.display(),
            key.display()
        )
    })
}

/// Serves the current ingress certificate; [`CertResolver::reload`]
/// replaces it for the handshakes that follow.
#[derive(Debug)]
pub struct CertResolver {
    current: ArcSwap<CertifiedKey>,
    cert: PathBuf,
    key: PathBuf,
}

impl CertResolver {
    pub fn open(cert: &Path, key: &Path) -> anyhow::Result<Self> {
        Ok(CertResolver {
            current: ArcSwap::from_pointee(certified_key(cert, key)?),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        })
    }

    /// Reads the files again; on error the serving certificate stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let fresh = certified_key(&self.cert, &self.key)?;
        self.current.store(Arc::new(fresh));
        Ok(())
    }

    pub fn paths(&self) -> Vec<PathBuf> {
        vec![self.cert.clone(), self.key.clone()]
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// A listener's TLS setup: the rustls configuration and the resolver to
/// reload.
pub struct Ingress {
    pub config: Arc<ServerConfig>,
    pub resolver: Arc<CertResolver>,
}

/// TLS for the ingress listener, which speaks HTTP/2 and HTTP/1.1.
pub fn ingress(cfg: &ServerTlsConfig) -> anyhow::Result<Ingress> {
    listener(cfg, "server.tls", &[b"h2", b"http/1.1"])
}

/// TLS for the egress listener (an HTTPS proxy), which speaks HTTP/1.1
/// only: `CONNECT` tunnels are HTTP/1.1 upgrades here.
pub fn egress(cfg: &ServerTlsConfig) -> anyhow::Result<Ingress> {
    listener(cfg, "egress.tls", &[b"http/1.1"])
}

fn listener(cfg: &ServerTlsConfig, table: &str, alpn: &[&[u8]]) -> anyhow::Result<Ingress> {
    let resolver = Arc::new(CertResolver::open(&cfg.cert, &cfg.key)?);
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .context("TLS protocol versions")?;
    let builder = match (&cfg.client_ca, cfg.client_auth) {
        (Some(ca), ClientAuth::Optional | ClientAuth::Required) => {
            let roots = read_roots(ca).with_context(|| format!("[{table}] client_ca"))?;
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            if cfg.client_auth == ClientAuth::Optional {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier.build().with_context(|| {
                format!("[{table}] cannot build the client certificate verifier")
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config =
        builder.with_cert_resolver(Arc::clone(&resolver) as Arc<dyn ResolvesServerCert>);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Ingress {
        config: Arc::new(config),
        resolver,
    })
}

/// The connector of rempart's own outbound HTTP(S) calls (JWKS, bundle
/// server, decision-log collector): HTTP/1.1, and TLS trusting `ca` (or the
/// built-in Mozilla roots) for `https` URLs. `setting` names the CA setting
/// in errors (`[identity.jwt] jwks_ca`).
pub fn https_connector(ca: Option<&Path>, setting: &str) -> anyhow::Result<HttpsConnector> {
    let tls = client_config(ca, None).with_context(|| setting.to_string())?;
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build())
}

/// See [`https_connector`].
pub type HttpsConnector =
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// A client configuration trusting `ca` (or the built-in Mozilla roots),
/// presenting the optional client certificate. No ALPN here: the
/// hyper-rustls connector offers what its HTTP client speaks.
pub fn client_config(
    ca: Option<&Path>,
    client_cert: Option<(&Path, &Path)>,
) -> anyhow::Result<ClientConfig> {
    let roots = match ca {
        Some(p) => read_roots(p)?,
        None => RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .context("TLS protocol versions")?
        .with_root_certificates(roots);
    let config = match client_cert {
        Some((cert, key)) => builder
            .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
            .with_context(|| {
                format!(
                    "{} and {} do not make a usable client certificate",
                    cert.display(),
                    key.display()
                )
            })?,
        None => builder.with_no_client_auth(),
    };
    Ok(config)
}

/// The client configuration towards the upstream.
pub fn upstream_client_config(cfg: &UpstreamTlsConfig) -> anyhow::Result<ClientConfig> {
    let pair = cfg.client_cert.as_deref().zip(cfg.client_key.as_deref());
    client_config(cfg.ca.as_deref(), pair).context("[upstream.tls]")
}

/// What a verified client certificate says about its holder.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientCert {
    /// Subject distinguished name, RFC 4514 style (`CN=alice, O=Example`).
    pub subject: String,
    /// The subject's common name, when it has one.
    pub common_name: Option<String>,
    pub issuer: String,
    /// Subject alternative names as `dns:…`, `email:…`, `uri:…`, `ip:…`.
    pub sans: Vec<String>,
    /// SHA-256 of the DER certificate, lower-case hex.
    pub fingerprint_sha256: String,
    pub email: Option<String>,
}

/// Describes the end-entity certificate of a verified client (rustls has
/// already checked its chain, validity and key usage).
pub fn describe_client_cert(der: &CertificateDer<'_>) -> Option<ClientCert> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(String::from);
    let mut sans = Vec::new();
    let mut email = None;
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(d) => sans.push(format!("dns:{d}")),
                GeneralName::RFC822Name(e) => {
                    email.get_or_insert_with(|| e.to_string());
                    sans.push(format!("email:{e}"));
                }
                GeneralName::URI(u) => sans.push(format!("uri:{u}")),
                GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b).ok().map(std::net::IpAddr::from),
                        16 => <[u8; 16]>::try_from(*b).ok().map(std::net::IpAddr::from),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        sans.push(format!("ip:{ip}"));
                    }
                }
                _ => {}
            }
        }
    }
    Some(ClientCert {
        subject: cert.subject().to_string(),
        common_name,
        issuer: cert.issuer().to_string(),
        sans,
        fingerprint_sha256: hex::encode(Sha256::digest(der.as_ref())),
        email,
    })
}

/// The `reason` label of a failed handshake.
pub fn handshake_failure_reason(err: &std::io::Error) -> &'static str {
    let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return match err.kind() {
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
                "client_closed"
            }
            _ => "io",
        };
    };
    match tls {
        rustls::Error::NoCertificatesPresented => "client_cert_missing",
        rustls::Error::InvalidCertificate(_) => "client_cert_invalid",
        rustls::Error::PeerIncompatible(_) | rustls::Error::NoApplicationProtocol => "incompatible",
        rustls::Error::AlertReceived(_) => "alert_received",
        _ => "protocol",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_pem_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "nothing here\n").unwrap();
        let err = read_certs(&empty).unwrap_err().to_string();
        assert!(
            err.contains("empty.pem") && err.contains("no CERTIFICATE"),
            "{err}"
        );
        let err = format!("{:#}", read_key(&dir.path().join("nope.pem")).unwrap_err());
        assert!(err.contains("nope.pem"), "{err}");
    }
}
