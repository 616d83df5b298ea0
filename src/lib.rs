//! rempart: a sovereignty gateway. See README.md and docs/.
//!
//! Where things live:
//! - [`pipeline`]: the road of a request, one module per stage;
//! - [`input`]: the policy input document the stages assemble;
//! - [`profile`]: CRM profiles, the route tables that say what a request touches;
//! - [`policy`]: loading, compiling, evaluating and reloading Rego;
//! - [`audit`]: the audit trail writer;
//! - [`metrics`], [`admin`]: Prometheus metrics and the admin listener;
//! - [`geo`]: location and jurisdiction of addresses (GeoIP, ASN, operator registry);
//! - [`reload`]: the hot-reload watcher shared by policies, geo data, certificates and JWKS files;
//! - [`tls`]: rustls termination, client certificates, TLS towards the upstream;
//! - [`config`]: the configuration file;
//! - [`serve`]: process wiring, signals and shutdown;
//! - [`cli`]: the command line.

pub mod admin;
pub mod audit;
pub mod cli;
pub mod config;
pub mod geo;
pub mod input;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod profile;
pub mod reload;
pub mod report;
pub mod serve;
pub mod tls;
