//! `cargo xtask setup`: make this machine able to build and test keyfence.
//!
//! Idempotent, and says one line per step: what it found, what it did, or what
//! failed. The recipe is the verified one of the project's toolchain notes:
//! `rust-src` for the installed `nightly` (aya-build compiles `core` for the BPF
//! target with it), `bpf-linker` built against that nightly's own LLVM (through
//! a prefix directory kept under `$CARGO_HOME`, which becomes the binary's
//! RUNPATH, so it must outlive the clone), bpffs at `/sys/fs/bpf`, and the
//! Debian packages the tests and the demo call, and cargo-fuzz for the fuzz stage.

use std::{
    fs,
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};

use crate::cmd;

/// The `bpf-linker` release this project builds with.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// LLVM majors that `bpf-linker` 0.13.0 offers as `llvm-NN` features (its
/// Cargo.toml: `llvm-21`, `llvm-22`, `llvm-23`; the default, `llvm-23`, wants a
/// system LLVM, hence `--no-default-features`).
const BPF_LINKER_LLVM_MAJORS: &[u32] = &[21, 22, 23];

/// The LLVM prefix for building `bpf-linker`, relative to `$CARGO_HOME`.
const LLVM_PREFIX_DIR: &str = "keyfence-llvm";

/// Debian packages the tests and the demo run, and who needs each. The one list:
/// issues that add tools (nginx, haproxy, wrk, prometheus, …) add them here.
pub const PACKAGES: &[(&str, &str)] = &[
    (
        "iproute2",
        "ip and tc: namespaces and veth pairs in the tests and the demo",
    ),
    (
        "util-linux",
        "nsenter: runs the agent in a namespace with the host's bpffs",
    ),
    ("curl", "the HTTP client of the demo and the shim tests"),
    (
        "nginx",
        "auth_request in front of an auth-mode listener (shim tests, bench)",
    ),
    (
        "haproxy",
        "sends PROXY protocol v2 to a proxy_protocol listener (shim tests)",
    ),
    ("openssl", "makes the TLS listener's test certificate"),
    (
        "wrk",
        "requests/s and latency of the shim against its upstream",
    ),
    (
        "prometheus",
        "promtool check metrics validates /metrics in the tests",
    ),
    (
        "postgresql",
        "fleet mode's shared store: the fleet tests and demo run initdb/pg_ctl themselves (the service stays off)",
    ),
    (
        "nftables",
        "cuts one fleet host off from the database in the fleet tests",
    ),
    (
        "ethtool",
        "TSO/GSO off and GRO on for threaded NAPI on the bench's veth ends (kf-bench-flood)",
    ),
    (
        "chromium",
        "the headless browser of the console tests and the demo's screenshots",
    ),
    (
        "chromium-driver",
        "WebDriver for that browser: the console tests drive it over HTTP",
    ),
    (
        "qemu-system-x86",
        "boots the guest kernel of the kernel matrix (xtask guest stage, TCG)",
    ),
    (
        crate::guest::KERNEL_PACKAGE,
        "the guest kernel: Debian 12's 6.1, without TCX (xtask guest stage)",
    ),
    (
        "busybox-static",
        "virtme-ng builds the guest's initramfs with it (xtask guest stage)",
    ),
    (
        "python3-venv",
        "the venv virtme-ng (PyPI) is installed into (xtask guest stage)",
    ),
];

/// virtme-ng from `PyPI` into a venv under `$CARGO_HOME` (outside the clone, so
/// a fresh clone reuses it): `python3 -m venv`, then pip.
fn virtme_ng() -> anyhow::Result<()> {
    let bin = crate::guest::venv_bin()?;
    let vng = bin.join("vng");
    let version = cmd::output(&mut cmd::new(vng.to_string_lossy().as_ref(), ["--version"]));
    if let Ok(v) = &version
        && v.contains(crate::guest::VIRTME_NG_VERSION)
    {
        say("virtme-ng", format_args!("{} installed", v.trim()));
        return Ok(());
    }
    let venv = bin.parent().context("the venv's bin has a parent")?;
    cmd::run(&mut cmd::new(
        "python3",
        ["-m".as_ref(), "venv".as_ref(), venv.as_os_str()],
    ))
    .context("creating the virtme-ng venv (package python3-venv)")?;
    cmd::run(&mut cmd::new(
        bin.join("pip").to_string_lossy().as_ref(),
        [
            "install",
            "--quiet",
            &format!("virtme-ng=={}", crate::guest::VIRTME_NG_VERSION),
        ],
    ))
    .context("installing virtme-ng from PyPI")?;
    say(
        "virtme-ng",
        format_args!(
            "installed {} in {}",
            crate::guest::VIRTME_NG_VERSION,
            venv.display()
        ),
    );
    Ok(())
}

