//! The kernel matrix: the datapath's privileged tests in a guest running
//! Debian 12's kernel (6.1: no TCX, so TC goes through clsact and netlink),
//! booted by virtme-ng under qemu with the host's root filesystem shared
//! read-only. `cargo xtask test` runs it as its own stage; `cargo xtask guest`
//! runs only it. `cargo xtask bench --only guest` boots the same guest to run
//! the datapath bench (`kf-bench`, its guest plan) on that kernel.
//!
//! Facts this relies on (checked on these machines): nested KVM is not
//! usable (`/dev/kvm` opens, but guests hang or die), so qemu runs TCG
//! (`--disable-kvm`): a boot takes about a minute and code runs tens of times
//! slower, hence the release build of the agent and the longer readiness
//! wait (`KEYFENCE_TEST_READY_SECS`). SQLite on the 9p root fails, so the
//! tests' temporary directories (and the agent's store in them) live on the
//! guest's tmpfs (`TMPDIR=/dev/shm`).

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

use crate::{build, cmd};

/// The guest kernel: Debian 12's standard flavour (the cloud flavour lacks 9p).
pub const KERNEL_PACKAGE: &str = "linux-image-6.1.0-50-amd64";
const KERNEL_IMAGE: &str = "/boot/vmlinuz-6.1.0-50-amd64";
/// The virtme-ng release `cargo xtask setup` installs (`PyPI`, into a venv).
pub const VIRTME_NG_VERSION: &str = "1.42";
/// The venv, relative to `$CARGO_HOME` (kept outside the clone, like the
/// LLVM prefix).
pub const VENV_DIR: &str = "keyfence-vng";
/// The test files that run in the guest: the datapath's.
const TESTS: &[&str] = &[
    "prog_fixtures",
    "prog_differential",
    "e2e_datapath",
    "e2e_tc",
    "e2e_datapath_log",
];
/// Packets per program in the guest's `prog_differential` (the host runs
/// 100 000, about 1.7 ms each in the debug test binary): under TCG the first
/// of its four runs had not finished after five minutes at the host's count.
/// The host's run is the thorough one; the guest's checks that 6.1's
/// programs agree with the model on a random sample.
const DIFF_CASES: u32 = 1_000;
/// The whole guest run, boot included (TCG): a bound, not a measurement. One
/// measurement under load (six builds sharing two cores): boot 63 s,
/// `prog_fixtures` 100 s, `e2e_datapath_log` 60 s, `prog_differential` 88 s,
/// `e2e_tc` 139 s, `e2e_datapath` 141 s, about 10 min in the guest, after
/// about 5 min building the release agent and the test binaries.
const GUEST_TIMEOUT_SECS: u32 = 2400;

/// What went wrong, if anything, and how long the stage took.
pub struct Outcome {
    pub error: Option<String>,
    pub seconds: u64,
}

/// The venv's `bin/` (virtme-ng's commands call each other by name).
pub fn venv_bin() -> anyhow::Result<PathBuf> {
    Ok(cmd::cargo_home()?.join(VENV_DIR).join("bin"))
}

/// Build what the guest runs and run it; `add_line` sees every output line
/// (the caller counts cargo's `test result:` lines).
pub fn run(add_line: &mut dyn FnMut(&str)) -> Outcome {
    let started = std::time::Instant::now();
    let error = run_inner(add_line).err().map(|e| format!("{e:#}"));
    Outcome {
        error,
        seconds: started.elapsed().as_secs(),
    }
}

fn run_inner(add_line: &mut dyn FnMut(&str)) -> anyhow::Result<()> {
    let agent = build::agent(build::Profile::Release).context("building keyfence (release)")?;
    let binaries = test_binaries()?;
    boot(&guest_script(&agent, &binaries), None, add_line)
}

/// The datapath bench in the guest: `kf-bench` (release) with
/// `KF_BENCH_GUEST` set, its markdown written to `dir/guest.md` and its JSON
/// to `dir/guest.json` (`dir` is shared read-write with the guest). Returns
/// the markdown.
pub fn bench(dir: &Path) -> anyhow::Result<String> {
    let bench = release_bin("kf-bench")?;
    let table = dir.join("guest.md");
    let _ = fs::remove_file(&table);
    let _ = fs::remove_file(dir.join("guest.json"));
    let script = script(
        "",
        &format!(
            "KF_BENCH_GUEST=1 KF_BENCH_DIR={} {} > {} || status=1\n",
            dir.display(),
            bench.display(),
            table.display()
        ),
    );
    boot(&script, Some(dir), &mut |line| println!("{line}"))?;
    fs::read_to_string(&table).with_context(|| format!("reading {}", table.display()))
}

