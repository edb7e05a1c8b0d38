//! `keyfence run`: the daemon's control loop.
//!
//! Start: load and validate the config, open the datapath (adopting pins), apply
//! the policy, attach, serve metrics, then turn `/readyz` ready. Afterwards it
//! reacts to config changes (file watch on the parent directory, so editors' and
//! Kubernetes' rename-replace is seen; and SIGHUP), to allow-list expiries, and to
//! SIGTERM/SIGINT. On exit the pinned datapath keeps enforcing the last policy.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, anyhow};
use aya::maps::{MapData, RingBuf};
use notify::Watcher as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    config::{self, AttachMode, Config},
    datapath::{Datapath, decode_sample},
    metrics::{self, Metrics, ResultLabel, SharedDatapath},
    policy::{self, CompiledPolicy, KeyAccess},
    shim::runtime::Shim,
};

/// How often TLS certificate files are checked for changes.
const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// A config change seen on disk is applied after this quiet period, so a
/// writer's several events (truncate, write, rename) make one reload.
const RELOAD_DEBOUNCE: Duration = Duration::from_millis(150);

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(config::ConfigErrors),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

struct Daemon {
    config_path: PathBuf,
    config: Config,
    datapath: SharedDatapath,
    metrics: Arc<Metrics>,
}

/// Run until SIGTERM or SIGINT.
pub async fn run(config_path: &Path) -> Result<(), StartError> {
    let config = config::load(config_path).map_err(StartError::Config)?;
    let datapath: SharedDatapath = Arc::new(Mutex::new(None));
    let metrics = Arc::new(Metrics::new(datapath.clone()));
    metrics.config_last_reload_successful.set(1);
    let metrics_listener = metrics::bind(config.metrics.bind).await?;

    let mut daemon = Daemon {
        config_path: config_path.to_path_buf(),
        config,
        datapath,
        metrics: metrics.clone(),
    };
    let mut samples = None;
    if daemon.config.datapath.mode == AttachMode::Off {
        tracing::warn!("datapath mode off: the shim alone enforces allow lists");
    } else {
        let mut dp = Datapath::open(&daemon.config.datapath.pin_path)?;
        samples = dp.take_samples();
        *daemon
            .datapath
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(dp);
    }
    // Policy first, then attach: a fresh attachment enforces a complete policy
    // from its first packet; an adopted one keeps the previous policy until now.
    let mut next_change = daemon.apply_policy()?;
    daemon.attach()?;
    // The shim compiles from the same config snapshot; its listeners open last.
    let mut shim = Shim::start(&daemon.config, metrics.clone()).await?;

    let ready = Arc::new(AtomicBool::new(true));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut server_stop = stop_rx.clone();
    let server = tokio::spawn(metrics::serve(
        metrics_listener,
        metrics.clone(),
        ready.clone(),
        async move {
            let _ = server_stop.wait_for(|stop| *stop).await;
        },
    ));
    if let Some(ring) = samples {
        let dp = daemon.datapath.clone();
        let m = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = read_samples(ring, dp, m).await {
                tracing::warn!(error = %format!("{e:#}"), "drop-sample reader stopped");
            }
        });
    }
    tracing::info!(
        config = %daemon.config_path.display(),
        metrics = %daemon.config.metrics.bind,
        "keyfence running"
    );

    let (change_tx, mut change_rx) = mpsc::channel::<()>(16);
    let _watcher = watch_config(&daemon.config_path, change_tx)?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut cert_check = tokio::time::interval(CERT_CHECK_INTERVAL);

    loop {
        let expiry = sleep_until_system(next_change);
        tokio::select! {
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the configuration");
                daemon.reload(&mut shim, &mut next_change).await;
                shim.reload_certificates();
            }
            Some(()) = change_rx.recv() => {
                tokio::time::sleep(RELOAD_DEBOUNCE).await;
                while change_rx.try_recv().is_ok() {}
                tracing::info!("configuration file changed: reloading");
                daemon.reload(&mut shim, &mut next_change).await;
            }
            _ = cert_check.tick() => shim.reload_certificates(),
            () = expiry => {
                tracing::info!("an allow-list entry expired: recompiling the policy");
                match daemon.apply_policy() {
                    Ok(n) => next_change = n,
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "applying the policy"),
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("stopping: draining listeners; the pinned datapath keeps enforcing");
    ready.store(false, Ordering::Release);
    shim.shutdown().await;
    let _ = stop_tx.send(true);
    let _ = server.await;
    Ok(())
}

impl Daemon {
    fn keys(&self) -> Vec<KeyAccess<'_>> {
        self.config.keys.iter().map(KeyAccess::from).collect()
    }

    /// Compile the current config and make the datapath enforce it.
    /// Returns when the policy must be compiled again (next expiry).
    fn apply_policy(&mut self) -> anyhow::Result<Option<SystemTime>> {
        let started = Instant::now();
        let compiled = policy::compile(&self.config.listeners, &self.keys(), SystemTime::now());
        self.metrics
            .keys
            .set(i64::try_from(self.config.keys.len()).unwrap_or(i64::MAX));
        self.metrics.policy_prefixes.clear();
        for l in &compiled.listeners {
            self.metrics
                .policy_prefixes
                .get_or_create(&metrics::ListenerLabel {
                    listener: l.name.clone(),
                })
                .set(i64::try_from(l.access.prefix_count()).unwrap_or(i64::MAX));
            if let policy::Access::Restricted(nets) = &l.access
                && nets.is_empty()
            {
                tracing::warn!(
                    listener = l.name,
                    "no key this listener accepts allows any address: its packets are all dropped"
                );
            }
        }
        self.write(&compiled)?;
        self.metrics
            .policy_apply_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(compiled.next_change)
    }

    fn write(&self, compiled: &CompiledPolicy) -> anyhow::Result<()> {
        let mut guard = self.datapath.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(dp) = guard.as_mut() {
            // Map writes are syscalls (about 2 µs each; a million prefixes take
            // seconds): let the runtime move other tasks off this worker.
            let report = tokio::task::block_in_place(|| dp.apply(compiled))?;
            tracing::info!(
                added = report.added,
                removed = report.removed,
                updated = report.updated,
                "policy applied"
            );
        }
        Ok(())
    }

    fn attach(&self) -> anyhow::Result<()> {
        let mut guard = self.datapath.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(dp) = guard.as_mut() {
            dp.attach(&self.config.datapath.interfaces, self.config.datapath.mode)?;
        }
        Ok(())
    }

    /// Load the file again; keep the last good config when it is invalid. On
    /// success `next_change` becomes the new policy's next expiry.
    async fn reload(&mut self, shim: &mut Shim, next_change: &mut Option<SystemTime>) {
        let result = match config::load(&self.config_path) {
            Err(errors) => {
                for line in errors.to_string().lines() {
                    tracing::error!("{line}");
                }
                Err(anyhow!("invalid configuration; keeping the last good one"))
            }
            Ok(new) => self.switch_to(new, shim).await,
        };
        match result {
            Ok(next) => {
                self.metrics.config_last_reload_successful.set(1);
                self.metrics
                    .config_reloads
                    .get_or_create(&ResultLabel { result: "success" })
                    .inc();
                *next_change = next;
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "reload failed");
                self.metrics.config_last_reload_successful.set(0);
                self.metrics
                    .config_reloads
                    .get_or_create(&ResultLabel { result: "failure" })
                    .inc();
            }
        }
    }

    async fn switch_to(
        &mut self,
        new: Config,
        shim: &mut Shim,
    ) -> anyhow::Result<Option<SystemTime>> {
        // Secrets are read before anything changes, so a missing variable
        // rejects the whole reload.
        crate::shim::runtime::static_key_table(&new.keys)?;
        if new.datapath.pin_path != self.config.datapath.pin_path
            || (new.datapath.mode == AttachMode::Off)
                != (self.config.datapath.mode == AttachMode::Off)
            || new.metrics.bind != self.config.metrics.bind
        {
            tracing::warn!(
                "datapath.pin_path, turning the datapath on/off and metrics.bind take effect at the next restart"
            );
        }
        let old = std::mem::replace(&mut self.config, new);
        let keep = |c: &mut Config| {
            c.datapath.pin_path.clone_from(&old.datapath.pin_path);
            c.metrics.bind = old.metrics.bind;
        };
        keep(&mut self.config);
        let next = match self.apply_policy() {
            Ok(next) => next,
            Err(e) => {
                self.config = old;
                return Err(e);
            }
        };
        if self.config.datapath.interfaces != old.datapath.interfaces
            || self.config.datapath.mode != old.datapath.mode
        {
            self.attach()?;
        }
        shim.update(&self.config).await?;
        Ok(next)
    }
}