/// Where bpffs must be mounted.
const BPFFS: &str = "/sys/fs/bpf";

/// One independent part of the setup.
type Step = fn() -> anyhow::Result<()>;

fn say(step: &str, what: impl std::fmt::Display) {
    println!("setup: {step}: {what}");
}

/// Run every step; fail (after trying the independent ones) if any failed.
pub fn run() -> anyhow::Result<()> {
    let mut failed = Vec::new();
    let steps: [(&str, Step); 5] = [
        ("toolchain", toolchain),
        ("bpffs", bpffs),
        ("packages", packages),
        ("cargo-fuzz", cargo_fuzz),
        ("virtme-ng", virtme_ng),
    ];
    for (name, step) in steps {
        if let Err(e) = step() {
            say(name, format_args!("FAILED: {e:#}"));
            failed.push(name);
        }
    }
    if failed.is_empty() {
        say("done", "this machine can build and test keyfence");
        Ok(())
    } else {
        bail!("setup failed at: {}", failed.join(", "))
    }
}

/// rust-src, the nightly's LLVM, the prefix and bpf-linker: each needs the one before.
fn toolchain() -> anyhow::Result<()> {
    let sysroot = nightly_sysroot()?;
    say("nightly", format_args!("found at {}", sysroot.display()));
    rust_src()?;
    let (major, llvm_file) = nightly_llvm(&sysroot)?;
    say(
        "nightly LLVM",
        format_args!("major {major} ({})", llvm_file.display()),
    );
    let prefix = llvm_prefix(&llvm_file)?;
    bpf_linker(major, &prefix)
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    let out = cmd::output(&mut cmd::new("rustc", ["+nightly", "--print", "sysroot"])).context(
        "the `nightly` toolchain is not installed (RUSTUP_AUTO_INSTALL=0 keeps rustup from \
         fetching it): install it with `rustup toolchain install nightly`",
    )?;
    Ok(PathBuf::from(out.trim()))
}

fn rust_src() -> anyhow::Result<()> {
    let installed = cmd::output(&mut cmd::new(
        "rustup",
        ["component", "list", "--toolchain", "nightly", "--installed"],
    ))?;
    if installed.lines().any(|l| l.trim() == "rust-src") {
        say("rust-src (nightly)", "already installed");
        return Ok(());
    }
    cmd::run(&mut cmd::new(
        "rustup",
        ["component", "add", "rust-src", "--toolchain", "nightly"],
    ))
    .context(
        "could not add rust-src to the nightly toolchain; rustup must reach its download \
         server (static.rust-lang.org) for this one step",
    )?;
    say("rust-src (nightly)", "installed");
    Ok(())
}

/// The nightly's `lib/libLLVM.so.NN.*` and its major `NN`.
fn nightly_llvm(sysroot: &Path) -> anyhow::Result<(u32, PathBuf)> {
    let lib = sysroot.join("lib");
    let mut found = Vec::new();
    for entry in fs::read_dir(&lib).with_context(|| format!("listing {}", lib.display()))? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix("libLLVM.so.") else {
            continue;
        };
        let major = rest.split('.').next().and_then(|m| m.parse::<u32>().ok());
        if let Some(major) = major {
            found.push((major, lib.join(name)));
        }
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("no lib/libLLVM.so.NN.* in {}", sysroot.display()),
        many => bail!(
            "several LLVM libraries in {}: {:?}",
            lib.display(),
            many.iter().map(|(_, p)| p).collect::<Vec<_>>()
        ),
    }
}

