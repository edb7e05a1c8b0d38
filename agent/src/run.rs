//! `keyfence run`: the daemon's control loop.
//!
//! Start: load and validate the config, open the key store, open the datapath
//! (adopting pins), apply the policy, attach, start the shim, the management
//! API and metrics, then turn `/readyz` ready. Afterwards it reacts to config
//! changes (file watch on the parent directory, so editors' and Kubernetes'
//! rename-replace is seen; and SIGHUP), to key changes committed through the
//! management API (enforced before the API answers), to allow-list expiries,
//! and to SIGTERM/SIGINT. On exit the pinned datapath keeps enforcing the last
//! policy.

use std::{
    collections::BTreeMap,
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
    confirm::Confirmer,
    datapath::{Datapath, decode_sample},
    management::{
        self,
        api::{self, ApiState, Apply, EnforceError},
        principals::ADMIN_SCOPE,
    },
    maps::policy::CapacityError,
    metrics::{self, Metrics, ResultLabel, SharedDatapath},
    policy::{self, KeyAccess, PolicyState},
    shim::{
        keys::{KeyTable, ShimKey},
        runtime::{self as shim_runtime, Shim},
    },
    store::{self, SharedStore, StoredKey},
};

/// How often keys' last-use times are written to the store.
const LAST_USED_FLUSH: Duration = Duration::from_mins(1);

/// How often TLS certificate files are checked for changes.
const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// How often the store's change feed is read for writes this agent's API did
/// not make (another writer of the store); the API's own writes are applied
/// at once, before it answers.
const FEED_POLL: Duration = Duration::from_secs(1);
/// A feed batch with more keys than this is applied as one full policy apply
/// instead of key by key.
const FEED_BATCH_FULL: usize = 32;

/// After a failed datapath write, the first full reconcile comes this soon;
/// each failure doubles the wait, up to `RECONCILE_MAX`.
const RECONCILE_FIRST: Duration = Duration::from_millis(500);
const RECONCILE_MAX: Duration = Duration::from_secs(30);

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
    store: SharedStore,
    /// The store's keys, revoked ones included: read at start, then kept
    /// current by the store's change feed.
    stored: BTreeMap<String, StoredKey>,
    /// The feed's sequence number up to which `stored` is enforced.
    applied: i64,
    /// The feed range whose last apply failed, and why: a write waiting for
    /// a number in it is answered with the failure.
    feed_failure: Option<(std::ops::RangeInclusive<i64>, String)>,
    /// The packet-level policy of `config` and `stored`, kept so that an API
    /// change recompiles only what the changed key touches.
    policy: PolicyState,
    /// After a failed datapath write: when to reconcile next, and the wait
    /// after that. `None` while the maps match `policy`.
    reconcile: Option<(Instant, Duration)>,
}

/// Run until SIGTERM or SIGINT. With `detach_on_exit` the datapath is
/// detached and its pins removed on the way out; otherwise it keeps enforcing.
pub async fn run(config_path: &Path, detach_on_exit: bool) -> Result<(), StartError> {
    let config = config::load(config_path).map_err(StartError::Config)?;
    // Before any socket: the listeners' descriptor reserve is computed from it.
    if let Err(e) = crate::conn::init_descriptors() {
        tracing::warn!(error = %e, "cannot read the descriptor limit");
    }
    let datapath: SharedDatapath = Arc::new(Mutex::new(None));
    let metrics = Arc::new(Metrics::new(datapath.clone()));
    metrics.config_last_reload_successful.set(1);
    crate::config_warnings::report(config_path, &config, &metrics.config_warnings);
    let metrics_listener = metrics::bind(config.metrics.bind).await?;
    let confirm = confirmer(&config)?;
    let (store, stored, applied) = open_store(&config).await?;
    let management_listener = tokio::net::TcpListener::bind(config.management.bind)
        .await
        .with_context(|| format!("binding management.bind {}", config.management.bind))?;

    let mut daemon = Daemon {
        config_path: config_path.to_path_buf(),
        config,
        datapath,
        metrics: metrics.clone(),
        store,
        stored,
        applied,
        feed_failure: None,
        policy: PolicyState::default(),
        reconcile: None,
    };
    // Secrets from the environment are read before the kernel is touched.
    let keys = daemon.key_table()?;
    let principals = daemon.principals()?;
    let samples = daemon.open_datapath()?;
    // Policy first, then attach: a fresh attachment enforces a complete policy
    // from its first packet; an adopted one keeps the previous policy until now.
    let next_change = daemon.apply_policy()?;
    daemon.attach()?;
    // The shim compiles from the same config snapshot; its listeners open last.
    let mut shim = Shim::start(&daemon.config, keys, metrics.clone()).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (api, mut apply_rx, management_server) = start_management(
        &daemon,
        &shim,
        confirm,
        principals,
        management_listener,
        &stop_rx,
    );
    // Signal handlers and the config watcher exist before `/readyz` turns
    // ready: a SIGHUP sent by whoever saw ready must reload, not kill us.
    let triggers = Triggers::install(&daemon.config_path)?;
    let ready = Arc::new(AtomicBool::new(true));
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
        management = %daemon.config.management.bind,
        store = %daemon.config.store.path.display(),
        keys = daemon.config.keys.len() + daemon.active_stored().count(),
        "keyfence running"
    );

    daemon
        .event_loop(&mut shim, &api, &mut apply_rx, next_change, triggers)
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
    daemon.flush_last_used(&sources).await;
    let _ = server.await;
    let _ = management_server.await;
    if detach_on_exit {
        daemon.detach_datapath()?;
    }
    Ok(())
}

