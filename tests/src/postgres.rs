//! A real PostgreSQL server for the fleet tests and the demo: Debian's
//! `postgresql` binaries (`/usr/lib/postgresql/<major>/bin`), a cluster made
//! by `initdb` in a temporary directory owned by `nobody`, started and
//! stopped with `pg_ctl` as `nobody` inside a test namespace, listening only
//! on an address of that namespace (and a socket in its own directory). On
//! drop the server is stopped (immediate) and the directory removed.

use std::{
    fs,
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, anyhow, bail};

use crate::netns::Netns;

/// The unprivileged user the server runs as.
const USER: &str = "nobody";
/// The database and role the agents use (trust authentication, test only).
pub const DATABASE: &str = "keyfence";

/// The newest installed `/usr/lib/postgresql/<major>/bin`.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let mut majors: Vec<(u32, PathBuf)> = fs::read_dir(root)
        .with_context(|| {
            format!(
                "{} missing: install the postgresql package (`cargo xtask setup`)",
                root.display()
            )
        })?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").is_file().then_some((major, bin))
        })
        .collect();
    majors.sort();
    majors
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| anyhow!("no PostgreSQL server under {}", root.display()))
}

pub struct Postgres {
    bin: PathBuf,
    dir: PathBuf,
    data: PathBuf,
    netns: PathBuf,
    addr: SocketAddr,
    running: bool,
}

impl Postgres {
    /// `initdb` a cluster and start it in `ns`, listening on `addr` (which
    /// must be one of `ns`'s addresses); the database [`DATABASE`] exists.
    pub fn start(ns: &Netns, addr: SocketAddr) -> anyhow::Result<Self> {
        let bin = bin_dir()?;
        let id = crate::netns::unique("kf-pg");
        let dir = std::env::temp_dir().join(id);
        fs::create_dir_all(&dir)?;
        chown_nobody(&dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        let data = dir.join("data");
        let mut pg = Self {
            bin,
            data,
            dir,
            netns: ns.path(),
            addr,
            running: false,
        };
        pg.run_as_nobody(
            "initdb",
            &[
                "--auth=trust",
                "--username",
                DATABASE,
                "--encoding=UTF8",
                "--no-instructions",
                "-D",
            ],
            Some(&pg.data.clone()),
        )?;
        // Fleet settings the docs recommend, small enough for a test.
        let conf = format!(
            "listen_addresses = '{ip}'\nport = {port}\nunix_socket_directories = '{dir}'\n\
             max_connections = 100\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             logging_collector = off\nshared_buffers = 32MB\n",
            ip = addr.ip(),
            port = addr.port(),
            dir = pg.dir.display(),
        );
        fs::OpenOptions::new()
            .append(true)
            .open(pg.data.join("postgresql.conf"))?
            .write_all_str(&conf)?;
        // The agents connect over the namespace's network, as in production.
        fs::OpenOptions::new()
            .append(true)
            .open(pg.data.join("pg_hba.conf"))?
            .write_all_str(&format!(
                "host all all {}/24 trust\n",
                match addr.ip() {
                    std::net::IpAddr::V4(v4) => {
                        let o = v4.octets();
                        std::net::Ipv4Addr::new(o[0], o[1], o[2], 0).to_string()
                    }
                    std::net::IpAddr::V6(_) => "::".into(),
                }
            ))?;
        pg.resume()?;
        pg.run_as_nobody(
            "createdb",
            &[
                "-h",
                &pg.dir.display().to_string(),
                "-p",
                &addr.port().to_string(),
                "-U",
                DATABASE,
                DATABASE,
            ],
            None,
        )?;
        Ok(pg)
    }

    /// The URL the agents connect with.
    #[must_use]
    pub fn url(&self) -> String {
        format!(
            "postgres://{DATABASE}@{}:{}/{DATABASE}",
            self.addr.ip(),
            self.addr.port()
        )
    }

    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `pg_ctl stop -m fast`: the database goes away (its data stays).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        self.pg_ctl(&["stop", "-m", "fast", "-w"])?;
        self.running = false;
        Ok(())
    }

    /// `pg_ctl start -w` again after [`Postgres::stop`].
    pub fn resume(&mut self) -> anyhow::Result<()> {
        let log = self.dir.join("server.log");
        self.pg_ctl(&["start", "-w", "-t", "30", "-l", &log.display().to_string()])?;
        self.running = true;
        Ok(())
    }

    /// `psql -c SQL` as the agents' role; its output (unaligned, tuples only).
    pub fn sql(&self, sql: &str) -> anyhow::Result<String> {
        self.run_as_nobody(
            "psql",
            &[
                "-h",
                &self.dir.display().to_string(),
                "-p",
                &self.addr.port().to_string(),
                "-U",
                DATABASE,
                "-d",
                DATABASE,
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
            None,
        )
    }

    /// The server's log so far (printed by failing tests).
    #[must_use]
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    fn pg_ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all: Vec<&str> = args.to_vec();
        let data = self.data.display().to_string();
        all.extend(["-D", &data]);
        self.run_as_nobody("pg_ctl", &all, None)
    }

    /// `bin/<program> ARGS [PATH]` as `nobody` inside the namespace.
    fn run_as_nobody(
        &self,
        program: &str,
        args: &[&str],
        path: Option<&Path>,
    ) -> anyhow::Result<String> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns.display()))
            .args([
                "--",
                "setpriv",
                "--reuid",
                USER,
                "--regid",
                "nogroup",
                "--clear-groups",
                "--",
            ])
            .arg(self.bin.join(program))
            .args(args);
        if let Some(p) = path {
            cmd.arg(p);
        }
        let out = cmd
            .current_dir(&self.dir)
            .env("LC_ALL", "C.UTF-8")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} {args:?} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running
            && let Err(e) = self.pg_ctl(&["stop", "-m", "immediate", "-w"])
        {
            eprintln!("postgres: stopping the test server: {e:#}");
            eprintln!("{}", self.log());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn chown_nobody(path: &Path) -> anyhow::Result<()> {
    let user = nix::unistd::User::from_name(USER)?.ok_or_else(|| anyhow!("no user {USER}"))?;
    nix::unistd::chown(path, Some(user.uid), Some(user.gid))
        .with_context(|| format!("chown {USER} {}", path.display()))
}

trait WriteStr {
    fn write_all_str(&mut self, s: &str) -> std::io::Result<()>;
}

impl WriteStr for fs::File {
    fn write_all_str(&mut self, s: &str) -> std::io::Result<()> {
        std::io::Write::write_all(self, s.as_bytes())
    }
}

/// Join each gateway to `db` through a bridge: `br0` 198.51.100.1/24 in
/// `db`, and in gateway `i` an interface `dbl` with 198.51.100.(11 + i)/24
/// (on-link, no default route: each gateway keeps its own).
pub fn bridge(db: &Netns, gateways: &[&Netns]) -> anyhow::Result<()> {
    db.ip(&["link", "add", "br0", "type", "bridge"])?;
    db.ip(&["addr", "add", "198.51.100.1/24", "dev", "br0"])?;
    db.ip(&["link", "set", "br0", "up"])?;
    for (i, gw) in gateways.iter().enumerate() {
        let peer = format!("h{i}");
        gw.ip(&[
            "link",
            "add",
            "dbl",
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            db.name(),
        ])?;
        gw.ip(&[
            "addr",
            "add",
            &format!("198.51.100.{}/24", 11 + i),
            "dev",
            "dbl",
        ])?;
        gw.ip(&["link", "set", "dbl", "up"])?;
        db.ip(&["link", "set", &peer, "master", "br0", "up"])?;
    }
    Ok(())
}
