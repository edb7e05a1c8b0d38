//! Local unprivileged users and weak settings, end to end with the real agent
//! (issue 13, findings 6 and 7): a pin directory, lock file or store directory
//! that user `nobody` owns is refused with the fix; after a normal start
//! `nobody` can neither unlink the pinned links nor open the lock; a config
//! file others can write and a management API beyond loopback are warned about
//! and counted until fixed. Needs root and the user `nobody` (uid 65534); run
//! through `cargo xtask test`.

use std::{
    fs,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _, chown},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use keyfence_tests::netns::{Agent, Lab, Netns, parse_samples, poll_until};

const NOBODY: u32 = 65534;

/// A datapath-less agent: only the checks before the kernel matter here. The
/// pin path is still the test's own (`keyfence detach` on drop uses it).
fn config_off(pin: &Path, extra: &str) -> String {
    format!(
        "datapath: {{ mode: off, pin_path: \"{}\" }}\nlisteners: []\n{extra}",
        pin.display()
    )
}

/// Attached to the lab's gateway veth, so there are link pins to attack.
fn config_attached(pin: &Path) -> String {
    format!(
        "{}\nlisteners: []\n",
        keyfence_tests::config::datapath(pin, "auto")
    )
}

/// Start the agent and wait until it exits (it must refuse to start).
fn refused_start(agent: &mut Agent) -> String {
    agent.spawn().expect("spawning keyfence");
    let exited = poll_until(Duration::from_secs(30), Duration::from_millis(50), || {
        !agent.is_running()
    });
    assert!(exited, "keyfence kept running; log:\n{}", agent.log());
    let status = agent
        .exited()
        .expect("the agent's status")
        .expect("it exited");
    assert!(!status.success(), "refused means a failed exit: {status}");
    assert!(
        agent.get("/readyz").is_err(),
        "nothing is served after a refusal"
    );
    agent.log()
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .mode()
        & 0o7777
}

fn owner(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .uid()
}

/// Run `argv` as `nobody` (uid and gid 65534, no supplementary groups);
/// `Ok(())` when it exits 0, else its stderr.
fn as_nobody(argv: &[&str]) -> Result<(), String> {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(argv)
        .stdin(Stdio::null())
        .output()
        .expect("running setpriv");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Removes a path the test planted, before the agent's guard runs
/// `keyfence detach` (declare it after the agent).
struct Planted(PathBuf);

impl Drop for Planted {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0).or_else(|_| fs::remove_dir_all(&self.0));
    }
}

#[test]
fn the_user_nobody_exists() {
    let out = Command::new("id")
        .args(["-u", "nobody"])
        .output()
        .expect("running id");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        NOBODY.to_string(),
        "these tests need the user nobody with uid 65534"
    );
}

/// bpffs' root is 1777: a pin directory someone else made must not be used.
#[test]
fn a_pin_directory_of_nobody_is_refused_with_the_fix() {
    let lab = Lab::new(&[]).expect("building the namespaces");
    let mut agent = Agent::new(&lab.gateway).expect("preparing keyfence");
    let pin = agent.pin_path().to_path_buf();
    agent
        .write_config(&config_attached(&pin))
        .expect("writing the config");

    // 1. The pin directory itself is nobody's.
    fs::create_dir(&pin).expect("pre-creating the pin directory");
    chown(&pin, Some(NOBODY), Some(NOBODY)).expect("chown nobody");
    fs::set_permissions(&pin, fs::Permissions::from_mode(0o755)).expect("chmod");
    let log = refused_start(&mut agent);
    let p = pin.display();
    assert!(
        log.contains(&format!(
            "pin directory {p} is owned by uid 65534: remove it (rm -r {p}) or chown root and chmod 0700 it"
        )),
        "{log}"
    );
    assert_eq!(owner(&pin), NOBODY, "a refused directory is left untouched");
    assert!(
        fs::read_dir(&pin).expect("listing").next().is_none(),
        "nothing was pinned into it"
    );

    // 2. Root's, but anyone may write it (someone could have pinned a map).
    chown(&pin, Some(0), Some(0)).expect("chown root");
    fs::set_permissions(&pin, fs::Permissions::from_mode(0o777)).expect("chmod");
    let log = refused_start(&mut agent);
    assert!(
        log.contains(&format!(
            "pin directory {p} is writable by group or others (mode 0777)"
        )),
        "{log}"
    );

    // 3. The pin directory is fine, the layout directory under it is nobody's.
    fs::set_permissions(&pin, fs::Permissions::from_mode(0o700)).expect("chmod");
    let layout = keyfence::datapath::pin_dir(&pin);
    fs::create_dir(&layout).expect("pre-creating the layout directory");
    chown(&layout, Some(NOBODY), Some(NOBODY)).expect("chown nobody");
    let log = refused_start(&mut agent);
    assert!(
        log.contains(&format!(
            "pin directory {} is owned by uid 65534",
            layout.display()
        )),
        "{log}"
    );

    // 4. Fixed as the message says: the agent starts and attaches.
    fs::remove_dir_all(&pin).expect("rm -r");
    agent.spawn().expect("spawning keyfence");
    agent
        .wait_ready(Duration::from_secs(30))
        .expect("ready after the fix");
    assert_eq!(mode(&pin), 0o700);
    assert_eq!(mode(&layout), 0o700);
}