/// Serve the management API; its writes arrive on the returned channel.
fn start_management(
    daemon: &Daemon,
    shim: &Shim,
    confirm: Option<Confirmer>,
    principals: management::principals::Principals,
    listener: tokio::net::TcpListener,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> (
    Arc<ApiState>,
    mpsc::Receiver<Apply>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let (apply_tx, apply_rx) = mpsc::channel::<Apply>(64);
    let api = Arc::new(ApiState {
        store: daemon.store.clone(),
        principals: std::sync::RwLock::new(Arc::new(principals)),
        static_keys: std::sync::RwLock::new(Arc::new(daemon.config.keys.clone())),
        confirm,
        guard: management::throttle::Guard::new(
            management::throttle::Limits::DEFAULT,
            daemon.metrics.management.clone(),
        ),
        sources: shim.sources(),
        apply: apply_tx,
        writes: tokio::sync::Mutex::new(()),
    });
    let mut stop = stop.clone();
    let server = tokio::spawn(api::serve(
        listener,
        api.clone(),
        daemon.metrics.connections.clone(),
        async move {
            let _ = stop.wait_for(|stop| *stop).await;
        },
    ));
    (api, apply_rx, server)
}

/// Open the key store the config names and read its keys, with the change
/// feed's position they are current at.
async fn open_store(
    config: &Config,
) -> anyhow::Result<(SharedStore, BTreeMap<String, StoredKey>, i64)> {
    let store = store::open(&config.store)
        .with_context(|| format!("opening the key store {}", config.store.path.display()))?;
    let snapshot = store
        .snapshot()
        .await
        .context("reading keys from the store")?;
    let stored = snapshot
        .keys
        .into_iter()
        .map(|k| (k.id.clone(), k))
        .collect();
    Ok((store, stored, snapshot.upto))
}

/// The step-up confirmer, when `management.confirm.totp_secret_env` is set.
fn confirmer(config: &Config) -> anyhow::Result<Option<Confirmer>> {
    let Some(var) = &config.management.confirm_totp_env else {
        return Ok(None);
    };
    let secret = std::env::var(var).map_err(|_| {
        anyhow!("management.confirm.totp_secret_env: environment variable {var} is not set")
    })?;
    let confirmer = Confirmer::from_base32(&secret)
        .map_err(|e| anyhow!("management.confirm.totp_secret_env: {var}: {e}"))?;
    Ok(Some(confirmer))
}

impl Daemon {
    /// `--detach-on-exit`: drop our handles (and the pin lock), then detach
    /// the programs and remove the pins.
    fn detach_datapath(&self) -> anyhow::Result<()> {
        drop(
            self.datapath
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
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

    fn active_stored(&self) -> impl Iterator<Item = &StoredKey> {
        self.stored.values().filter(|k| k.is_active())
    }

    /// The shim's key table: static and active stored keys.
    fn key_table(&self) -> anyhow::Result<KeyTable> {
        shim_runtime::key_table(&self.config.keys, self.stored.values())
    }

    /// Open (or adopt) the pinned datapath unless it is off; hands back the
    /// drop-sample ring for the reader task.
    fn open_datapath(&self) -> anyhow::Result<Option<RingBuf<MapData>>> {
        if self.config.datapath.mode == AttachMode::Off {
            tracing::warn!("datapath mode off: the shim alone enforces allow lists");
            return Ok(None);
        }
        let mut dp = Datapath::open(
            &self.config.datapath.pin_path,
            self.config.datapath.capacity,
        )?;
        let samples = dp.take_samples();
        *self.datapath.lock().unwrap_or_else(PoisonError::into_inner) = Some(dp);
        Ok(samples)
    }

    fn principals(&self) -> anyhow::Result<management::principals::Principals> {
        management::principals(&self.config.management.admins, self.stored.values())
    }

    /// React to API writes, config changes, expiries and signals until
    /// SIGTERM or SIGINT.
    async fn event_loop(
        &mut self,
        shim: &mut Shim,
        api: &ApiState,
        apply_rx: &mut mpsc::Receiver<Apply>,
        mut next_change: Option<SystemTime>,
        triggers: Triggers,
    ) -> anyhow::Result<()> {
        let Triggers {
            _watcher,
            mut change_rx,
            mut hup,
            mut term,
            mut int,
        } = triggers;
        let mut cert_check = tokio::time::interval(CERT_CHECK_INTERVAL);
        let mut last_used = tokio::time::interval(LAST_USED_FLUSH);
        let mut feed = tokio::time::interval(FEED_POLL);
        feed.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            let expiry = sleep_until_system(next_change);
            let reconcile = sleep_until_opt(self.reconcile.map(|(at, _)| at));
            tokio::select! {
                Some(apply) = apply_rx.recv() => match apply {
                    Apply::Check { key, done } => {
                        let _ = done.send(self.check_key(&key));
                    }
                    Apply::Upto { seq, done } => {
                        let _ = done.send(self.enforce_upto(seq, shim, api, &mut next_change).await);
                    }
                },
                _ = feed.tick() => {
                    if let Err(e) = self.follow_feed(shim, api, &mut next_change).await {
                        tracing::warn!(error = %e, "applying the store's changes");
                    }
                }
                () = reconcile => {
                    if let Ok(next) = self.reconcile() {
                        next_change = next;
                    }
                }
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading the configuration");
                    self.reload(shim, api, &mut next_change).await;
                    shim.reload_certificates();
                }
                Some(()) = change_rx.recv() => {
                    tokio::time::sleep(RELOAD_DEBOUNCE).await;
                    while change_rx.try_recv().is_ok() {}
                    tracing::info!("configuration file changed: reloading");
                    self.reload(shim, api, &mut next_change).await;
                }
                _ = cert_check.tick() => shim.reload_certificates(),
                _ = last_used.tick() => self.flush_last_used(&shim.sources()).await,
                () = expiry => {
                    tracing::info!("an allow-list entry expired: recompiling the policy");
                    match self.apply_policy() {
                        Ok(n) => next_change = n,
                        Err(e) => tracing::error!(error = %format!("{e:#}"), "applying the policy"),
                    }
                }
                _ = term.recv() => return Ok(()),
                _ = int.recv() => return Ok(()),
            }
        }
    }

    /// Whether the datapath can hold `key` in its new state (the API asks
    /// before it commits). Changes nothing.
    fn check_key(&mut self, key: &StoredKey) -> Result<Duration, EnforceError> {
        let started = Instant::now();
        let datapath = self.datapath.clone();
        let guard = datapath.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(dp) = guard.as_ref() else {
            // No datapath: the shim alone enforces and has no map to fill.
            return Ok(started.elapsed());
        };
        let old = self.stored.get(&key.id).filter(|k| k.is_active());
        let new = Some(key).filter(|k| k.is_active());
        let now = SystemTime::now();
        let full_check =
            |state: &PolicyState| tokio::task::block_in_place(|| dp.check_apply(&state.compiled()));
        let result =
            if self.reconcile.is_some() || self.policy.next_change().is_some_and(|t| now >= t) {
                // The next write is a full apply: check the whole policy.
                let mut accesses: Vec<KeyAccess<'_>> = self
                    .config
                    .keys
                    .iter()
                    .map(KeyAccess::from)
                    .chain(
                        self.stored
                            .values()
                            .filter(|k| k.is_active() && k.id != key.id)
                            .map(KeyAccess::from),
                    )
                    .collect();
                accesses.extend(new.map(KeyAccess::from));
                full_check(&PolicyState::build(&self.config.listeners, &accesses, now))
            } else {
                self.policy.preview_key(
                    old.map(KeyAccess::from).as_ref(),
                    new.map(KeyAccess::from).as_ref(),
                    now,
                    |state, change| {
                        if !change.reshaped
                            && let Some(()) = dp.check_changes(&change.restricted)?
                        {
                            return Ok(());
                        }
                        full_check(state)
                    },
                )
            };
        result
            .map(|()| started.elapsed())
            .map_err(|e| match e.downcast::<CapacityError>() {
                Ok(full) => EnforceError::Full(full),
                Err(e) => EnforceError::Failed(format!("{e:#}")),
            })
    }

    /// Answer a write committed at `seq` once the feed is enforced up to it.
    async fn enforce_upto(
        &mut self,
        seq: i64,
        shim: &Shim,
        api: &ApiState,
        next_change: &mut Option<SystemTime>,
    ) -> Result<Duration, EnforceError> {
        let started = Instant::now();
        if seq > self.applied {
            self.follow_feed(shim, api, next_change)
                .await
                .map_err(|e| EnforceError::Failed(format!("{e:#}")))?;
        }
        if let Some((range, why)) = &self.feed_failure
            && range.contains(&seq)
        {
            return Err(EnforceError::Failed(why.clone()));
        }
        if seq > self.applied {
            return Err(EnforceError::Failed(format!(
                "change {seq} is not in the store's change feed (it reads up to {})",
                self.applied
            )));
        }
        Ok(started.elapsed())
    }

    /// Enforce what the store's change feed holds after `self.applied`,
    /// whoever wrote it. A failed read changes nothing (the next poll reads
    /// again); a failed apply is remembered for the writes waiting on it.
    async fn follow_feed(
        &mut self,
        shim: &Shim,
        api: &ApiState,
        next_change: &mut Option<SystemTime>,
    ) -> anyhow::Result<()> {
        let changes = self
            .store
            .changes(self.applied)
            .await
            .context("reading the store's change feed")?;
        if changes.upto <= self.applied {
            return Ok(());
        }
        let range = self.applied + 1..=changes.upto;
        let result = if changes.keys.len() > FEED_BATCH_FULL {
            self.apply_keys(changes.keys, shim, api)
        } else {
            changes
                .keys
                .into_iter()
                .map(|key| self.apply_key(key, shim, api))
                .fold(Ok(()), Result::and)
        };
        self.applied = changes.upto;
        *next_change = self.policy.next_change();
        if let Err(e) = result {
            let why = format!("{e:#}");
            self.feed_failure = Some((range, why.clone()));
            return Err(anyhow!(why));
        }
        self.feed_failure = None;
        Ok(())
    }

    /// Many changed keys at once (an import by another writer): one key
    /// table, one principals rebuild, one full policy apply. Like a single
    /// key's change, the policy follows the shim whatever the maps do.
    fn apply_keys(
        &mut self,
        keys: Vec<StoredKey>,
        shim: &Shim,
        api: &ApiState,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let count = keys.len();
        for key in keys {
            self.stored.insert(key.id.clone(), key);
        }
        shim.set_keys(self.key_table()?);
        *api.principals
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(self.principals()?);
        self.policy = PolicyState::build(
            &self.config.listeners,
            &key_accesses(&self.config, &self.stored),
            SystemTime::now(),
        );
        if let Err(e) = self.enforce() {
            self.datapath_failed(&e)?;
        }
        self.record_policy(started);
        tracing::info!(keys = count, "store changes applied as one policy");
        Ok(())
    }

    /// Enforce one key's new state from the feed: the shim's key table, the
    /// BPF maps and the management principals.
    fn apply_key(&mut self, key: StoredKey, shim: &Shim, api: &ApiState) -> anyhow::Result<()> {
        let started = Instant::now();
        let id = key.id.clone();
        let old = self
            .stored
            .insert(id.clone(), key)
            .filter(StoredKey::is_active);
        // The shim first: it is the authority, and changing its table cannot
        // fail for want of map space.
        let new = self.stored.get(&id).filter(|k| k.is_active());
        shim.replace_key(
            old.as_ref().map(|k| k.digest),
            new.map(|k| (k.digest, ShimKey::new(&k.id, k.into()))),
        );
        // Principals are the config's admins and admin-scoped keys: rebuilt
        // only when such a key changes.
        let admin = |k: &StoredKey| k.scopes.iter().any(|s| s == ADMIN_SCOPE);
        if old.as_ref().is_some_and(admin) || new.is_some_and(admin) {
            *api.principals
                .write()
                .unwrap_or_else(PoisonError::into_inner) = Arc::new(self.principals()?);
        }
        let now = SystemTime::now();
        // The policy follows the shim whatever the maps do: it is what the
        // datapath must pass, and what a reconcile writes.
        let full = if self.policy.next_change().is_some_and(|t| now >= t) {
            // An entry expired since the last compile: start over.
            self.policy = PolicyState::build(
                &self.config.listeners,
                &key_accesses(&self.config, &self.stored),
                now,
            );
            true
        } else {
            let change = self.policy.change_key(
                old.as_ref().map(KeyAccess::from).as_ref(),
                new.map(KeyAccess::from).as_ref(),
                now,
            );
            // Out of sync, only a full apply catches the maps up.
            change.reshaped
                || self.reconcile.is_some()
                || match self.write_changes(&change.restricted) {
                    Ok(written) => !written,
                    Err(e) => {
                        self.datapath_failed(&e)?;
                        false
                    }
                }
        };
        if full && let Err(e) = self.enforce() {
            self.datapath_failed(&e)?;
        }
        self.record_policy(started);
        Ok(())
    }

    /// A datapath write failed (or was refused) while `self.policy` is what
    /// the shim enforces: open, in the datapath, every listener whose
    /// entries do not cover that policy, so no source the shim accepts is
    /// dropped; report out of sync (`keyfence_datapath_in_sync` 0, `/readyz`
    /// degraded); schedule a full reconcile with back-off. `Err` only when
    /// even opening the listeners failed.
    fn datapath_failed(&mut self, error: &anyhow::Error) -> anyhow::Result<()> {
        self.metrics.datapath_write_failures.inc();
        self.metrics.datapath_in_sync.set(0);
        let wait = self
            .reconcile
            .map_or(RECONCILE_FIRST, |(_, wait)| (wait * 2).min(RECONCILE_MAX));
        self.reconcile = Some((Instant::now() + wait, wait));
        tracing::error!(
            error = %format!("{error:#}"),
            retry_in_ms = wait.as_millis(),
            "the datapath does not match the policy: failing open where needed, reconciling"
        );
        let compiled = self.policy.compiled();
        let mut guard = self.datapath.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(dp) = guard.as_mut() else {
            return Ok(());
        };
        let opened = tokio::task::block_in_place(|| dp.open_uncovered(&compiled))
            .context("opening listeners in the datapath after a failed write")?;
        if !opened.is_empty() {
            tracing::warn!(
                listeners = ?opened,
                "listeners open in the datapath until the reconcile succeeds; the shim still \
                 enforces every key"
            );
        }
        Ok(())
    }

    /// A full reconcile: read the maps back, diff against a fresh compile,
    /// write. A failure schedules the next one (longer back-off).
    fn reconcile(&mut self) -> anyhow::Result<Option<SystemTime>> {
        tracing::info!("reconciling the datapath with the policy");
        let resync = {
            let mut guard = self.datapath.lock().unwrap_or_else(PoisonError::into_inner);
            guard
                .as_mut()
                .map_or(Ok(()), |dp| tokio::task::block_in_place(|| dp.resync()))
        };
        if let Err(e) = resync {
            // Reading failed: nothing was written, try again later.
            let _ = self.datapath_failed(&e);
            return Err(e);
        }
        self.apply_policy()
    }

    /// The maps match `self.policy` again.
    fn datapath_in_sync(&mut self) {
        if self.reconcile.take().is_some() {
            tracing::info!("the datapath matches the policy again");
        }
        self.metrics.datapath_in_sync.set(1);
    }

    /// Write keys' last-use times (seen by the shim) to the store.
    async fn flush_last_used(&self, sources: &crate::shim::sources::Sources) {
        let used: Vec<(String, SystemTime)> = sources
            .last_used()
            .into_iter()
            .filter(|(id, _)| self.stored.contains_key(id))
            .collect();
        if used.is_empty() {
            return;
        }
        if let Err(e) = self.store.touch_last_used(&used).await {
            tracing::warn!(error = %e, "recording keys' last use");
        }
    }

    /// Compile the current config and make the datapath enforce it.
    /// Returns when the policy must be compiled again (next expiry).
    fn apply_policy(&mut self) -> anyhow::Result<Option<SystemTime>> {
        let started = Instant::now();
        let state = PolicyState::build(
            &self.config.listeners,
            &key_accesses(&self.config, &self.stored),
            SystemTime::now(),
        );
        // Kept only once enforced: a failed reload goes back to the old state.
        let previous = std::mem::replace(&mut self.policy, state);
        if let Err(e) = self.enforce() {
            self.policy = previous;
            // A capacity refusal wrote nothing: the maps still hold the old
            // state (a refused reload changes nothing). Any other failure may
            // have stopped half-way; a failed reconcile must be retried.
            if (e.downcast_ref::<CapacityError>().is_none() || self.reconcile.is_some())
                && let Err(open) = self.datapath_failed(&e)
            {
                tracing::error!(error = %format!("{open:#}"), "failing open");
            }
            return Err(e);
        }
        self.record_policy(started);
        Ok(self.policy.next_change())
    }

    /// Make the datapath enforce `self.policy` with a full apply (which
    /// brings the maps back in sync).
    fn enforce(&mut self) -> anyhow::Result<()> {
        self.write(&self.policy.compiled())?;
        self.datapath_in_sync();
        Ok(())
    }

    /// Key and prefix gauges, warnings about listeners nothing can reach, and
    /// the time since `started` as one policy apply.
    fn record_policy(&self, started: Instant) {
        let key_count = self.config.keys.len() + self.active_stored().count();
        self.metrics
            .keys
            .set(i64::try_from(key_count).unwrap_or(i64::MAX));
        self.metrics.policy_prefixes.clear();
        for (listener, count) in self.policy.prefix_counts() {
            self.metrics
                .policy_prefixes
                .get_or_create(&metrics::ListenerLabel {
                    listener: listener.to_owned(),
                })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        for listener in self.policy.unreachable() {
            tracing::warn!(
                listener,
                "no key this listener accepts allows any address: its packets are all dropped"
            );
        }
        self.metrics
            .policy_apply_seconds
            .observe(started.elapsed().as_secs_f64());
    }

    /// Write prefix changes of restricted listeners alone. `false`: the
    /// datapath needs a full apply instead.
    fn write_changes(
        &self,
        changes: &[(String, crate::prefixset::Change)],
    ) -> anyhow::Result<bool> {
        let mut guard = self.datapath.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(dp) = guard.as_mut() else {
            return Ok(true);
        };
        let Some(report) = tokio::task::block_in_place(|| dp.apply_changes(changes))? else {
            return Ok(false);
        };
        tracing::info!(
            added = report.added,
            removed = report.removed,
            updated = report.updated,
            "policy applied"
        );
        Ok(true)
    }

    fn write(&self, compiled: &policy::CompiledPolicy) -> anyhow::Result<()> {
        let mut guard = self.datapath.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(dp) = guard.as_mut() {
            // Every full apply carries the current `datapath.unparsed`, so a
            // reload that changes only the setting takes effect too.
            dp.set_unparsed(self.config.datapath.unparsed);
            // Map writes are syscalls (about 2 µs each; a million prefixes take
            // seconds): let the runtime move other tasks off this worker.
            let report = tokio::task::block_in_place(|| dp.apply(compiled))?;
            tracing::info!(
                added = report.added,
                removed = report.removed,
                updated = report.updated,
                "policy applied"
            );
            // A big apply leaves big freed temporaries; a small one (an API
            // change) is not worth the heap walk.
            if report.added + report.removed + report.updated >= BIG_APPLY {
                crate::sys::release_free_memory();
            }
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
    async fn reload(
        &mut self,
        shim: &mut Shim,
        api: &ApiState,
        next_change: &mut Option<SystemTime>,
    ) {
        let result = match config::load(&self.config_path) {
            Err(errors) => {
                for line in errors.to_string().lines() {
                    tracing::error!("{line}");
                }
                Err(anyhow!("invalid configuration; keeping the last good one"))
            }
            Ok(new) => self.switch_to(new, shim, api).await,
        };
        // The file as it is now; management.bind as it runs (it changes only
        // at a restart).
        crate::config_warnings::report(
            &self.config_path,
            &self.config,
            &self.metrics.config_warnings,
        );
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
        api: &ApiState,
    ) -> anyhow::Result<Option<SystemTime>> {
        // Secrets are read before anything changes, so a missing variable
        // rejects the whole reload.
        let keys = shim_runtime::key_table(&new.keys, self.stored.values())?;
        let principals = management::principals(&new.management.admins, self.stored.values())?;
        if new.store.path != self.config.store.path
            || new.management.bind != self.config.management.bind
            || new.management.confirm_totp_env != self.config.management.confirm_totp_env
        {
            tracing::warn!(
                "store.path, management.bind and management.confirm take effect at the next restart"
            );
        }
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
            c.store.path.clone_from(&old.store.path);
            c.management.bind = old.management.bind;
            c.management
                .confirm_totp_env
                .clone_from(&old.management.confirm_totp_env);
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
        shim.update(&self.config, keys).await?;
        *api.static_keys
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(self.config.keys.clone());
        *api.principals
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(principals);
        Ok(next)
    }
}

/// Every key a listener may accept: static ones and active stored ones.
fn key_accesses<'a>(
    config: &'a Config,
    stored: &'a BTreeMap<String, StoredKey>,
) -> Vec<KeyAccess<'a>> {
    config
        .keys
        .iter()
        .map(KeyAccess::from)
        .chain(
            stored
                .values()
                .filter(|k| k.is_active())
                .map(KeyAccess::from),
        )
        .collect()
}

/// Resolves at `when` (monotonic), or never.
async fn sleep_until_opt(when: Option<Instant>) {
    match when {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
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
/// What wakes the event loop besides API writes and timers: config file
/// changes and signals.
struct Triggers {
    _watcher: notify::RecommendedWatcher,
    change_rx: mpsc::Receiver<()>,
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Triggers {
    fn install(config_path: &Path) -> anyhow::Result<Self> {
        let (change_tx, change_rx) = mpsc::channel::<()>(16);
        Ok(Self {
            _watcher: watch_config(config_path, change_tx)?,
            change_rx,
            hup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
            term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
        })
    }
}

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
            && event
                .paths
                .iter()
                .any(|p| names_the_config(p, name.as_deref()))
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

/// Map writes from which an apply hands freed memory back to the kernel.
const BIG_APPLY: usize = 10_000;

/// Whether a change to `path` (in the config's directory) can change the
/// config: the file itself (edited in place, or replaced by a rename), or the
/// `..data` symlink that a Kubernetes `ConfigMap` volume swaps atomically (the
/// config file there is a symlink through it and never changes itself).
fn names_the_config(path: &Path, config: Option<&std::ffi::OsStr>) -> bool {
    let name = path.file_name();
    name == config || name.is_some_and(|n| n.as_encoded_bytes().starts_with(b"..data"))
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

#[cfg(test)]
mod tests {
    use std::{ffi::OsStr, path::Path};

    use super::names_the_config;

    #[test]
    fn config_events_include_the_configmap_swap_and_nothing_else() {
        let config = Some(OsStr::new("keyfence.yaml"));
        for (path, wanted) in [
            ("/etc/keyfence/keyfence.yaml", true),
            // Kubernetes' atomic writer: a new ..data_tmp symlink renamed over ..data.
            ("/etc/keyfence/..data", true),
            ("/etc/keyfence/..data_tmp", true),
            // Editors' and the store's neighbours.
            ("/etc/keyfence/.keyfence.yaml.swp", false),
            ("/etc/keyfence/keyfence.db-wal", false),
            ("/etc/keyfence/..2026_12_01_00_00_00.123", false),
        ] {
            assert_eq!(names_the_config(Path::new(path), config), wanted, "{path}");
        }
    }
}