/// Boot the guest with `script` as its only job (`rwdir`, when given, shared
/// read-write; the rest of the host's root is read-only) and stream its
/// output to `add_line`; an error unless the script reported `guest: up` and
/// `guest: done` and exited 0.
fn boot(script: &str, rwdir: Option<&Path>, add_line: &mut dyn FnMut(&str)) -> anyhow::Result<()> {
    let vng = venv_bin()?.join("vng");
    for (what, path) in [
        (
            "the guest kernel (cargo xtask setup installs it)",
            Path::new(KERNEL_IMAGE),
        ),
        ("virtme-ng (cargo xtask setup installs it)", vng.as_path()),
        (
            "qemu-system-x86_64 (package qemu-system-x86)",
            Path::new("/usr/bin/qemu-system-x86_64"),
        ),
    ] {
        if !path.exists() {
            bail!("{what} is missing: {} not found", path.display());
        }
    }
    let script_file = cmd::target_dir().join("keyfence-guest.sh");
    fs::write(&script_file, script)
        .with_context(|| format!("writing {}", script_file.display()))?;

    let path = format!(
        "{}:{}",
        venv_bin()?.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut run = cmd::new(
        "timeout",
        [GUEST_TIMEOUT_SECS.to_string(), vng.display().to_string()],
    );
    run.args(["--run", KERNEL_IMAGE, "--disable-kvm", "--memory", "3G"])
        .args(["--cpus", "2"]);
    if let Some(dir) = rwdir {
        run.arg(format!("--rwdir={}", dir.display()));
    }
    run.args(["--", "sh"])
        .arg(&script_file)
        .env("PATH", path)
        .current_dir(cmd::workspace_root());
    println!("guest: {}", cmd::display(&run));
    let mut booted = false;
    let mut finished = false;
    let exited_ok = cmd::run_streaming(&mut run, |line| {
        add_line(line);
        if line.starts_with("guest: up ") {
            booted = true;
        }
        if line.starts_with("guest: done") {
            finished = true;
        }
    })?;
    if !booted {
        bail!(
            "the guest kernel did not boot (or its script never ran): qemu TCG with {KERNEL_IMAGE}"
        );
    }
    if !finished {
        bail!("the guest stopped before its tests finished (timeout {GUEST_TIMEOUT_SECS} s?)");
    }
    if !exited_ok {
        bail!("the guest run exited non-zero");
    }
    Ok(())
}

/// `cargo build --release` of one binary of the tests package: its path.
fn release_bin(name: &str) -> anyhow::Result<PathBuf> {
    let mut build = cmd::cargo();
    build.args([
        "build",
        "--release",
        "--package",
        "keyfence-tests",
        "--bin",
        name,
        "--message-format=json",
    ]);
    let out = cmd::output(&mut build)?;
    out.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find_map(|msg| {
            (msg["reason"] == "compiler-artifact" && msg["target"]["name"] == name)
                .then(|| msg["executable"].as_str().map(PathBuf::from))
                .flatten()
        })
        .with_context(|| format!("cargo build gave no executable for {name}"))
}

/// `cargo test --no-run` for [`TESTS`]: the test executables' paths.
fn test_binaries() -> anyhow::Result<Vec<PathBuf>> {
    let mut build = cmd::cargo();
    build.args([
        "test",
        "--package",
        "keyfence-tests",
        "--no-run",
        "--message-format=json",
    ]);
    for t in TESTS {
        build.args(["--test", t]);
    }
    let out = cmd::output(&mut build)?;
    let mut found = Vec::new();
    for line in out.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["target"]["kind"][0] == "test"
            && let Some(exe) = msg["executable"].as_str()
        {
            found.push(PathBuf::from(exe));
        }
    }
    if found.len() != TESTS.len() {
        bail!(
            "cargo test --no-run gave {} test executables, expected {}",
            found.len(),
            TESTS.len()
        );
    }
    Ok(found)
}

/// What the guest runs: bpffs, the namespaces' directory, loopback, then each
/// test executable (one thread: they share the kernel), from the tests crate's
/// directory as cargo would.
fn guest_script(agent: &Path, binaries: &[PathBuf]) -> String {
    let mut setup = String::from(
        "mkdir -p /run/netns\n\
         ip link set lo up\n\
         export TMPDIR=/dev/shm KEYFENCE_TEST_READY_SECS=180 RUST_BACKTRACE=0\n",
    );
    let _ = writeln!(setup, "export KEYFENCE_DIFF_CASES={DIFF_CASES}");
    let _ = writeln!(setup, "export KEYFENCE_BIN={}", agent.display());
    let _ = writeln!(setup, "cd {}/tests", cmd::workspace_root().display());
    let mut body = String::new();
    for bin in binaries {
        let _ = writeln!(
            body,
            "echo \"guest: running {0}\"; {0} --test-threads=1 || status=1",
            bin.display()
        );
    }
    script(&setup, &body)
}

/// A guest script: bpffs, `setup`, the `guest: up` line [`boot`] waits for,
/// `body` (which sets `status=1` on a failure), the `guest: done` line, and
/// the exit status.
fn script(setup: &str, body: &str) -> String {
    format!(
        "set -u\n\
         mount -t bpf bpf /sys/fs/bpf\n\
         {setup}\
         echo \"guest: up $(uname -r)\"\n\
         status=0\n\
         {body}\
         echo \"guest: done $(cut -d' ' -f1 /proc/uptime) s since boot\"\n\
         exit $status\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_mounts_bpffs_and_runs_every_binary() {
        let s = guest_script(
            Path::new("/w/target/release/keyfence"),
            &[PathBuf::from("/w/a-1"), PathBuf::from("/w/b-2")],
        );
        assert!(s.contains("mount -t bpf bpf /sys/fs/bpf"));
        assert!(s.contains("TMPDIR=/dev/shm"));
        assert!(s.contains("KEYFENCE_DIFF_CASES=1000\n"));
        assert!(s.contains("KEYFENCE_BIN=/w/target/release/keyfence"));
        assert!(s.contains("/w/a-1 --test-threads=1") && s.contains("/w/b-2 --test-threads=1"));
        // boot() waits for `guest: up` before the tests and `guest: done`
        // after them; a failed binary makes the script exit non-zero.
        let up = s.find("guest: up").expect("an up line");
        let first = s.find("/w/a-1 --test-threads=1").expect("the first binary");
        let done = s.find("guest: done").expect("a done line");
        assert!(up < first && first < done, "{s}");
        assert!(s.contains("/w/a-1 --test-threads=1 || status=1"), "{s}");
        assert!(s.ends_with("exit $status\n"), "{s}");
    }
}