/// `$CARGO_HOME/keyfence-llvm/lib/{libLLVM.so, <exact name>}` → the nightly's file.
fn llvm_prefix(llvm_file: &Path) -> anyhow::Result<PathBuf> {
    let prefix = cmd::cargo_home()?.join(LLVM_PREFIX_DIR);
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let exact = llvm_file
        .file_name()
        .ok_or_else(|| anyhow!("{} has no file name", llvm_file.display()))?;
    let wanted = [std::ffi::OsStr::new("libLLVM.so"), exact];
    let mut changed = Vec::new();
    // Links to an older nightly's LLVM would keep a stale bpf-linker loading: drop them.
    for entry in fs::read_dir(&lib)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with("libLLVM") && !wanted.contains(&name.as_os_str()) {
            fs::remove_file(entry.path())?;
            changed.push(format!("removed {}", name.to_string_lossy()));
        }
    }
    for name in wanted {
        let link = lib.join(name);
        if fs::read_link(&link).is_ok_and(|target| target == llvm_file) {
            continue;
        }
        if link.symlink_metadata().is_ok() {
            fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
        }
        symlink(llvm_file, &link).with_context(|| format!("linking {}", link.display()))?;
        changed.push(format!("linked {}", name.to_string_lossy()));
    }
    if changed.is_empty() {
        say(
            "LLVM prefix",
            format_args!("{} up to date", prefix.display()),
        );
    } else {
        say(
            "LLVM prefix",
            format_args!("{}: {}", prefix.display(), changed.join(", ")),
        );
    }
    Ok(prefix)
}

/// The version `bpf-linker --version` reports, if it runs at all.
fn bpf_linker_version() -> Option<String> {
    let out = cmd::output(&mut cmd::new("bpf-linker", ["--version"])).ok()?;
    out.split_whitespace().nth(1).map(str::to_owned)
}

/// The `llvm-NN` features cargo recorded for the installed bpf-linker, if any.
fn bpf_linker_recorded_features() -> Option<Vec<String>> {
    let path = cmd::cargo_home().ok()?.join(".crates2.json");
    let json: serde_json::Value = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
    let installs = json.get("installs")?.as_object()?;
    let (_, install) = installs
        .iter()
        .find(|(k, _)| k.starts_with(&format!("bpf-linker {BPF_LINKER_VERSION} ")))?;
    Some(
        install
            .get("features")?
            .as_array()?
            .iter()
            .filter_map(|f| f.as_str().map(str::to_owned))
            .collect(),
    )
}

