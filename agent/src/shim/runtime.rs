//! The shim's lifecycle: start the workers, bind every listener (one socket
//! per worker), swap keys and listener settings on reload without dropping
//! connections, and drain on shutdown.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use anyhow::Context as _;
use tokio::{sync::watch, task::JoinHandle};

use super::{
    server::{self, Shared},
    tls::TlsAcceptor,
    upstream::Target,
    workers::{self, Workers},
};
use crate::{
    config::{Config, ListenerConfig},
    keys::{Key, KeyTable},
    metrics::Metrics,
};

/// Addresses remembered per key for `GET /v1/keys/{id}/sources`.
pub const SOURCES_PER_KEY: usize = 32;
/// Keys remembered there (when full, the least recently used eighth is
/// forgotten at once).
pub const SOURCES_KEYS: usize = 4096;

/// The key table of the config's static keys (resolved: see
/// [`crate::keys::statics`]) and the store's active keys (`stored`).
#[must_use]
pub fn key_table<'a>(
    statics: &'a [Arc<Key>],
    stored: impl IntoIterator<Item = &'a Arc<Key>>,
) -> KeyTable {
    KeyTable::new(statics.iter().chain(stored).cloned())
}

struct Running {
    config: watch::Sender<Arc<ListenerConfig>>,
    stop: watch::Sender<bool>,
    /// One accept loop per worker.
    tasks: Vec<JoinHandle<()>>,
    tls: Option<TlsAcceptor>,
}

/// Every listener the shim serves. Declared before `workers`: the listeners
/// stop before the threads they run on.
pub struct Shim {
    shared: Arc<Shared>,
    listeners: BTreeMap<String, Running>,
    workers: Workers,
}

impl Shim {
    /// Bind and serve every listener of `config`, answering with `keys`.
    #[expect(
        clippy::unused_async,
        reason = "the sockets are bound on the caller's runtime: it must run inside one"
    )]
    pub async fn start(
        config: &Config,
        keys: KeyTable,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared {
            keys: RwLock::new(keys),
            rejection: RwLock::new(Arc::new(config.rejection.clone())),
            metrics,
            sources: Arc::new(super::sources::Sources::new(SOURCES_PER_KEY, SOURCES_KEYS)),
        });
        let workers = Workers::start(config.shim.workers).context("starting the shim's workers")?;
        tracing::info!(workers = config.shim.workers, "shim workers started");
        let mut shim = Self {
            shared,
            listeners: BTreeMap::new(),
            workers,
        };
        for l in &config.listeners {
            shim.spawn(l)?;
        }
        Ok(shim)
    }

    /// Bind and serve `l`; called on the agent's runtime (the sockets are
    /// bound there, then handed to the workers).
    fn spawn(&mut self, l: &ListenerConfig) -> anyhow::Result<()> {
        let tls = l
            .tls
            .as_ref()
            .map(TlsAcceptor::load)
            .transpose()
            .with_context(|| format!("listener {}: TLS", l.name))?;
        let target = l
            .upstream
            .as_deref()
            .map(|u| Target::new(u, l.upstream_ca.as_deref()))
            .transpose()
            .with_context(|| format!("listener {}: upstream", l.name))?;
        let handles = self.workers.handles();
        let sockets = workers::bind(l.bind, handles.len())
            .with_context(|| format!("listener {}: binding {}", l.name, l.bind))?;
        let (config_tx, config_rx) = watch::channel(Arc::new(l.clone()));
        let (stop_tx, stop_rx) = watch::channel(false);
        let gate = server::gate(l, &self.shared);
        let tasks = sockets
            .into_iter()
            .zip(handles)
            .map(|(socket, worker)| {
                worker.spawn(server::serve(
                    socket,
                    config_rx.clone(),
                    self.shared.clone(),
                    tls.clone(),
                    stop_rx.clone(),
                    gate.clone(),
                    target.clone(),
                ))
            })
            .collect();
        tracing::info!(listener = l.name, bind = %l.bind, tls = l.tls.is_some(), "listening");
        self.listeners.insert(
            l.name.clone(),
            Running {
                config: config_tx,
                stop: stop_tx,
                tasks,
                tls,
            },
        );
        Ok(())
    }

    /// The per-key source statistics the listeners record.
    #[must_use]
    pub fn sources(&self) -> Arc<super::sources::Sources> {
        self.shared.sources.clone()
    }

    /// Swap the key table: the next request is judged by `keys`.
    pub fn set_keys(&self, keys: KeyTable) {
        *self
            .shared
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = keys;
    }

    /// One key changed (see [`KeyTable::replace`]): the next request sees it.
    pub fn replace_key(&self, old: Option<&Key>, new: Option<Arc<Key>>) {
        self.shared
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .replace(old, new);
    }

    /// Apply a new config: keys and rejection swap at once; listeners whose bind
    /// or TLS files changed are restarted, others take the new settings in place.
    pub async fn update(&mut self, config: &Config, keys: KeyTable) -> anyhow::Result<()> {
        self.set_keys(keys);
        *self
            .shared
            .rejection
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Arc::new(config.rejection.clone());
        let wanted: BTreeMap<&str, &ListenerConfig> = config
            .listeners
            .iter()
            .map(|l| (l.name.as_str(), l))
            .collect();
        let names: Vec<String> = self.listeners.keys().cloned().collect();
        for name in names {
            let keep_in_place = wanted.get(name.as_str()).is_some_and(|new| {
                let old = self.listeners[&name].config.borrow();
                old.bind == new.bind
                    && old.tls == new.tls
                    && old.upstream == new.upstream
                    && old.upstream_ca == new.upstream_ca
            });
            if keep_in_place {
                let running = &self.listeners[&name];
                running
                    .config
                    .send_replace(Arc::new((*wanted[name.as_str()]).clone()));
            } else if let Some(running) = self.listeners.remove(&name) {
                let _ = running.stop.send(true);
                for task in running.tasks {
                    let _ = task.await;
                }
            }
        }
        for l in &config.listeners {
            if !self.listeners.contains_key(&l.name) {
                self.spawn(l)?;
            }
        }
        Ok(())
    }

    /// Reload TLS certificates whose files changed.
    pub fn reload_certificates(&self) {
        for running in self.listeners.values() {
            if let Some(tls) = &running.tls {
                tls.reload_if_changed();
            }
        }
    }

    /// Stop accepting, let in-flight requests finish (bounded), return.
    pub async fn shutdown(mut self) {
        for running in self.listeners.values() {
            let _ = running.stop.send(true);
        }
        for (_, running) in std::mem::take(&mut self.listeners) {
            for task in running.tasks {
                let _ = task.await;
            }
        }
    }
}