/// Resolves at `when` (wall clock), or never.
async fn sleep_until_system(when: Option<SystemTime>) {
    match when {
        Some(t) => {
            let wait = t
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::time::sleep(wait).await;
        }
        None => std::future::pending().await,
    }
}

/// Watch the config file's directory (rename-replace safe) and signal changes.
fn watch_config(path: &Path, tx: mpsc::Sender<()>) -> anyhow::Result<notify::RecommendedWatcher> {
    let path = std::path::absolute(path).context("resolving the config path")?;
    let dir = path
        .parent()
        .ok_or_else(|| anyhow!("config path has no directory"))?
        .to_path_buf();
    let name = path.file_name().map(ToOwned::to_owned);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && !event.kind.is_access()
            && event.paths.iter().any(|p| p.file_name() == name.as_deref())
        {
            let _ = tx.try_send(());
        }
    })
    .context("creating the config watcher")?;
    watcher
        .watch(&dir, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    Ok(watcher)
}

/// Log the kernel's drop samples (already rate-limited per CPU in the kernel).
async fn read_samples(
    ring: RingBuf<MapData>,
    datapath: SharedDatapath,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let mut fd = crate::sys::async_ring(ring).context("polling the drop-sample ring buffer")?;
    loop {
        let mut guard = fd.readable_mut().await?;
        let mut samples = Vec::new();
        while let Some(item) = guard.get_inner_mut().next() {
            if let Some(s) = decode_sample(&item) {
                samples.push(s);
            }
        }
        guard.clear_ready();
        if samples.is_empty() {
            continue;
        }
        let names = {
            let g = datapath.lock().unwrap_or_else(PoisonError::into_inner);
            g.as_ref()
                .map(|d| (d.attachments().to_vec(), d.slot_names()))
        };
        for s in samples {
            metrics.drop_samples.inc();
            let (interface, listener) = names.as_ref().map_or_else(Default::default, |(a, l)| {
                (
                    a.iter()
                        .find(|a| a.ifindex == s.ifindex)
                        .map(|a| a.interface.clone())
                        .unwrap_or_default(),
                    l.iter()
                        .find(|(_, slot)| *slot == s.policy)
                        .map(|(n, _)| n.clone())
                        .unwrap_or_default(),
                )
            });
            let src = crate::allowlist::fold_ip(std::net::Ipv6Addr::from(s.src).into());
            let dst = crate::allowlist::fold_ip(std::net::Ipv6Addr::from(s.dst).into());
            tracing::info!(
                %src,
                %dst,
                port = u16::from_be_bytes(s.port),
                interface,
                listener,
                "datapath dropped a packet (sample)"
            );
        }
    }
}
