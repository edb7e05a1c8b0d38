//! What wakes the event loop from outside: the config file changing on disk
//! (a watch on its directory, so editors' and Kubernetes' rename-replace is
//! seen) and signals (SIGHUP reloads, SIGTERM/SIGINT stop).

use std::path::Path;

use anyhow::{Context as _, anyhow};
use notify::Watcher as _;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::mpsc,
};

/// The config watcher's events and the signal handlers.
pub(super) struct Triggers {
    pub(super) _watcher: notify::RecommendedWatcher,
    pub(super) change_rx: mpsc::Receiver<()>,
    pub(super) hup: Signal,
    pub(super) term: Signal,
    pub(super) int: Signal,
}

impl Triggers {
    pub(super) fn install(config_path: &Path) -> anyhow::Result<Self> {
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

/// Whether a change to `path` (in the config's directory) can change the
/// config: the file itself (edited in place, or replaced by a rename), or the
/// `..data` symlink that a Kubernetes `ConfigMap` volume swaps atomically (the
/// config file there is a symlink through it and never changes itself).
fn names_the_config(path: &Path, config: Option<&std::ffi::OsStr>) -> bool {
    let name = path.file_name();
    name == config || name.is_some_and(|n| n.as_encoded_bytes().starts_with(b"..data"))
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