/// `nobody` could hold a shared flock on the old 0644 lock file, and the agent
/// could not start; a lock file someone else owns is refused with the fix.
#[test]
fn a_lock_file_of_nobody_is_refused_with_the_fix() {
    let ns = Netns::new("local").expect("a namespace");
    let mut agent = Agent::new(&ns).expect("preparing keyfence");
    let pin = agent.pin_path().to_path_buf();
    // The datapath must be on for the lock to be taken.
    agent
        .write_config(&format!(
            "datapath: {{ mode: auto, pin_path: \"{}\" }}\nlisteners: []\n",
            pin.display()
        ))
        .expect("writing the config");
    let lock = keyfence::datapath::lock_path(&pin);
    let lock_dir = lock.parent().expect("the lock's directory");
    if !lock_dir.exists() {
        // What the agent itself would do; never changed when it exists.
        fs::DirBuilder::new()
            .mode(0o700)
            .create(lock_dir)
            .expect("creating the lock directory");
    }
    fs::write(&lock, b"").expect("planting the lock file");
    let _planted = Planted(lock.clone());
    chown(&lock, Some(NOBODY), Some(NOBODY)).expect("chown nobody");
    fs::set_permissions(&lock, fs::Permissions::from_mode(0o644)).expect("chmod");

    let log = refused_start(&mut agent);
    let l = lock.display();
    assert!(
        log.contains(&format!(
            "lock file {l} is owned by uid 65534: remove it (rm {l}); the agent creates its own"
        )),
        "{log}"
    );
    assert!(!pin.exists(), "nothing was pinned while refused");

    // A symbolic link in the lock's place is not followed either.
    fs::remove_file(&lock).expect("rm");
    std::os::unix::fs::symlink("/dev/null", &lock).expect("symlink");
    let log = refused_start(&mut agent);
    assert!(
        log.contains(&format!(
            "lock file {l} is a symbolic link, not a regular file"
        )),
        "{log}"
    );
    fs::remove_file(&lock).expect("rm");
}

/// After a normal start `nobody` can neither unlink the link pins (which
/// would detach XDP once the agent stops) nor open, hold or remove the lock.
#[test]
fn after_a_start_nobody_cannot_touch_the_pins_or_the_lock() {
    let lab = Lab::new(&[]).expect("building the namespaces");
    let agent = Agent::start(&lab.gateway, &[], config_attached).expect("starting keyfence");
    let pin = agent.pin_path().to_path_buf();
    let layout = keyfence::datapath::pin_dir(&pin);
    let lock = keyfence::datapath::lock_path(&pin);
    let lock_dir = lock.parent().expect("the lock's directory").to_path_buf();

    assert_eq!((owner(&pin), mode(&pin)), (0, 0o700), "the pin directory");
    assert_eq!(
        (owner(&layout), mode(&layout)),
        (0, 0o700),
        "the layout directory"
    );
    assert_eq!((owner(&lock), mode(&lock)), (0, 0o600), "the lock file");
    assert_eq!(
        (owner(&lock_dir), mode(&lock_dir)),
        (0, 0o700),
        "the lock directory"
    );

    let links: Vec<PathBuf> = fs::read_dir(&layout)
        .expect("listing the pins")
        .map(|e| e.expect("an entry").path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| keyfence::datapath::is_link_pin(&n.to_string_lossy()))
        })
        .collect();
    assert!(!links.is_empty(), "a link is pinned for gw0");
    for link in &links {
        let link = link.to_str().expect("a UTF-8 path");
        let err = as_nobody(&["rm", "-f", link]).expect_err("nobody unlinked a link pin");
        assert!(err.contains("Permission denied"), "{err}");
        assert!(Path::new(link).exists(), "{link} is still pinned");
    }
    let layout_s = layout.to_str().expect("a UTF-8 path");
    assert!(
        as_nobody(&["ls", layout_s]).is_err(),
        "nobody listed the pins"
    );
    let lock_s = lock.to_str().expect("a UTF-8 path");
    let err = as_nobody(&["rm", "-f", lock_s]).expect_err("nobody removed the lock");
    assert!(err.contains("Permission denied"), "{err}");
    // The original attack: a shared flock that keeps the next agent out.
    let err = as_nobody(&["flock", "--shared", "--nonblock", lock_s, "true"])
        .expect_err("nobody opened the lock");
    assert!(err.contains("Permission denied"), "{err}");
    assert!(lock.exists());
    assert!(
        !agent.attached().expect("reading metrics").is_empty(),
        "still attached"
    );
}

