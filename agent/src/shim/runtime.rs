//! The shim's lifecycle: bind every listener, swap keys and listener settings on
//! reload without dropping connections, and drain on shutdown.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use anyhow::Context as _;
use tokio::{sync::watch, task::JoinHandle};

use super::{
    server::{self, Shared},
    tls::TlsAcceptor,
};
use crate::{
    config::{Config, ListenerConfig},
    keys::{Key, KeyTable},
    metrics::Metrics,
    store::StoredKey,
};

/// Addresses remembered per key for `GET /v1/keys/{id}/sources`.
pub const SOURCES_PER_KEY: usize = 32;
/// Keys remembered there (least recently used forgotten first).
pub const SOURCES_KEYS: usize = 4096;

/// The key table of the config's static keys (resolved: see
/// [`crate::keys::statics`]) and the store's active keys.
#[must_use]
pub fn key_table<'a>(
    statics: &[Arc<Key>],
    stored: impl IntoIterator<Item = &'a StoredKey>,
) -> KeyTable {
    KeyTable::new(
        statics.iter().cloned().chain(
            stored
                .into_iter()
                .filter(|k| k.is_active())
                .map(|k| k.key.clone()),
        ),
    )
}

struct Running {
    config: watch::Sender<Arc<ListenerConfig>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    tls: Option<TlsAcceptor>,
}

/// Every listener the shim serves.
pub struct Shim {
    shared: Arc<Shared>,
    listeners: BTreeMap<String, Running>,
}

impl Shim {
    /// Bind and serve every listener of `config`, answering with `keys`.
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
        let mut shim = Self {
            shared,
            listeners: BTreeMap::new(),
        };
        for l in &config.listeners {
            shim.spawn(l).await?;
        }
        Ok(shim)
    }

    async fn spawn(&mut self, l: &ListenerConfig) -> anyhow::Result<()> {
        let tls = l
            .tls
            .as_ref()
            .map(TlsAcceptor::load)
            .transpose()
            .with_context(|| format!("listener {}: TLS", l.name))?;
        let socket = server::bind(l).await?;
        let (config_tx, config_rx) = watch::channel(Arc::new(l.clone()));
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(server::serve(
            socket,
            config_rx,
            self.shared.clone(),
            tls.clone(),
            stop_rx,
        ));
        tracing::info!(listener = l.name, bind = %l.bind, tls = l.tls.is_some(), "listening");
        self.listeners.insert(
            l.name.clone(),
            Running {
                config: config_tx,
                stop: stop_tx,
                task,
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
                old.bind == new.bind && old.tls == new.tls && old.upstream == new.upstream
            });
            if keep_in_place {
                let running = &self.listeners[&name];
                running
                    .config
                    .send_replace(Arc::new((*wanted[name.as_str()]).clone()));
            } else if let Some(running) = self.listeners.remove(&name) {
                let _ = running.stop.send(true);
                let _ = running.task.await;
            }
        }
        for l in &config.listeners {
            if !self.listeners.contains_key(&l.name) {
                self.spawn(l).await?;
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
    pub async fn shutdown(self) {
        for running in self.listeners.values() {
            let _ = running.stop.send(true);
        }
        for (_, running) in self.listeners {
            let _ = running.task.await;
        }
    }
}
