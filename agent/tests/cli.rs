//! The command line through the built binary, unprivileged: what `keyfence
//! check` prints and exits with, and the default `--config` of every command
//! (issue 14, deliverable 7).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

const KEY_VAR: &str = "KF_CLI_TEST_KEY_SECRET";
const TOKEN_VAR: &str = "KF_CLI_TEST_ADMIN_TOKEN";
const TOTP_VAR: &str = "KF_CLI_TEST_TOTP";
const SECRET: &str = "cli-test-secret-0123456789";
const TOTP: &str = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ";

/// A config naming one variable of each kind; the key has no `name`.
const CONFIG: &str = "keys:
  - { id: ci, secret_env: KF_CLI_TEST_KEY_SECRET }
management:
  admins: [{ name: ops, token_env: KF_CLI_TEST_ADMIN_TOKEN }]
  confirm: { totp_secret_env: KF_CLI_TEST_TOTP }
";

/// A file of its own under the temporary directory, removed on drop.
struct TempConfig(PathBuf);

impl TempConfig {
    fn new(text: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "keyfence-cli-test-{}-{}.yaml",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, text).expect("writing the test config");
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn keyfence() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyfence"));
    for var in [KEY_VAR, TOKEN_VAR, TOTP_VAR] {
        cmd.env_remove(var);
    }
    cmd
}

/// `keyfence check --config FILE [extra]` with `env` set.
fn check(config: &TempConfig, env: &[(&str, &str)], extra: &[&str]) -> Output {
    let mut cmd = keyfence();
    cmd.arg("check")
        .arg("--config")
        .arg(config.path())
        .args(extra);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running keyfence check")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const ALL_SET: [(&str, &str); 3] = [(KEY_VAR, SECRET), (TOKEN_VAR, SECRET), (TOTP_VAR, TOTP)];

#[test]
fn check_passes_when_every_variable_holds_what_run_accepts() {
    let config = TempConfig::new(CONFIG);
    let out = check(&config, &ALL_SET, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).ends_with(": ok\n"));
}

#[test]
fn check_exits_64_naming_each_unset_variable_where_the_config_names_it() {
    let config = TempConfig::new(CONFIG);
    let out = check(&config, &[], &[]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    let file = config.path().display().to_string();
    let lines: Vec<String> = stderr(&out).lines().map(ToOwned::to_owned).collect();
    assert_eq!(
        lines,
        [
            format!("{file}:2:27: keys[0].secret_env: environment variable {KEY_VAR} is not set"),
            format!(
                "{file}:4:36: management.admins[0].token_env: environment variable {TOKEN_VAR} is not set"
            ),
            format!(
                "{file}:5:31: management.confirm.totp_secret_env: environment variable {TOTP_VAR} is not set"
            ),
        ]
    );
}

#[test]
fn check_refuses_values_run_would_refuse() {
    let config = TempConfig::new(CONFIG);
    let out = check(
        &config,
        &[
            (KEY_VAR, "nineteen-characters"),
            (TOKEN_VAR, "short"),
            (TOTP_VAR, "not base32!"),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    let err = stderr(&out);
    for want in [
        format!("keys[0].secret_env: the secret in {KEY_VAR} is shorter than 20 characters"),
        format!(
            "management.admins[0].token_env: the secret in {TOKEN_VAR} is shorter than 20 characters"
        ),
        format!(
            "management.confirm.totp_secret_env: {TOTP_VAR}: the TOTP secret is not valid base32"
        ),
    ] {
        assert!(err.contains(&want), "{want:?} missing from:\n{err}");
    }
    assert_eq!(err.lines().count(), 3, "{err}");
}

#[test]
fn skip_env_validates_the_file_alone() {
    let config = TempConfig::new(CONFIG);
    let out = check(&config, &[], &["--skip-env"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // The file's own mistakes still count.
    let broken = TempConfig::new(&format!("{CONFIG}rejection: {{ status: 200 }}\n"));
    let out = check(&broken, &[], &["--skip-env"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("rejection.status: status 200 is not an HTTP error status"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn shape_and_value_mistakes_are_printed_together() {
    let config = TempConfig::new(
        "listeners:\n  - { name: a, bind: \"[::]:1\", mode: auth, early_drop: maybe }\n\
         keys:\n  - { id: k, secret_env: KF_CLI_TEST_KEY_SECRET, ip_allow_list: \"10.0.0.5/8\" }\n",
    );
    let out = check(&config, &[(KEY_VAR, SECRET)], &[]);
    assert_eq!(out.status.code(), Some(64));
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(lines[0].contains("listeners[0].early_drop: expected true or false"));
    assert!(lines[1].contains("keys[0].ip_allow_list: entry 1 \"10.0.0.5/8\": host bits set"));
}

#[test]
fn every_command_defaults_to_the_packaging_path() {
    for command in ["run", "check", "status", "detach"] {
        let help = keyfence()
            .args([command, "--help"])
            .output()
            .expect("keyfence --help");
        let text = String::from_utf8_lossy(&help.stdout);
        assert!(
            text.contains("[default: /etc/keyfence/keyfence.yaml]"),
            "{command} --help:\n{text}"
        );
        if command == "run" {
            // Without a config file it would stop at once, but it is the daemon.
            continue;
        }
        let out = keyfence().arg(command).output().expect("keyfence");
        assert_ne!(out.status.code(), Some(2), "{command}: not a usage error");
        if !Path::new("/etc/keyfence/keyfence.yaml").exists() {
            assert_eq!(out.status.code(), Some(64), "{command}: {}", stderr(&out));
            assert!(
                stderr(&out).starts_with("/etc/keyfence/keyfence.yaml:0:0: (file): cannot read"),
                "{command}: {}",
                stderr(&out)
            );
        }
    }
}

/// Usage errors exit 2 (clap's code, SPEC §1) and say what was wrong; they
/// never read a config or reach the API.
#[test]
fn usage_errors_exit_2() {
    for (args, says) in [
        (&["frobnicate"][..], "unrecognized subcommand"),
        (&["check", "--no-such-flag"][..], "unexpected argument"),
        (&["--log-format", "xml", "check"][..], "invalid value"),
        (&["keys", "update"][..], "required"),
        (
            &["keys", "update", "key_x", "--report-only", "maybe"][..],
            "invalid value",
        ),
        (&["run", "--config"][..], "a value is required"),
        (&[][..], "Usage"),
    ] {
        let out = keyfence()
            .args(args)
            .env("KEYFENCE_API", "http://192.0.2.1:9")
            .output()
            .expect("keyfence");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
}

/// An invalid config exits 64 from every command that reads one (`run`
/// before it touches the kernel), with the located error.
#[test]
fn an_invalid_config_exits_64_from_every_command() {
    let broken = TempConfig::new("datapath: { mode: off }\nrejection: { status: 200 }\n");
    for command in ["check", "run", "status", "detach"] {
        let out = keyfence()
            .arg(command)
            .arg("--config")
            .arg(broken.path())
            .output()
            .expect("keyfence");
        assert_eq!(out.status.code(), Some(64), "{command}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("{}:2:", broken.path().display()))
                && stderr(&out).contains("rejection.status"),
            "{command}: {}",
            stderr(&out)
        );
    }
}
