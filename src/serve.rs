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
use crate::audit::AuditSink;
use crate::config::Config;
use crate::geo::GeoStore;
use crate::metrics::Metrics;
use crate::pipeline::identify::jwt::JwtVerifier;
use crate::pipeline::identify::Identifier;
use crate::pipeline::{accept, Gateway, Security};
use crate::policy::{PolicySource, PolicyStore};

pub fn run(cfg: Config, source: PolicySource) -> anyhow::Result<()> {
    cfg.validate()?;
    let metrics = Arc::new(Metrics::new());
    let policies = PolicyStore::open(source.clone(), Arc::clone(&metrics))
        .with_context(|| format!("cannot load policies from {source}"))?;
    let geo = GeoStore::open(cfg.geo.files(), cfg.geo.optional, Arc::clone(&metrics))?;
    let (audit, audit_writer) = AuditSink::open(
        &cfg.audit.path,
        cfg.audit.flush_interval.0,
        cfg.audit.queue_capacity,
        Arc::clone(&metrics),
    )?;

    let upstream_ip = match &cfg.upstream.url {
        Some(url) => crate::pipeline::locate::resolve_upstream(url)?,
        None => anyhow::bail!("no upstream configured"),
    };
    // TLS and identity are set up once and shared by every worker: one
    // certificate to reload, one JWKS cache and refresher.
    let ingress_tls = cfg
        .server
        .tls
        .as_ref()
        .map(crate::tls::ingress)
        .transpose()
        .context("[server.tls]")?;
    let upstream_tls = Arc::new(crate::tls::upstream_client_config(&cfg.upstream.tls)?);
    let jwt = cfg
        .identity
        .jwt
        .as_ref()
        .map(|j| JwtVerifier::start(j, Arc::clone(&metrics)).map(Arc::new))
        .transpose()
        .context("[identity.jwt]")?;
    let identifier = Arc::new(Identifier::new(&cfg, jwt.clone(), Arc::clone(&metrics)));
    let security = Security {
        identifier: Arc::clone(&identifier),
        upstream_tls,
    };
    let acceptor = ingress_tls
        .as_ref()
        .map(|t| tokio_rustls::TlsAcceptor::from(Arc::clone(&t.config)));

    let workers = cfg.worker_count();
    let listeners = accept::bind_workers(cfg.server.listen, workers)?;
    let ingress_addr = listeners
        .first()
        .map(|l| l.local_addr())
        .transpose()?
        .context("no listener")?;
    let admin_listener = std::net::TcpListener::bind(cfg.admin.listen)
        .with_context(|| format!("cannot listen on admin address {}", cfg.admin.listen))?;
    admin_listener.set_nonblocking(true)?;
    let admin_addr = admin_listener.local_addr()?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut threads = Vec::with_capacity(workers);
    for (i, listener) in listeners.into_iter().enumerate() {
        let gateway = Arc::new(Gateway::new(
            &cfg,
            Arc::clone(&policies),
            Arc::clone(&geo),
            audit.clone(),
            Arc::clone(&metrics),
            upstream_ip,
            &security,
        )?);
        let acceptor = acceptor.clone();
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
                rt.block_on(accept::serve(
                    listener,
                    gateway,
                    rx,
                    header_timeout,
                    drain,
                    acceptor,
                ))
            })
            .context("cannot start worker thread")?;
        threads.push(handle);
    }
    // The workers hold the only senders now: the writer stops when they end.
    drop(audit);

    let (reload_tx, reload_rx) = mpsc::channel();
    policies.watch(reload_rx, cfg.policy.reload_interval.0);
    let (geo_reload_tx, geo_reload_rx) = mpsc::channel();
    geo.watch(geo_reload_rx, cfg.geo.reload_interval.0);
    let (tls_reload_tx, tls_reload_rx) = mpsc::channel();
    if let (Some(t), Some(tls_cfg)) = (&ingress_tls, &cfg.server.tls) {
        let resolver = Arc::clone(&t.resolver);
        let m = Arc::clone(&metrics);
        crate::reload::spawn_watcher(
            "tls",
            tls_cfg.reload_interval.0,
            tls_reload_rx,
            resolver.paths(),
            move || match resolver.reload() {
                Ok(()) => {
                    m.tls_cert_reloads_success.inc();
                    tracing::info!("TLS certificate reloaded");
                }
                Err(e) => {
                    m.tls_cert_reloads_failure.inc();
                    tracing::error!(
                        "TLS certificate reload failed, keeping the previous one: {e:#}"
                    );
                }
            },
        );
    }
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
        tracing::info!(
            ingress = %ingress_addr,
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
                    let _ = tls_reload_tx.send(());
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

    audit_writer.finish();
    tracing::info!("audit trail flushed; stopped");
    Ok(())
}
