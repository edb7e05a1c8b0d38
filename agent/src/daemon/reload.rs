//! A new config file (SIGHUP or the watcher): load and validate it, keep the
//! last good config when it is invalid or does not fit, and otherwise switch
//! the policy, the attachments, the shim and the API to it at once. Settings
//! bound to what the daemon opened at start wait for a restart
//! ([`RESTART_ONLY`]).

use std::sync::{Arc, PoisonError};

use anyhow::anyhow;

use super::Daemon;
use crate::{
    config::{self, AttachMode, Config},
    keys,
    management::{self, api::ApiState},
    metrics::ResultLabel,
    shim::runtime::{self as shim_runtime, Shim},
};

/// A setting a reload does not change: what it is called in the warning,
/// whether a new config changes it, and how the running config keeps it.
struct RestartOnly {
    name: &'static str,
    changed: fn(&Config, &Config) -> bool,
    keep: fn(&mut Config, &Config),
}

/// Every setting that takes effect only at the next restart (listed as such
/// in `docs/configuration.md`).
const RESTART_ONLY: &[RestartOnly] = &[
    RestartOnly {
        name: "store.path",
        changed: |old, new| old.store.path != new.store.path,
        keep: |run, old| run.store.path.clone_from(&old.store.path),
    },
    RestartOnly {
        name: "management.bind",
        changed: |old, new| old.management.bind != new.management.bind,
        keep: |run, old| run.management.bind = old.management.bind,
    },
    RestartOnly {
        name: "management.confirm",
        changed: |old, new| old.management.confirm_totp_env != new.management.confirm_totp_env,
        keep: |run, old| {
            run.management
                .confirm_totp_env
                .clone_from(&old.management.confirm_totp_env);
        },
    },
    RestartOnly {
        name: "datapath.pin_path",
        changed: |old, new| old.datapath.pin_path != new.datapath.pin_path,
        keep: |run, old| run.datapath.pin_path.clone_from(&old.datapath.pin_path),
    },
    RestartOnly {
        name: "turning the datapath on/off",
        changed: |old, new| {
            (old.datapath.mode == AttachMode::Off) != (new.datapath.mode == AttachMode::Off)
        },
        // The datapath is opened (or not) at start; the mode itself follows
        // the reload (the attach ladder is walked again).
        keep: |_, _| {},
    },
    RestartOnly {
        name: "metrics.bind",
        changed: |old, new| old.metrics.bind != new.metrics.bind,
        keep: |run, old| run.metrics.bind = old.metrics.bind,
    },
    RestartOnly {
        name: "shim.workers",
        changed: |old, new| old.shim.workers != new.shim.workers,
        keep: |run, old| run.shim.workers = old.shim.workers,
    },
];

impl Daemon {
    /// Load the file again; keep the last good config when it is invalid.
    pub(super) async fn reload(&mut self, shim: &mut Shim, api: &ApiState) {
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
        let outcome = match result {
            Ok(()) => {
                self.metrics.config_last_reload_successful.set(1);
                "success"
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "reload failed");
                self.metrics.config_last_reload_successful.set(0);
                "failure"
            }
        };
        self.metrics
            .config_reloads
            .get_or_create(&ResultLabel { result: outcome })
            .inc();
    }

    async fn switch_to(
        &mut self,
        new: Config,
        shim: &mut Shim,
        api: &ApiState,
    ) -> anyhow::Result<()> {
        // Secrets are read before anything changes, so a missing variable
        // rejects the whole reload.
        let statics = keys::statics(&new.keys)?;
        let keys = shim_runtime::key_table(&statics, self.stored.iter());
        let principals = management::principals(&new.management.admins, self.stored.iter())?;
        let old = std::mem::replace(&mut self.config, new);
        let waiting: Vec<&str> = RESTART_ONLY
            .iter()
            .filter(|s| (s.changed)(&old, &self.config))
            .map(|s| s.name)
            .collect();
        if !waiting.is_empty() {
            tracing::warn!("{} take effect at the next restart", waiting.join(", "));
        }
        for setting in RESTART_ONLY {
            (setting.keep)(&mut self.config, &old);
        }
        let old_statics = std::mem::replace(&mut self.statics, statics);
        if let Err(e) = self.apply_policy() {
            self.config = old;
            self.statics = old_statics;
            return Err(e);
        }
        if self.config.datapath.interfaces != old.datapath.interfaces
            || self.config.datapath.mode != old.datapath.mode
            || self.config.datapath.tc_attach != old.datapath.tc_attach
        {
            self.attach()?;
        }
        shim.update(&self.config, keys).await?;
        *api.static_keys
            .write()
            .unwrap_or_else(PoisonError::into_inner) = self.statics.clone();
        *api.principals
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(principals);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::RESTART_ONLY;
    use crate::config::{self, Config};

    fn config(store: &str, management: &str, pin: &str, mode: &str, metrics: &str) -> Config {
        let text = format!(
            r#"
store: {{ path: {store} }}
datapath: {{ interfaces: [eth0], mode: {mode}, pin_path: {pin} }}
listeners:
  - {{ name: api, bind: "[::]:8443", mode: proxy, upstream: "http://127.0.0.1:8080" }}
management: {{ bind: "{management}" }}
metrics: {{ bind: "{metrics}" }}
"#
        );
        config::parse(&text, "test.yaml").expect("a valid config")
    }

    #[test]
    fn restart_only_settings_are_named_and_kept() {
        let old = config(
            "/var/lib/keyfence/a.db",
            "127.0.0.1:9900",
            "/sys/fs/bpf/a",
            "auto",
            "127.0.0.1:9901",
        );
        let new = config(
            "/var/lib/keyfence/b.db",
            "127.0.0.1:9910",
            "/sys/fs/bpf/b",
            "off",
            "127.0.0.1:9911",
        );
        let named: Vec<&str> = RESTART_ONLY
            .iter()
            .filter(|s| (s.changed)(&old, &new))
            .map(|s| s.name)
            .collect();
        assert_eq!(
            named,
            [
                "store.path",
                "management.bind",
                "datapath.pin_path",
                "turning the datapath on/off",
                "metrics.bind"
            ]
        );
        assert!(RESTART_ONLY.iter().all(|s| !(s.changed)(&old, &old)));
        let mut running = new.clone();
        for s in RESTART_ONLY {
            (s.keep)(&mut running, &old);
        }
        assert_eq!(running.store, old.store);
        assert_eq!(running.management.bind, old.management.bind);
        assert_eq!(running.datapath.pin_path, old.datapath.pin_path);
        assert_eq!(running.metrics.bind, old.metrics.bind);
        // The mode follows the reload; only opening the datapath waits.
        assert_eq!(running.datapath.mode, new.datapath.mode);
        assert_eq!(running.listeners, new.listeners);
    }
}
