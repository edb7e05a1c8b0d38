//! Start and stop: everything is opened and checked before the kernel is
//! touched, the policy is applied before the programs attach, and `/readyz`
//! turns ready only once signals and the config watcher are in place.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use tokio::sync::{mpsc, watch};

use super::{Daemon, StartError, active::ActiveKeys, watch::Triggers};
use crate::{
    config::{self, AttachMode, Config},
    confirm::Confirmer,
    datapath::Datapath,
    keys::{self, credentials},
    management::{
        self,
        api::{self, ApiState, Apply},
    },
    metrics::{self, Metrics},
    policy::PolicyState,
    shim::runtime::Shim,
    store::{self, SharedStore},
};

/// Run until SIGTERM or SIGINT. With `detach_on_exit` the datapath is
/// detached and its pins removed on the way out; otherwise it keeps enforcing.
pub async fn run(config_path: &Path, detach_on_exit: bool) -> Result<(), StartError> {
    let mut phases = crate::phases::Phases::start();
    let config = config::load(config_path).map_err(StartError::Config)?;
    phases.done("config loaded");
    // Before any socket: the listeners' descriptor reserve is computed from it.
    if let Err(e) = crate::conn::init_descriptors() {
        tracing::warn!(error = %e, "cannot read the descriptor limit");
    }
    let metrics = Arc::new(Metrics::new());
    metrics.config_last_reload_successful.set(1);
    crate::config_warnings::report(config_path, &config, &metrics.config_warnings);
    let metrics_listener = metrics::bind(config.metrics.bind).await?;
    let confirm = credentials::confirmer(&config.management)?;
    let (store, stored, applied) = open_store(&config).await?;
    phases.done("store read");
    let management_tls = config
        .management
        .tls
        .as_ref()
        .map(crate::shim::tls::TlsAcceptor::load)
        .transpose()
        .context("loading management.tls")?;
    let management_listener = tokio::net::TcpListener::bind(config.management.bind)
        .await
        .with_context(|| format!("binding management.bind {}", config.management.bind))?;

    let mut daemon = Daemon {
        config_path: config_path.to_path_buf(),
        config,
        statics: Arc::new([]),
        datapath: None,
        metrics: metrics.clone(),
        store,
        stored,
        applied,
        progress: watch::channel(applied).0,
        feed_failure: None,
        policy: PolicyState::default(),
        reconcile: None,
    };
    // Secrets from the environment are read before the kernel is touched.
    daemon.statics = keys::statics(&daemon.config.keys)?;
    let keys = daemon.key_table();
    let principals = daemon.principals()?;
    let samples = daemon.start_datapath(&mut phases)?;
    // The shim compiles from the same config snapshot; its listeners open last.
    let mut shim = Shim::start(&daemon.config, keys, metrics.clone()).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let (api, mut apply_rx, management_server) = start_management(
        &daemon,
        &shim,
        confirm,
        principals,
        management_listener,
        management_tls,
        &stop_rx,
    );
    // Signal handlers and the config watcher exist before `/readyz` turns
    // ready: a SIGHUP sent by whoever saw ready must reload, not kill us.
    let triggers = Triggers::install(&daemon.config_path)?;
    phases.done("shim, management and watcher started");
    let ready = Arc::new(AtomicBool::new(true));
    let server = tokio::spawn(metrics::serve(
        metrics_listener,
        metrics.clone(),
        ready.clone(),
        stopped(&stop_rx),
    ));
    daemon.spawn_sample_reader(samples);
    tracing::info!(
        config = %daemon.config_path.display(),
        metrics = %daemon.config.metrics.bind,
        management = %daemon.config.management.bind,
        store = %store_name(&daemon.config),
        keys = daemon.config.keys.len() + daemon.stored.len(),
        "keyfence running"
    );

    daemon
        .event_loop(&mut shim, &api, &mut apply_rx, triggers)
        .await?;
    if detach_on_exit {
        tracing::info!("stopping: draining listeners, then detaching the datapath");
    } else {
        tracing::info!("stopping: draining listeners; the pinned datapath keeps enforcing");
    }
    ready.store(false, Ordering::Release);
    let _ = stop_tx.send(true);
    let sources = shim.sources();
    shim.shutdown().await;
    daemon.flush_on_exit(&sources).await;
    let _ = server.await;
    let _ = management_server.await;
    if detach_on_exit {
        daemon.detach_datapath()?;
    }
    Ok(())
}

/// Resolves once `stop` turns true.
fn stopped(stop: &watch::Receiver<bool>) -> impl Future<Output = ()> + Send + 'static {
    let mut stop = stop.clone();
    async move {
        let _ = stop.wait_for(|stop| *stop).await;
    }
}

