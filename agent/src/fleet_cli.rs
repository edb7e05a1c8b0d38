//! `keyfence fleet status` (the hosts of a shared store, through the
//! management API's `GET /v1/fleet`) and `keyfence store copy` (a single
//! host's SQLite store into the fleet's PostgreSQL database: keys and audit,
//! idempotent, verified by counts and contents).

use std::{collections::HashMap, path::PathBuf};

use anyhow::{Context as _, anyhow, bail};
use serde_json::Value;

use crate::{
    config::{FleetConfig, PostgresConfig, PostgresUrl},
    store::{AuditEntry, KeyStore as _, postgres::PgStore, sqlite::SqliteStore},
};

/// `keyfence fleet …`: its exit code.
#[must_use]
pub fn run_fleet(cmd: crate::cli::FleetCommand) -> std::process::ExitCode {
    let crate::cli::FleetCommand::Status { api, json } = cmd;
    match status(&api, json) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("keyfence fleet status: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `keyfence store …`: its exit code.
#[must_use]
pub fn run_store(cmd: crate::cli::StoreCommand) -> std::process::ExitCode {
    let crate::cli::StoreCommand::Copy { from, to, ca_file } = cmd;
    match copy(&from, &to, ca_file) {
        Ok(r) => {
            println!(
                "copied {} of {} keys and {} of {} audit rows; verified: every key and row is in the database",
                r.new_keys, r.keys, r.new_audit_rows, r.audit_rows
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keyfence store copy: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `keyfence fleet status`: exit 0 with every live host current, 1 otherwise.
pub fn status(api: &str, json: bool) -> anyhow::Result<u8> {
    let token = std::env::var("KEYFENCE_TOKEN")
        .map_err(|_| anyhow!("KEYFENCE_TOKEN is not set: export the management token"))?;
    let answer = crate::keys_cli::call(api, &token, "GET", "/v1/fleet", None, None)?;
    if answer.status != 200 {
        bail!("{}", crate::keys_cli::render_error(&answer));
    }
    let body = answer.body;
    if json {
        println!("{body:#}");
    }
    let head = body["head_sequence"].as_i64().unwrap_or(0);
    let hosts = body["hosts"].as_array().cloned().unwrap_or_default();
    let behind = hosts
        .iter()
        .filter(|h| h["live"] == Value::Bool(true))
        .filter(|h| h["applied_sequence"].as_i64().unwrap_or(0) < head)
        .count();
    if !json {
        println!(
            "store {} · head sequence {head} · asked host {}",
            if body["store_up"] == Value::Bool(true) {
                "up"
            } else {
                "UNREACHABLE"
            },
            body["host_id"].as_str().unwrap_or("?")
        );
        println!(
            "{:<24} {:<10} {:>10} {:>9} {:>6}  LAST HEARTBEAT",
            "HOST", "VERSION", "APPLIED", "LAG (s)", "LIVE"
        );
        for h in &hosts {
            println!(
                "{:<24} {:<10} {:>10} {:>9.3} {:>6}  {} ({:.1} s ago)",
                h["host_id"].as_str().unwrap_or("?"),
                h["version"].as_str().unwrap_or("?"),
                h["applied_sequence"].as_i64().unwrap_or(0),
                h["lag_seconds"].as_f64().unwrap_or(0.0),
                if h["live"] == Value::Bool(true) {
                    "yes"
                } else {
                    "no"
                },
                h["last_heartbeat"].as_str().unwrap_or("?"),
                h["heartbeat_age_seconds"].as_f64().unwrap_or(0.0),
            );
        }
        if behind > 0 {
            println!(
                "{behind} live host(s) behind the head: see docs/fleet.md, \"a lagging host\""
            );
        }
    }
    Ok(u8::from(behind > 0))
}

/// What `store copy` did.
#[derive(Debug, PartialEq, Eq)]
pub struct CopyReport {
    pub keys: usize,
    pub audit_rows: usize,
    pub new_keys: u64,
    pub new_audit_rows: u64,
}

/// `--from sqlite:PATH`.
fn sqlite_path(from: &str) -> anyhow::Result<PathBuf> {
    from.strip_prefix("sqlite:")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("--from {from:?}: expected sqlite:PATH"))
}

/// `--to postgres:URL` (or the URL itself, `postgres://…`).
fn postgres_url(to: &str) -> anyhow::Result<String> {
    let url = if to.starts_with("postgres://") || to.starts_with("postgresql://") {
        to
    } else {
        to.strip_prefix("postgres:")
            .ok_or_else(|| anyhow!("--to {to:?}: expected postgres:URL"))?
    };
    url.parse::<tokio_postgres::Config>()
        .map_err(|e| anyhow!("--to: not a PostgreSQL URL: {e}"))?;
    Ok(url.to_owned())
}

/// `keyfence store copy`: read every key and audit row of the SQLite file,
/// insert what the database lacks (keeping ids and sequence numbers), then
/// read the database back and check that every key and row is there as in
/// the file. Running it again copies nothing and verifies again.
pub fn copy(from: &str, to: &str, ca_file: Option<PathBuf>) -> anyhow::Result<CopyReport> {
    let path = sqlite_path(from)?;
    if !path.is_file() {
        bail!("--from: {} does not exist", path.display());
    }
    let url = postgres_url(to)?;
    let mut source = SqliteStore::open(&path)
        .with_context(|| format!("opening the SQLite store {}", path.display()))?;
    let keys = source.snapshot()?.keys;
    let mut audit: Vec<AuditEntry> = Vec::new();
    loop {
        let after = audit.last().map_or(0, |e| e.seq);
        let page = source.audit(after, 1000, None)?;
        if page.is_empty() {
            break;
        }
        audit.extend(page);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let config = PostgresConfig {
            url: PostgresUrl::Inline(url),
            ca_file,
            host_id: "keyfence-store-copy".into(),
        };
        let target = PgStore::open(&config, &FleetConfig::default())
            .await
            .context("opening the PostgreSQL store")?;
        let (new_keys, new_audit_rows) = target.import(&keys, &audit).await?;
        verify(&target, &keys, &audit).await?;
        Ok(CopyReport {
            keys: keys.len(),
            audit_rows: audit.len(),
            new_keys,
            new_audit_rows,
        })
    })
}

/// Every source key in the database as in the file (secret digest, list,
/// revocation), every audit row at its number with its key and action.
async fn verify(
    target: &PgStore,
    keys: &[crate::store::StoredKey],
    audit: &[AuditEntry],
) -> anyhow::Result<()> {
    let there: HashMap<String, crate::store::StoredKey> = target
        .snapshot()
        .await?
        .keys
        .into_iter()
        .map(|k| (k.id.clone(), k))
        .collect();
    for k in keys {
        let Some(t) = there.get(&k.id) else {
            bail!("verification failed: key {} is not in the database", k.id);
        };
        if t.digest != k.digest || t.allow != k.allow || t.revoked_at != k.revoked_at {
            bail!(
                "verification failed: key {} differs in the database (another store's key of the same id?)",
                k.id
            );
        }
    }
    let mut rows: HashMap<i64, AuditEntry> = HashMap::new();
    let mut after = 0;
    loop {
        let page = target.audit(after, 1000, None).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        rows.extend(page.into_iter().map(|e| (e.seq, e)));
    }
    for e in audit {
        match rows.get(&e.seq) {
            Some(t) if t.key_id == e.key_id && t.action == e.action => {}
            Some(_) => bail!(
                "verification failed: audit row {} in the database is another change: the database already had its own history",
                e.seq
            ),
            None => bail!(
                "verification failed: audit row {} is not in the database",
                e.seq
            ),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_arguments() {
        assert_eq!(
            sqlite_path("sqlite:/var/lib/k.db").unwrap(),
            PathBuf::from("/var/lib/k.db")
        );
        assert!(sqlite_path("/var/lib/k.db").is_err());
        assert!(sqlite_path("sqlite:").is_err());
        assert_eq!(
            postgres_url("postgres:postgres://u@h/d").unwrap(),
            "postgres://u@h/d"
        );
        assert_eq!(
            postgres_url("postgres://u@h/d").unwrap(),
            "postgres://u@h/d"
        );
        assert!(postgres_url("mysql://u@h/d").is_err());
    }
}
