//! `rempart serve`: wires the pieces together and runs until SIGTERM.
//!
//! Threads: one per ingress worker (each a single-threaded event loop with
//! its own listening socket), one control thread (admin listener, signals),
//! the policy watcher and the audit writer.
//!
//! Shutdown order on SIGTERM/SIGINT: `/readyz` turns 503, workers stop
//! accepting, in-flight requests finish (bounded by `drain_timeout`), the
//! audit writer writes and fsyncs everything queued, exit 0.

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::admin::{self, AdminState};
use crate::audit::{AuditOptions, AuditSink};
use crate::config::Config;
use crate::geo::GeoStore;
use crate::metrics::Metrics;
use crate::pipeline::egress::EgressGateway;
use crate::pipeline::identify::jwt::JwtVerifier;
use crate::pipeline::identify::Identifier;
use crate::pipeline::{accept, Gateway, Security};
use crate::policy::PolicySource;

pub fn run(cfg: Config, source: PolicySource) -> anyhow::Result<()> {
    cfg.validate()?;
    let metrics = Arc::new(Metrics::new());
    // A bundle server is polled from here on; at start its persisted copy
    // (or a first download) is what serves.
    let (policies, bundle_polling) =
        crate::policy::bundle::fetch::open_store(&cfg, source.clone(), Arc::clone(&metrics))?;
    let geo = GeoStore::open(cfg.geo.files(), cfg.geo.optional, Arc::clone(&metrics))?;
    let (audit, audit_writer) = AuditSink::open(
        &cfg.audit.path,
        AuditOptions::from_config(&cfg.audit),
        Arc::clone(&metrics),
    )?;

    // The upstream's host is resolved once, here (see locate::resolve_upstream).
    let upstream_ip = cfg
        .upstream
        .url
        .as_ref()
        .map(crate::pipeline::locate::resolve_upstream)
        .transpose()?;
    // TLS and identity are set up once and shared by every worker: one
    // certificate to reload, one JWKS cache and refresher.
    let ingress_tls = cfg
        .server
        .tls
        .as_ref()
        .map(crate::tls::ingress)
        .transpose()
        .context("[server.tls]")?;
    let egress_tls = cfg
        .egress
        .tls
        .as_ref()
        .map(crate::tls::egress)
        .transpose()
        .context("[egress.tls]")?;
    let upstream_tls = Arc::new(crate::tls::upstream_client_config(&cfg.upstream.tls)?);
    let jwt = cfg
        .identity
        .jwt
        .as_ref()
        .map(|j| JwtVerifier::start(j, Arc::clone(&metrics)).map(Arc::new))
        .transpose()
        .context("[identity.jwt]")?;
    let identifier = Arc::new(Identifier::new(&cfg, jwt.clone(), Arc::clone(&metrics)));
    let profiles = Arc::new(
        crate::profile::Profiles::load(&cfg.classify.profiles).context("[classify] profiles")?,
    );
    let security = Security {
        identifier: Arc::clone(&identifier),
        upstream_tls,
        profiles,
    };
    let acceptor = ingress_tls
        .as_ref()
        .map(|t| tokio_rustls::TlsAcceptor::from(Arc::clone(&t.config)));
    let egress_acceptor = egress_tls
        .as_ref()
        .map(|t| tokio_rustls::TlsAcceptor::from(Arc::clone(&t.config)));
    let workers = cfg.worker_count();
    let ingress_listeners = match upstream_ip {
        Some(_) => accept::bind_workers(cfg.server.listen, workers)?,
        None => Vec::new(),
    };
    let egress_listeners = match cfg.egress.listen {
        Some(addr) => accept::bind_workers(addr, workers)
            .context("cannot start the egress proxy ([egress] listen)")?,
        None => Vec::new(),
    };
    let ingress_addr = ingress_listeners
        .first()
        .map(|l| l.local_addr())
        .transpose()?;
    let egress_addr = egress_listeners
        .first()
        .map(|l| l.local_addr())
        .transpose()?;
    let admin_listener = std::net::TcpListener::bind(cfg.admin.listen)
        .with_context(|| format!("cannot listen on admin address {}", cfg.admin.listen))?;
    admin_listener.set_nonblocking(true)?;
    let admin_addr = admin_listener.local_addr()?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let egress_slots = Arc::new(crate::pipeline::egress::Slots::default());
    let tunnel_pipes = Arc::new(crate::pipeline::enforce::tunnel::PipeBudget::new(
        cfg.egress.tunnel_pipe_budget.0,
    ));
    {
        let pipes = Arc::clone(&tunnel_pipes);
        metrics.refresh_before_render(move |m| {
            m.egress
                .tunnel_pipe_bytes
                .set(i64::try_from(pipes.used()).unwrap_or(i64::MAX));
        });
    }
    let mut ingress_listeners = ingress_listeners.into_iter();
    let mut egress_listeners = egress_listeners.into_iter();
    let mut threads = Vec::with_capacity(workers);
    for i in 0..workers {
        let ingress = match (ingress_listeners.next(), upstream_ip) {
            (Some(listener), Some(ip)) => Some((
                listener,
                Arc::new(Gateway::new(
                    &cfg,
                    Arc::clone(&policies),
                    Arc::clone(&geo),
                    audit.clone(),
                    Arc::clone(&metrics),
                    ip,
                    &security,
                )?),
            )),
            _ => None,
        };
        let egress = egress_listeners.next().map(|listener| {
            let cfg = cfg.clone();
            let (policies, geo, audit, metrics, slots, pipes) = (
                Arc::clone(&policies),
                Arc::clone(&geo),
                audit.clone(),
                Arc::clone(&metrics),
                Arc::clone(&egress_slots),
                Arc::clone(&tunnel_pipes),
            );
            // Built on the worker's own event loop (the resolver's sockets
            // belong to it).
            let make = move || {
                Arc::new(EgressGateway::new(
                    &cfg, policies, geo, audit, metrics, slots, pipes,
                ))
            };
            (listener, make)
        });
        let acceptor = acceptor.clone();
        let egress_acceptor = egress_acceptor.clone();
        let rx = shutdown_rx.clone();
        let header_timeout = cfg.server.header_read_timeout.0;
        let drain = cfg.server.drain_timeout.0;
        let handle = std::thread::Builder::new()
            .name(format!("worker-{i}"))
            .spawn(move || -> anyhow::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("cannot start worker event loop")?;
                rt.block_on(async move {
                    let ingress = async {
                        match ingress {
                            Some((listener, gateway)) => {
                                accept::serve(
                                    listener,
                                    gateway,
                                    rx.clone(),
                                    header_timeout,
                                    drain,
                                    acceptor,
                                )
                                .await
                            }
                            None => Ok(()),
                        }
                    };
                    let egress = async {
                        match egress {
                            Some((listener, make)) => {
                                accept::serve_egress(
                                    listener,
                                    make(),
                                    rx.clone(),
                                    drain,
                                    egress_acceptor,
                                )
                                .await
                            }
                            None => Ok(()),
                        }
                    };
                    let (a, b) = tokio::join!(ingress, egress);
                    a.and(b)
                })
            })
            .context("cannot start worker thread")?;
        threads.push(handle);
    }
    // The workers hold the only senders now: the writer stops when they end.
    drop(audit);

    let (reload_tx, reload_rx) = mpsc::channel();
    policies.watch(reload_rx, cfg.policy.reload_interval.0);
    if let Some(polling) = bundle_polling {
        polling.spawn(Arc::clone(&policies))?;
    }
    let (geo_reload_tx, geo_reload_rx) = mpsc::channel();
    geo.watch(geo_reload_rx, cfg.geo.reload_interval.0);
    let tls_reload_tx = match (&ingress_tls, &cfg.server.tls) {
        (Some(t), Some(tls_cfg)) => Some(watch_certificate(
            "tls",
            t,
            tls_cfg.reload_interval.0,
            &metrics,
        )),
        _ => None,
    };
    let egress_tls_reload_tx = match (&egress_tls, &cfg.egress.tls) {
        (Some(t), Some(tls_cfg)) => Some(watch_certificate(
            "egress-tls",
            t,
            tls_cfg.reload_interval.0,
            &metrics,
        )),
        _ => None,
    };
    let (jwks_reload_tx, jwks_reload_rx) = mpsc::channel();
    if let (Some(j), Some(jwt_cfg)) = (&jwt, &cfg.identity.jwt) {
        if let Some(path) = &jwt_cfg.jwks_file {
            let keys = Arc::clone(&j.keys);
            crate::reload::spawn_watcher(
                "jwks",
                jwt_cfg
                    .jwks_refresh_interval
                    .0
                    .min(std::time::Duration::from_secs(10)),
                jwks_reload_rx,
                vec![path.clone()],
                None,
                move || keys.reload_file(),
            );
        }
    }

    let admin_state = Arc::new(AdminState {
        metrics: Arc::clone(&metrics),
        policies: Arc::clone(&policies),
        upstream: cfg
            .upstream
            .url
            .as_ref()
            .map(|u| u.to_string())
            .unwrap_or_default(),
        ready: true.into(),
        report: admin::ReportState {
            config: Arc::new(cfg.clone()),
            geo: Arc::clone(&geo),
        },
    });

    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start control event loop")?;
    control.block_on(async {
        let listener = tokio::net::TcpListener::from_std(admin_listener)?;
        tokio::spawn(admin::serve(listener, Arc::clone(&admin_state)));
        let mut hup = signal(SignalKind::hangup())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let show = |a: Option<std::net::SocketAddr>| {
            a.map_or_else(|| "none".to_string(), |a| a.to_string())
        };
        tracing::info!(
            ingress = %show(ingress_addr),
            egress = %show(egress_addr),
            admin = %admin_addr,
            workers,
            mode = %cfg.server.mode,
            tls = ingress_tls.is_some(),
            identity = ?identifier.sources(),
            policy_revision = %policies.current().revision,
            policy_source = %source,
            upstream = %admin_state.upstream,
            audit = %cfg.audit.path.display(),
            "rempart ready"
        );
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading policies, geo data, TLS certificate and JWKS file");
                    let _ = reload_tx.send(());
                    let _ = geo_reload_tx.send(());
                    for tx in [&tls_reload_tx, &egress_tls_reload_tx].into_iter().flatten() {
                        let _ = tx.send(());
                    }
                    let _ = jwks_reload_tx.send(());
                }
                _ = term.recv() => { tracing::info!("SIGTERM: draining"); break; }
                _ = int.recv() => { tracing::info!("SIGINT: draining"); break; }
            }
        }
        admin_state.ready.store(false, Ordering::Relaxed);
        let _ = shutdown_tx.send(true);
        // Join the workers off this loop so that the admin listener keeps
        // answering (/readyz 503, /metrics) while they drain.
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                match t.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!("worker failed: {e:#}"),
                    Err(_) => tracing::error!("worker panicked"),
                }
            }
        });
        if joined.await.is_err() {
            tracing::error!("joining the workers failed");
        }
        anyhow::Ok(())
    })?;

    let unwritten = audit_writer.finish();
    if unwritten > 0 {
        anyhow::bail!(
            "{unwritten} audit records could not be written before stopping (the trail \
             could not be written; see the log above)"
        );
    }
    tracing::info!("audit trail flushed; stopped");
    Ok(())
}

/// Reloads a listener's certificate and key when their files change
/// (every `interval`) or when the returned sender is poked (SIGHUP); a
/// failed reload keeps the previous pair.
fn watch_certificate(
    name: &'static str,
    tls: &crate::tls::Ingress,
    interval: std::time::Duration,
    metrics: &Arc<Metrics>,
) -> mpsc::Sender<()> {
    let (tx, rx) = mpsc::channel();
    let resolver = Arc::clone(&tls.resolver);
    let m = Arc::clone(metrics);
    crate::reload::spawn_watcher(
        name,
        interval,
        rx,
        resolver.paths(),
        None,
        move || match resolver.reload() {
            Ok(()) => {
                m.tls_cert_reloads_success.inc();
                tracing::info!(listener = name, "TLS certificate reloaded");
            }
            Err(e) => {
                m.tls_cert_reloads_failure.inc();
                tracing::error!(
                    listener = name,
                    "TLS certificate reload failed, keeping the previous one: {e:#}"
                );
            }
        },
    );
    tx
}