/// Serve the management API; its writes arrive on the returned channel.
fn start_management(
    daemon: &Daemon,
    shim: &Shim,
    confirm: Option<Confirmer>,
    principals: management::principals::Principals,
    listener: tokio::net::TcpListener,
    tls: Option<crate::shim::tls::TlsAcceptor>,
    stop: &watch::Receiver<bool>,
) -> (
    Arc<ApiState>,
    mpsc::Receiver<Apply>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    // Beside the API: in a fleet, writers elsewhere wait for this host's reports.
    super::fleet::spawn_reporter(daemon);
    super::fleet::spawn_sources_flusher(daemon, shim.sources());
    let (apply_tx, apply_rx) = mpsc::channel::<Apply>(64);
    let api = Arc::new(ApiState {
        store: daemon.store.clone(),
        principals: std::sync::RwLock::new(Arc::new(principals)),
        static_keys: std::sync::RwLock::new(daemon.statics.clone()),
        confirm,
        guard: management::throttle::Guard::new(
            management::throttle::Limits::DEFAULT,
            daemon.metrics.management.clone(),
        ),
        sources: shim.sources(),
        apply: apply_tx,
        writes: tokio::sync::Mutex::new(()),
        fleet_wait: daemon.config.fleet.wait_timeout,
        // `Secure` cookies under TLS; over plain HTTP (loopback, or beyond
        // it with the start-up warning) browsers would not send them back.
        console: crate::console::Console::new(&daemon.config.management, tls.is_some()),
    });
    let server = tokio::spawn(api::serve(
        listener,
        api.clone(),
        tls,
        daemon.metrics.connections.clone(),
        stopped(stop),
    ));
    (api, apply_rx, server)
}

/// The store as logs name it: the file, or the fleet host (never the URL,
/// which may hold a password).
fn store_name(config: &Config) -> String {
    match &config.store.postgres {
        Some(pg) => format!("postgres (host {})", pg.host_id),
        None => config.store.path.display().to_string(),
    }
}

/// Open the key store the config names and read its keys, with the change
/// feed's position they are current at.
async fn open_store(config: &Config) -> anyhow::Result<(SharedStore, ActiveKeys, i64)> {
    let store = store::open(&config.store, &config.fleet)
        .await
        .with_context(|| format!("opening the key store {}", store_name(config)))?;
    let snapshot = store
        .snapshot()
        .await
        .context("reading keys from the store")?;
    Ok((store, ActiveKeys::new(snapshot.keys), snapshot.upto))
}

impl Daemon {
    /// Open the datapath, apply the policy, attach; the drop-sample ring
    /// for the reader task.
    fn start_datapath(
        &mut self,
        phases: &mut crate::phases::Phases,
    ) -> anyhow::Result<Option<RingBuf<MapData>>> {
        phases.done("key table and principals");
        let samples = self.open_datapath()?;
        phases.done("datapath opened");
        // Policy first, then attach: a fresh attachment enforces a complete
        // policy from its first packet; an adopted one keeps the previous
        // policy until now.
        self.apply_policy()?;
        phases.done("policy applied");
        self.attach()?;
        phases.done("attached");
        Ok(samples)
    }

    /// Log the datapath's drop samples (and count them) from a task.
    fn spawn_sample_reader(&self, samples: Option<RingBuf<MapData>>) {
        if let (Some(ring), Some(dp)) = (samples, &self.datapath) {
            let reader = dp.reader();
            let m = self.metrics.clone();
            tokio::spawn(async move {
                let count = || {
                    m.drop_samples.inc();
                };
                if let Err(e) = crate::datapath::log_samples(ring, reader, count).await {
                    tracing::warn!(error = %format!("{e:#}"), "drop-sample reader stopped");
                }
            });
        }
    }

    /// Open (or adopt) the pinned datapath unless it is off, and count its
    /// packets from now on; hands back the drop-sample ring for the reader
    /// task.
    fn open_datapath(&mut self) -> anyhow::Result<Option<RingBuf<MapData>>> {
        if self.config.datapath.mode == AttachMode::Off {
            tracing::warn!("datapath mode off: the shim alone enforces allow lists");
            return Ok(None);
        }
        let mut dp = Datapath::open(
            &self.config.datapath.pin_path,
            self.config.datapath.capacity,
        )?;
        let samples = dp.take_samples();
        if let Some(logs) = dp.take_logs() {
            tokio::spawn(async move {
                if let Err(e) = crate::datapath_log::forward(logs).await {
                    tracing::warn!(error = %e, "the datapath's log forwarder stopped");
                }
            });
        }
        self.metrics.count_datapath(dp.reader());
        self.datapath = Some(dp);
        Ok(samples)
    }

    /// `--detach-on-exit`: drop our handles (and the pin lock), then detach
    /// the programs and remove the pins.
    fn detach_datapath(&mut self) -> anyhow::Result<()> {
        drop(self.datapath.take());
        let pin_path = &self.config.datapath.pin_path;
        let report = crate::datapath::detach(pin_path)
            .with_context(|| format!("detaching the datapath under {}", pin_path.display()))?;
        tracing::info!(
            links = report.links.len(),
            maps = report.maps.len(),
            "--detach-on-exit: datapath detached and pins removed"
        );
        Ok(())
    }
}
