//! Settings that work but silently weaken keyfence (issue 13, finding 7): a
//! configuration file others can write (they decide where every key works) and
//! a management API reachable beyond loopback without TLS (admin tokens, new
//! keys' secrets and step-up codes cross the network in clear text). Checked
//! at start and on every reload; each is logged as a warning and exposed as
//! `keyfence_config_warnings{warning}`, 1 while it holds and 0 otherwise.

use std::{
    net::SocketAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{config::Config, fsguard::Stat};

const GROUP_OTHER_WRITE: u32 = 0o022;
const STICKY: u32 = 0o1000;

/// One kind of weak setting; its label is the metric's `warning`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Warning {
    ConfigWritableByOthers,
    ManagementWithoutTls,
}

impl Warning {
    pub const ALL: [Warning; 2] = [
        Warning::ConfigWritableByOthers,
        Warning::ManagementWithoutTls,
    ];

    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Warning::ConfigWritableByOthers => "config_writable_by_others",
            Warning::ManagementWithoutTls => "management_without_tls",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WarningLabel {
    pub warning: &'static str,
}

/// `keyfence_config_warnings{warning}`.
pub type WarningGauges = Family<WarningLabel, Gauge>;

/// Register `keyfence_config_warnings` with every warning at 0.
pub fn register(registry: &mut Registry) -> WarningGauges {
    let gauges = WarningGauges::default();
    for w in Warning::ALL {
        gauges
            .get_or_create(&WarningLabel { warning: w.label() })
            .set(0);
    }
    registry.register(
        "keyfence_config_warnings",
        "1 while a weak setting holds (see the log for the fix), by warning",
        gauges.clone(),
    );
    gauges
}

/// Who may change the configuration file at `path` (`file`) or replace it in
/// its directory (`dir`): warn unless only `euid` or root can. A sticky
/// directory (`/tmp`) keeps others from replacing a file they do not own.
#[must_use]
pub fn config_file(path: &Path, file: Stat, dir: Option<(&Path, Stat)>, euid: u32) -> Vec<String> {
    let p = path.display();
    let mut found = Vec::new();
    if file.mode & GROUP_OTHER_WRITE != 0 {
        found.push(format!(
            "config file {p} is writable by group or others (mode {:04o}): whoever can \
             write it decides where every key works; chmod 0600 {p} (0640 to let a group read it)",
            file.mode
        ));
    }
    if file.uid != euid && file.uid != 0 {
        found.push(format!(
            "config file {p} is owned by uid {}: its owner can rewrite every allow list; \
             chown root {p}",
            file.uid
        ));
    }
    if let Some((dir, st)) = dir
        && st.mode & GROUP_OTHER_WRITE != 0
        && st.mode & STICKY == 0
    {
        let d = dir.display();
        found.push(format!(
            "config directory {d} is writable by group or others (mode {:04o}): anyone \
             can replace {p} there; chmod go-w {d}",
            st.mode
        ));
    }
    found
}

/// Warn when the management API (and console) listens beyond loopback
/// without `management.tls`.
#[must_use]
pub fn management(bind: SocketAddr, tls: bool) -> Option<String> {
    if tls || bind.ip().to_canonical().is_loopback() {
        return None;
    }
    Some(format!(
        "management.bind {bind} is beyond loopback and the management API has no TLS: \
         admin tokens, console sessions, new keys' secrets and step-up codes cross the \
         network in clear text; set management.tls {{cert, key}}, bind it to 127.0.0.1 \
         (reach it over SSH) or put a TLS-terminating proxy in front"
    ))
}

/// Every weak setting of `config` loaded from `path`, with its message.
#[must_use]
pub fn check(path: &Path, config: &Config, euid: u32) -> Vec<(Warning, String)> {
    let mut found = Vec::new();
    // Followed through symbolic links: what matters is who can write the file
    // the agent reads (a Kubernetes ConfigMap's config is a link into `..data`).
    if let Ok(meta) = std::fs::metadata(path) {
        let dir: PathBuf = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let dir_stat = std::fs::metadata(&dir).ok().map(|m| Stat::of(&m));
        let file = Stat {
            uid: meta.uid(),
            mode: meta.mode() & 0o7777,
            kind: crate::fsguard::Kind::File,
        };
        for message in config_file(path, file, dir_stat.map(|s| (dir.as_path(), s)), euid) {
            found.push((Warning::ConfigWritableByOthers, message));
        }
    }
    if let Some(message) = management(config.management.bind, config.management.tls.is_some()) {
        found.push((Warning::ManagementWithoutTls, message));
    }
    found
}

/// Check, log each warning, and set the gauges (1 for each warning found, 0
/// for the others).
pub fn report(path: &Path, config: &Config, gauges: &WarningGauges) {
    let found = check(path, config, crate::fsguard::euid());
    for (warning, message) in &found {
        tracing::warn!(warning = warning.label(), "{message}");
    }
    for w in Warning::ALL {
        let on = found.iter().any(|(f, _)| *f == w);
        gauges
            .get_or_create(&WarningLabel { warning: w.label() })
            .set(i64::from(on));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsguard::Kind;

    fn st(uid: u32, mode: u32, kind: Kind) -> Stat {
        Stat { uid, mode, kind }
    }

    const CFG: &str = "/etc/keyfence/keyfence.yaml";

    #[test]
    fn a_private_config_file_is_quiet() {
        let dir = Path::new("/etc/keyfence");
        for mode in [0o600, 0o640, 0o644, 0o400] {
            let found = config_file(
                Path::new(CFG),
                st(0, mode, Kind::File),
                Some((dir, st(0, 0o755, Kind::Dir))),
                0,
            );
            assert!(found.is_empty(), "{mode:o}: {found:?}");
        }
        // The agent's own uid is as good as root.
        assert!(
            config_file(
                Path::new(CFG),
                st(990, 0o600, Kind::File),
                Some((dir, st(0, 0o1777, Kind::Dir))),
                990
            )
            .is_empty()
        );
    }

    #[test]
    fn writable_or_foreign_config_files_warn() {
        let dir = Path::new("/etc/keyfence");
        let closed = Some((dir, st(0, 0o755, Kind::Dir)));
        for mode in [0o666, 0o660, 0o620, 0o602] {
            let found = config_file(Path::new(CFG), st(0, mode, Kind::File), closed, 0);
            assert_eq!(found.len(), 1, "{mode:o}");
            assert!(
                found[0].contains(&format!("mode {mode:04o}")),
                "{}",
                found[0]
            );
            assert!(found[0].contains("chmod 0600 /etc/keyfence/keyfence.yaml"));
        }
        let found = config_file(Path::new(CFG), st(65534, 0o600, Kind::File), closed, 0);
        assert_eq!(found.len(), 1);
        assert!(found[0].contains("owned by uid 65534"), "{}", found[0]);
        let found = config_file(
            Path::new(CFG),
            st(0, 0o600, Kind::File),
            Some((dir, st(0, 0o777, Kind::Dir))),
            0,
        );
        assert_eq!(found.len(), 1);
        assert!(
            found[0].contains("chmod go-w /etc/keyfence"),
            "{}",
            found[0]
        );
    }

    #[test]
    fn management_beyond_loopback_warns() {
        for quiet in [
            "127.0.0.1:9900",
            "127.0.0.53:9900",
            "[::1]:9900",
            "[::ffff:127.0.0.1]:9900",
        ] {
            assert_eq!(management(quiet.parse().unwrap(), false), None, "{quiet}");
        }
        for loud in [
            "0.0.0.0:9900",
            "[::]:9900",
            "192.0.2.1:9900",
            "[2001:db8::1]:9900",
        ] {
            let message = management(loud.parse().unwrap(), false).expect(loud);
            assert!(message.contains(loud), "{message}");
            assert!(message.contains("no TLS"), "{message}");
            assert!(message.contains("management.tls"), "{message}");
            assert_eq!(management(loud.parse().unwrap(), true), None, "TLS: {loud}");
        }
    }

    #[test]
    fn the_gauges_follow_the_findings() {
        let mut registry = Registry::default();
        let gauges = register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("keyfence_config_warnings{warning=\"management_without_tls\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("keyfence_config_warnings{warning=\"config_writable_by_others\"} 0"),
            "{text}"
        );
        let mut config =
            crate::config::parse("listeners: []\n", "k.yaml").expect("a minimal config");
        config.management.bind = "0.0.0.0:9900".parse().unwrap();
        report(Path::new("/nonexistent/keyfence.yaml"), &config, &gauges);
        let get = |w: Warning| {
            gauges
                .get_or_create(&WarningLabel { warning: w.label() })
                .get()
        };
        assert_eq!(get(Warning::ManagementWithoutTls), 1);
        assert_eq!(get(Warning::ConfigWritableByOthers), 0);
        config.management.bind = "127.0.0.1:9900".parse().unwrap();
        report(Path::new("/nonexistent/keyfence.yaml"), &config, &gauges);
        assert_eq!(get(Warning::ManagementWithoutTls), 0);
    }
}
