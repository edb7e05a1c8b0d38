//! Test certificates: a self-signed P-256 certificate from `openssl`, for the
//! TLS listeners and the console's management listener.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// A self-signed certificate and its key, written as `<dir>/<name>.crt` and
/// `<dir>/<name>.key`, valid two days for the addresses in `ips` (its
/// subjectAltName). Panics when openssl fails: a test cannot go on without it.
#[must_use]
pub fn self_signed(dir: &Path, name: &str, ips: &[&str]) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    let san = ips
        .iter()
        .map(|ip| format!("IP:{ip}"))
        .collect::<Vec<_>>()
        .join(",");
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "2", "-subj", &format!("/CN={name}")])
        .args(["-addext", &format!("subjectAltName={san}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("running openssl");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}