/// SQLite creates `-wal` and `-shm` next to the store: a store directory
/// someone else owns or may write is refused, and so is a store file of
/// theirs.
#[test]
fn a_store_directory_of_nobody_is_refused() {
    let ns = Netns::new("local").expect("a namespace");
    let mut agent = Agent::new(&ns).expect("preparing keyfence");
    let pin = agent.pin_path().to_path_buf();
    let dir = agent.dir().join("store");
    let db = dir.join("keyfence.db");
    agent
        .write_config(&config_off(
            &pin,
            &format!("store:\n  path: {}\n", db.display()),
        ))
        .expect("writing the config");
    let d = dir.display();

    fs::create_dir(&dir).expect("pre-creating the store directory");
    chown(&dir, Some(NOBODY), Some(NOBODY)).expect("chown nobody");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");
    let log = refused_start(&mut agent);
    assert!(
        log.contains(&format!("key store directory {d} is owned by uid 65534")),
        "{log}"
    );
    assert!(!db.exists(), "no store was created in it");

    chown(&dir, Some(0), Some(0)).expect("chown root");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777)).expect("chmod");
    let log = refused_start(&mut agent);
    assert!(
        log.contains(&format!(
            "key store directory {d} is writable by group or others (mode 1777)"
        )),
        "{log}"
    );

    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
    fs::write(&db, b"").expect("planting a store file");
    chown(&db, Some(NOBODY), Some(NOBODY)).expect("chown nobody");
    fs::set_permissions(&db, fs::Permissions::from_mode(0o600)).expect("chmod");
    let log = refused_start(&mut agent);
    assert!(
        log.contains(&format!(
            "key store file {} is owned by uid 65534",
            db.display()
        )),
        "{log}"
    );

    // A store file of root's that others may read (0644, as an older agent's
    // umask may have left it) is tightened and used.
    fs::remove_file(&db).expect("rm");
    fs::write(&db, b"").expect("an empty database");
    fs::set_permissions(&db, fs::Permissions::from_mode(0o644)).expect("chmod");
    agent.spawn().expect("spawning keyfence");
    agent.wait_ready(Duration::from_secs(30)).expect("ready");
    assert_eq!(mode(&db), 0o600);
}

/// The value of `keyfence_config_warnings{warning}`.
fn warning(agent: &Agent, which: &str) -> Option<f64> {
    parse_samples(
        &agent.metrics().expect("reading metrics"),
        "keyfence_config_warnings",
    )
    .iter()
    .find(|s| s.label("warning") == Some(which))
    .map(|s| s.value)
}

/// A config file anyone can write and a plain-HTTP management API on
/// 0.0.0.0 are warned about at start and counted; chmod 0600 and a reload
/// clear the first, a restart on loopback the second.
#[test]
fn weak_settings_are_warned_about_and_counted_until_fixed() {
    let ns = Netns::new("local").expect("a namespace");
    let mut agent = Agent::new(&ns).expect("preparing keyfence");
    let pin = agent.pin_path().to_path_buf();
    let config = agent.config_path().to_path_buf();
    let open_bind = "management: { bind: \"0.0.0.0:9900\" }\n";
    agent
        .write_config(&config_off(&pin, open_bind))
        .expect("writing the config");
    fs::set_permissions(&config, fs::Permissions::from_mode(0o666)).expect("chmod 0666");
    agent.spawn().expect("spawning keyfence");
    agent.wait_ready(Duration::from_secs(30)).expect("ready");

    let log = agent.log();
    let c = config.display();
    assert!(
        log.contains(&format!(
            "config file {c} is writable by group or others (mode 0666)"
        )),
        "{log}"
    );
    assert!(
        log.contains(
            "management.bind 0.0.0.0:9900 is beyond loopback and the management API has no TLS"
        ),
        "{log}"
    );
    assert_eq!(warning(&agent, "config_writable_by_others"), Some(1.0));
    assert_eq!(warning(&agent, "management_without_tls"), Some(1.0));

    fs::set_permissions(&config, fs::Permissions::from_mode(0o600)).expect("chmod 0600");
    agent.sighup().expect("SIGHUP");
    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
            warning(&agent, "config_writable_by_others") == Some(0.0)
        }),
        "the warning stays after chmod 0600 and a reload; log:\n{}",
        agent.log()
    );
    // management.bind changes only at a restart, so its warning stays.
    assert_eq!(warning(&agent, "management_without_tls"), Some(1.0));

    agent
        .write_config(&config_off(
            &pin,
            "management: { bind: \"127.0.0.1:9900\" }\n",
        ))
        .expect("rewriting the config");
    assert_eq!(mode(&config), 0o600, "rewritten in place");
    agent.restart().expect("restarting");
    assert_eq!(warning(&agent, "management_without_tls"), Some(0.0));
    assert_eq!(warning(&agent, "config_writable_by_others"), Some(0.0));
}