fn bpf_linker(major: u32, prefix: &Path) -> anyhow::Result<()> {
    if !BPF_LINKER_LLVM_MAJORS.contains(&major) {
        bail!(
            "the nightly uses LLVM {major}, and bpf-linker {BPF_LINKER_VERSION} has no \
             llvm-{major} feature (it has {}); update BPF_LINKER_VERSION in xtask/src/setup.rs",
            BPF_LINKER_LLVM_MAJORS
                .iter()
                .map(|m| format!("llvm-{m}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let feature = format!("llvm-{major}");
    let version = bpf_linker_version();
    let recorded = bpf_linker_recorded_features();
    let feature_ok = recorded.as_ref().is_none_or(|f| f.contains(&feature));
    if version.as_deref() == Some(BPF_LINKER_VERSION) && feature_ok {
        say(
            "bpf-linker",
            format_args!("{BPF_LINKER_VERSION} works (feature {feature})"),
        );
        return Ok(());
    }
    let why = match (&version, feature_ok) {
        (None, _) => "absent or cannot start".to_owned(),
        (Some(v), true) => format!("version {v}"),
        (Some(_), false) => format!("built with {recorded:?}, not {feature}"),
    };
    say(
        "bpf-linker",
        format_args!("{why}: installing {BPF_LINKER_VERSION} with {feature} (about a minute)"),
    );
    let mut install = cmd::cargo();
    install
        .env("LLVM_PREFIX", prefix)
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--locked", "--force", "--no-default-features", "--features"])
        .arg(&feature);
    cmd::run(&mut install)?;
    match bpf_linker_version() {
        Some(v) if v == BPF_LINKER_VERSION => {
            say(
                "bpf-linker",
                format_args!(
                    "installed {v} ({feature}, LLVM_PREFIX={})",
                    prefix.display()
                ),
            );
            Ok(())
        }
        other => bail!(
            "bpf-linker still does not work after installing it (`bpf-linker --version` gave \
             {other:?}); is {} on PATH?",
            cmd::cargo_home()?.join("bin").display()
        ),
    }
}

/// cargo-fuzz, which the fuzz stage of `cargo xtask test` runs (`fuzz.rs`):
/// installed from crates.io when absent or another version (about a minute).
fn cargo_fuzz() -> anyhow::Result<()> {
    let wanted = crate::fuzz::CARGO_FUZZ_VERSION;
    let found = crate::fuzz::installed_version();
    if found.as_deref() == Some(wanted) {
        say("cargo-fuzz", format_args!("{wanted} works"));
        return Ok(());
    }
    let why = found.map_or_else(|| "absent".to_owned(), |v| format!("version {v}"));
    say(
        "cargo-fuzz",
        format_args!("{why}: installing {wanted} (about a minute)"),
    );
    let mut install = cmd::cargo();
    install.args([
        "install",
        "cargo-fuzz",
        "--version",
        wanted,
        "--locked",
        "--force",
    ]);
    cmd::run(&mut install)?;
    match crate::fuzz::installed_version() {
        Some(v) if v == wanted => {
            say("cargo-fuzz", format_args!("installed {v}"));
            Ok(())
        }
        other => bail!(
            "`cargo +nightly fuzz --version` gave {other:?} after installing {wanted}; is {} on PATH?",
            cmd::cargo_home()?.join("bin").display()
        ),
    }
}

/// Whether `/proc/self/mounts` has a bpf filesystem at [`BPFFS`].
fn bpffs_mounted() -> anyhow::Result<bool> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    Ok(mounts.lines().any(|l| {
        let mut fields = l.split_whitespace().skip(1);
        fields.next() == Some(BPFFS) && fields.next() == Some("bpf")
    }))
}

fn bpffs() -> anyhow::Result<()> {
    if bpffs_mounted()? {
        say("bpffs", format_args!("mounted at {BPFFS}"));
        return Ok(());
    }
    if !cmd::is_root() {
        bail!("not mounted at {BPFFS}, and mounting it needs root");
    }
    cmd::run(&mut cmd::new("mount", ["-t", "bpf", "bpf", BPFFS]))?;
    say("bpffs", format_args!("mounted at {BPFFS}"));
    Ok(())
}

/// `policy-rc.d` answering 101 ("action forbidden") while packages install,
/// so their services are not started; removed on drop. An existing policy is
/// left alone.
struct NoServiceStarts {
    path: Option<&'static Path>,
}

impl NoServiceStarts {
    const PATH: &'static str = "/usr/sbin/policy-rc.d";

    fn install() -> anyhow::Result<Self> {
        let path = Path::new(Self::PATH);
        if path.exists() {
            return Ok(Self { path: None });
        }
        fs::write(
            path,
            "#!/bin/sh\n# keyfence setup: no service starts while installing\nexit 101\n",
        )
        .with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
        Ok(Self { path: Some(path) })
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if let Some(path) = self.path {
            let _ = fs::remove_file(path);
        }
    }
}

fn installed(package: &str) -> bool {
    cmd::output(&mut cmd::new("dpkg", ["-s", package])).is_ok_and(|out| {
        out.lines()
            .any(|l| l.trim() == "Status: install ok installed")
    })
}

fn packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        let names: Vec<&str> = PACKAGES.iter().map(|(p, _)| *p).collect();
        say("packages", format_args!("installed: {}", names.join(", ")));
        return Ok(());
    }
    for (package, why) in PACKAGES.iter().filter(|(p, _)| missing.contains(p)) {
        say("packages", format_args!("{package} missing ({why})"));
    }
    if !cmd::is_root() {
        bail!("installing {} needs root", missing.join(", "));
    }
    cmd::run(cmd::new("apt-get", ["update"]).env("DEBIAN_FRONTEND", "noninteractive"))?;
    // The tests start nginx and HAProxy themselves, in their own namespaces;
    // the packages' services must not start on the host.
    let _no_services = NoServiceStarts::install()?;
    cmd::run(
        cmd::new("apt-get", ["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    let still: Vec<&str> = missing.iter().copied().filter(|p| !installed(p)).collect();
    if !still.is_empty() {
        bail!("still missing after apt-get install: {}", still.join(", "));
    }
    say("packages", format_args!("installed {}", missing.join(", ")));
    Ok(())
}
