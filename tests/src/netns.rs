//! Hosts for the privileged end-to-end tests: network namespaces, veth pairs, a
//! TCP client that connects from a chosen source address, a counting TCP server,
//! and a guard around the real `keyfence` binary. Every guard cleans up on drop,
//! also when a test panics. The topology is drawn in `tests/README.md`.
//!
//! Threads enter a namespace with `setns(CLONE_NEWNET)`, which affects only the
//! calling thread, so each helper does its network work on a thread of its own.
//! Processes enter with `nsenter --net` rather than `ip netns exec`: the latter
//! also remounts `/sys` in a fresh mount namespace, which hides the host's bpffs
//! at `/sys/fs/bpf`, where the agent's pins must live to outlive it.

use std::{
    collections::{BTreeMap, HashMap},
    ffi::OsStr,
    fs::{self, File},
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use ipnet::IpNet;
use nix::{
    sched::CloneFlags,
    sys::signal::{self, Signal},
    unistd::Pid,
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Interface name of the client's end of the lab's veth pair.
pub const CLIENT_IF: &str = "client0";
/// Interface name of the gateway's end; the agent attaches here.
pub const GATEWAY_IF: &str = "gw0";
/// The gateway's IPv4 address (documentation range, RFC 5737).
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The gateway's IPv6 address (documentation range, RFC 3849).
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// Where the agent serves `/metrics` and `/readyz` inside the gateway namespace.
pub const METRICS_BIND: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9901);

/// Makes names unique within this process (the pid makes them unique across).
static SEQUENCE: AtomicU32 = AtomicU32::new(0);

pub fn unique(prefix: &str) -> String {
    let n = SEQUENCE.fetch_add(1, Ordering::SeqCst);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// Run and capture stdout; error (with stderr) unless it exits 0.
fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace named `kf-<role>-<pid>-<n>`, deleted on drop. Its
/// loopback is up and IPv6 duplicate address detection is off.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(role: &str) -> anyhow::Result<Self> {
        let name = unique(&format!("kf-{role}"));
        output(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        ns.exec(&[
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ])?;
        Ok(ns)
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, the handle `setns` and `nsenter` take.
    #[must_use]
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Run a command inside (`ip netns exec`) and return its stdout.
    pub fn exec(&self, argv: &[&str]) -> anyhow::Result<String> {
        output(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(argv),
        )
    }

    /// `ip -n <name> ARGS…`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        output(Command::new("ip").args(["-n", &self.name]).args(args)).map(drop)
    }

    /// A [`Command`] that runs `program` inside this namespace (`nsenter --net`);
    /// add arguments, environment and stdio, then spawn it.
    #[must_use]
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Spawn `cmd` (its program, arguments, environment and working directory)
    /// inside this namespace. stdin is null; stdout and stderr are inherited.
    /// Use [`Netns::command`] to choose stdio.
    pub fn spawn_in(&self, cmd: &Command) -> io::Result<Child> {
        let mut inside = self.command(cmd.get_program());
        inside.args(cmd.get_args());
        for (key, value) in cmd.get_envs() {
            match value {
                Some(value) => inside.env(key, value),
                None => inside.env_remove(key),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            inside.current_dir(dir);
        }
        inside.stdin(Stdio::null()).spawn()
    }

    /// Run `f` on a new thread that has entered this namespace; wait for it.
    pub fn run<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let path = self.path();
        thread::spawn(move || -> anyhow::Result<T> {
            enter(&path)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow!("a thread in the namespace panicked"))?
    }

    /// `GET path` to `addr` from inside this namespace: `(status, body)`.
    pub fn http_get(&self, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
        let path = path.to_owned();
        self.run(move || crate::http::get(addr, &path))?
    }
}

impl Drop for Netns {
    /// Every process started inside must have ended by now (the guards stop
    /// them the way each wants): one still inside would keep the namespace
    /// alive after `ip netns del` and burn CPU into the next run. Such
    /// processes get a short grace, then SIGKILL, and the test fails.
    fn drop(&mut self) {
        let left = self.processes_left();
        if let Err(e) = output(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("netns: could not remove {}: {e:#}", self.name);
        }
        if !left.is_empty() {
            let message = format!(
                "netns {}: processes left behind (killed now): {}",
                self.name,
                left.join("; ")
            );
            if thread::panicking() {
                eprintln!("{message}");
            } else {
                panic!("{message}");
            }
        }
    }
}

impl Netns {
    /// The processes (other than this one) inside the namespace, after up to
    /// 2 s for those that are exiting; each is killed (`SIGKILL`) and reaped by
    /// whoever is its parent. `pid (comm)` for the message.
    fn processes_left(&self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let inside = processes_in(&self.path());
            if inside.is_empty() {
                return Vec::new();
            }
            if Instant::now() > deadline {
                return inside
                    .into_iter()
                    .map(|(pid, comm)| {
                        let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                        format!("{pid} ({comm})")
                    })
                    .collect();
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `(pid, comm)` of every process but this one whose network namespace is
/// the one at `ns` (compared by the nsfs inode).
#[must_use]
pub fn processes_in(ns: &Path) -> Vec<(i32, String)> {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(target) = fs::metadata(ns) else {
        return Vec::new();
    };
    let me = i32::try_from(std::process::id()).unwrap_or(0);
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| m.ino() == target.ino() && m.dev() == target.dev())
        })
        .map(|pid| {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            (pid, comm.trim().to_owned())
        })
        .collect()
}

/// Free-function forms of [`Netns::exec`] and [`Netns::spawn_in`].
pub fn exec(ns: &Netns, argv: &[&str]) -> anyhow::Result<String> {
    ns.exec(argv)
}

/// See [`Netns::spawn_in`].
pub fn spawn_in(ns: &Netns, cmd: &Command) -> io::Result<Child> {
    ns.spawn_in(cmd)
}

/// Enter the network namespace at `path` (this thread only).
pub fn enter(path: &Path) -> anyhow::Result<()> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering {}", path.display()))
}

/// `addr` as a host route prefix (`/32` or `/128`).
#[must_use]
pub fn host(addr: IpAddr) -> IpNet {
    IpNet::from(addr)
}

/// A veth pair `a_if` (in `a`) ↔ `b_if` (in `b`) with the given addresses
/// (IPv6 ones `nodad`, usable at once), both ends up, and an on-link default
/// route for each family on both sides, so any address on one end reaches any
/// address on the other without further routes.
pub fn veth(
    a: &Netns,
    a_if: &str,
    a_addrs: &[IpNet],
    b: &Netns,
    b_if: &str,
    b_addrs: &[IpNet],
) -> anyhow::Result<()> {
    a.ip(&[
        "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ])?;
    for (ns, ifname, addrs) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
        for addr in addrs {
            let addr = addr.to_string();
            let mut args = vec!["addr", "add", &addr, "dev", ifname];
            if addr.contains(':') {
                args.push("nodad");
            }
            ns.ip(&args)?;
        }
        ns.ip(&["link", "set", ifname, "up"])?;
        ns.ip(&["-4", "route", "add", "default", "dev", ifname])?;
        ns.ip(&["-6", "route", "add", "default", "dev", ifname])?;
    }
    Ok(())
}

/// The standard topology: a client host holding `client_addrs` and a gateway
/// host ([`GATEWAY_V4`], [`GATEWAY_V6`]) joined by a veth pair
/// [`CLIENT_IF`] ↔ [`GATEWAY_IF`]. Field order is drop order: the gateway
/// goes first.
#[derive(Debug)]
pub struct Lab {
    pub gateway: Netns,
    pub client: Netns,
}

impl Lab {
    pub fn new(client_addrs: &[IpAddr]) -> anyhow::Result<Self> {
        Self::build("client", "gw", client_addrs)
    }

    /// [`Lab::new`] with the namespaces named `kf-<prefix>-client-…` and
    /// `kf-<prefix>-gw-…` (the demo's are `kf-demo-…`).
    pub fn named(prefix: &str, client_addrs: &[IpAddr]) -> anyhow::Result<Self> {
        Self::build(
            &format!("{prefix}-client"),
            &format!("{prefix}-gw"),
            client_addrs,
        )
    }

    fn build(
        client_role: &str,
        gateway_role: &str,
        client_addrs: &[IpAddr],
    ) -> anyhow::Result<Self> {
        let client = Netns::new(client_role)?;
        let gateway = Netns::new(gateway_role)?;
        let client_nets: Vec<IpNet> = client_addrs.iter().copied().map(host).collect();
        let gateway_nets = [host(GATEWAY_V4.into()), host(GATEWAY_V6.into())];
        veth(
            &client,
            CLIENT_IF,
            &client_nets,
            &gateway,
            GATEWAY_IF,
            &gateway_nets,
        )?;
        Ok(Self { gateway, client })
    }

    /// The gateway's address of `source`'s family, at `port`.
    #[must_use]
    pub fn gateway_addr(source: IpAddr, port: u16) -> SocketAddr {
        match source {
            IpAddr::V4(_) => SocketAddr::new(GATEWAY_V4.into(), port),
            IpAddr::V6(_) => SocketAddr::new(GATEWAY_V6.into(), port),
        }
    }
}

/// What became of one TCP connection attempt.
#[derive(Debug)]
pub enum Connect {
    /// The handshake completed; the server's greeting (empty if none came).
    Completed(String),
    /// No answer within the timeout: the SYN (or its answer) was dropped.
    TimedOut,
    /// A RST came back.
    Refused,
    /// The handshake completed, then a RST came before `connect` returned:
    /// a listener closed (its process killed) with the connection still in
    /// its accept queue. Like `Refused`, the SYN was answered, not dropped.
    Reset,
    Error(io::Error),
}

impl Connect {
    #[must_use]
    pub fn completed(&self) -> bool {
        matches!(self, Connect::Completed(_))
    }

    /// A RST answered the SYN, before or just after the handshake.
    #[must_use]
    pub fn reset(&self) -> bool {
        matches!(self, Connect::Refused | Connect::Reset)
    }

    #[must_use]
    pub fn timed_out(&self) -> bool {
        matches!(self, Connect::TimedOut)
    }
}

/// Connect from `source` to `dest` inside `ns`, giving up after `timeout`.
#[must_use]
pub fn tcp_connect(ns: &Netns, source: IpAddr, dest: SocketAddr, timeout: Duration) -> Connect {
    match ns.run(move || connect_here(source, dest, timeout)) {
        Ok(outcome) => outcome,
        Err(e) => Connect::Error(io::Error::other(format!("{e:#}"))),
    }
}

/// A TCP connection from `source` (any port) to `dest`, giving up after
/// `timeout`. Call it on a thread inside the namespace (see [`Netns::run`],
/// [`enter`]).
pub fn connect_from(source: IpAddr, dest: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(dest), Type::STREAM, Some(Protocol::TCP))?;
    socket.bind(&SockAddr::from(SocketAddr::new(source, 0)))?;
    socket.connect_timeout(&SockAddr::from(dest), timeout)?;
    Ok(TcpStream::from(socket))
}

fn connect_here(source: IpAddr, dest: SocketAddr, timeout: Duration) -> Connect {
    match connect_from(source, dest, timeout) {
        Ok(mut stream) => {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
            // Half-close: a greeting server still greets, an HTTP server (the
            // shim) sees the end of a request-less connection and closes it.
            let _ = stream.shutdown(std::net::Shutdown::Write);
            let mut greeting = String::new();
            let _ = stream.read_to_string(&mut greeting);
            Connect::Completed(greeting)
        }
        Err(e) if e.kind() == io::ErrorKind::TimedOut => Connect::TimedOut,
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Connect::Refused,
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Connect::Reset,
        Err(e) => Connect::Error(e),
    }
}

/// A TCP server inside a namespace that greets every connection with
/// `kf-test-server <port>\n` and closes it, counting accepted connections per
/// client address (IPv4-mapped peers folded to IPv4). Stops on drop.
pub struct TcpServer {
    port: u16,
    stop: Arc<AtomicBool>,
    accepted: Arc<Mutex<HashMap<IpAddr, u64>>>,
    thread: Option<JoinHandle<()>>,
}

impl TcpServer {
    /// Listen on `bind` inside `ns`; `[::]:PORT` is dual-stack.
    pub fn start(ns: &Netns, bind: SocketAddr) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(Mutex::new(HashMap::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let path = ns.path();
        let (stop_flag, counts) = (Arc::clone(&stop), Arc::clone(&accepted));
        let thread = thread::spawn(move || {
            let listener = match enter(&path).and_then(|()| listen(bind)) {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            serve(&listener, bind.port(), &stop_flag, &counts);
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("the test server did not start")??;
        Ok(Self {
            port: bind.port(),
            stop,
            accepted,
            thread: Some(thread),
        })
    }

    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections accepted from `client` so far.
    #[must_use]
    pub fn accepted_from(&self, client: IpAddr) -> u64 {
        let counts = self
            .accepted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        counts.get(&client.to_canonical()).copied().unwrap_or(0)
    }

    /// Connections accepted so far, from anyone.
    #[must_use]
    pub fn accepted(&self) -> u64 {
        let counts = self
            .accepted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        counts.values().sum()
    }
}

fn listen(bind: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(bind), Type::STREAM, Some(Protocol::TCP))?;
    if bind.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket
        .bind(&SockAddr::from(bind))
        .with_context(|| format!("binding {bind}"))?;
    socket.listen(256)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

fn serve(
    listener: &std::net::TcpListener,
    port: u16,
    stop: &AtomicBool,
    counts: &Mutex<HashMap<IpAddr, u64>>,
) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((mut stream, peer)) => {
                {
                    let mut counts = counts
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    *counts.entry(peer.ip().to_canonical()).or_default() += 1;
                }
                let _ = stream.set_nonblocking(false);
                let _ = writeln!(stream, "kf-test-server {port}");
            }
            Err(_) => thread::sleep(Duration::from_millis(2)),
        }
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One sample of a Prometheus text exposition: `name{labels} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    #[must_use]
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }
}

/// The samples of metric `name` in a Prometheus text exposition. Label values
/// are taken verbatim up to the closing quote (keyfence's contain no escapes).
#[must_use]
pub fn parse_samples(text: &str, name: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labels, value) = if let Some(inner) = rest.strip_prefix('{') {
            let Some((labels, value)) = inner.split_once('}') else {
                continue;
            };
            (labels, value)
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue;
        };
        let Some(value) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        let mut map = BTreeMap::new();
        let mut rest = labels;
        while let Some((key, after)) = rest.split_once("=\"") {
            let Some((val, after)) = after.split_once('"') else {
                break;
            };
            map.insert(
                key.trim_start_matches(',').trim().to_owned(),
                val.to_owned(),
            );
            rest = after;
        }
        samples.push(Sample {
            name: name.to_owned(),
            labels: map,
            value,
        });
    }
    samples
}

/// The `keyfence` binary the tests run: `$KEYFENCE_BIN`, else `keyfence` next to
/// this test's profile directory (`target/<profile>/keyfence`). `cargo xtask test`
/// builds it first (`cargo build -p keyfence`) and sets `KEYFENCE_BIN`.
pub fn keyfence_bin() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("KEYFENCE_BIN") {
        return Ok(bin.into());
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("unexpected test binary location {}", exe.display()))?;
    let bin = profile_dir.join("keyfence");
    if !bin.is_file() {
        bail!(
            "{} not found: build it first (`cargo build -p keyfence`; `cargo xtask test` \
             does) or point KEYFENCE_BIN at it",
            bin.display()
        );
    }
    Ok(bin)
}

/// The real agent, run inside a namespace with its own config file, pin path
/// (`/sys/fs/bpf/kf-e2e-<pid>-<n>`) and temporary directory. On drop it is
/// killed, `keyfence detach --config` runs, and the pins and files are removed;
/// if the test is failing, its log is printed first.
pub struct Agent {
    bin: PathBuf,
    netns: PathBuf,
    dir: PathBuf,
    config: PathBuf,
    pin_path: PathBuf,
    log: PathBuf,
    metrics: SocketAddr,
    envs: Vec<(String, String)>,
    /// Extra arguments after `run --config FILE`.
    run_args: Vec<String>,
    /// A command the agent runs under (`prlimit --nofile=256 --`), if any.
    wrapper: Vec<String>,
    child: Option<Child>,
    starts: u32,
}

impl Agent {
    /// Prepare (nothing runs yet): temporary directory, pin path, binary.
    pub fn new(ns: &Netns) -> anyhow::Result<Self> {
        Self::named(ns, "kf-e2e")
    }

    /// [`Agent::new`] with its directory and pin path named
    /// `<prefix>-<pid>-<n>` (the demo's are `kf-demo-…`).
    pub fn named(ns: &Netns, prefix: &str) -> anyhow::Result<Self> {
        let bin = keyfence_bin()?;
        let id = unique(prefix);
        let dir = std::env::temp_dir().join(&id);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            bin,
            netns: ns.path(),
            config: dir.join("keyfence.yaml"),
            log: dir.join("keyfence.log"),
            dir,
            pin_path: Path::new("/sys/fs/bpf").join(id),
            metrics: METRICS_BIND,
            envs: Vec::new(),
            run_args: Vec::new(),
            wrapper: Vec::new(),
            child: None,
            starts: 0,
        })
    }

    /// Write the config that `config(pin_path)` returns, start the agent and wait
    /// until `/readyz` answers 200.
    pub fn start(
        ns: &Netns,
        envs: &[(&str, &str)],
        config: impl FnOnce(&Path) -> String,
    ) -> anyhow::Result<Self> {
        let mut agent = Self::new(ns)?;
        for (k, v) in envs {
            agent.env(k, v);
        }
        agent.launch(&config(&agent.pin_path))?;
        Ok(agent)
    }

    /// Write `yaml` as the config, start the agent and wait (up to 30 s) until
    /// `/readyz` answers 200.
    pub fn launch(&mut self, yaml: &str) -> anyhow::Result<()> {
        self.write_config(yaml)?;
        self.spawn()?;
        self.wait_ready(ready_timeout())
    }

    /// Add an argument to `keyfence run` for the agent's next start.
    pub fn run_arg(&mut self, arg: &str) -> &mut Self {
        self.run_args.push(arg.to_owned());
        self
    }

    /// Run the agent under `argv` from its next start on, for example
    /// `["prlimit", "--nofile=256", "--"]`. The wrapper must exec the agent
    /// (so that [`Agent::pid`] stays the agent's own).
    pub fn wrap(&mut self, argv: &[&str]) -> &mut Self {
        self.wrapper = argv.iter().map(|&a| a.to_owned()).collect();
        self
    }

    /// Set an environment variable for the agent's next start.
    pub fn env(&mut self, key: &str, value: &str) -> &mut Self {
        self.envs.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Where `/metrics` and `/readyz` are served (inside the namespace).
    pub fn set_metrics_bind(&mut self, bind: SocketAddr) {
        self.metrics = bind;
    }

    #[must_use]
    pub fn pin_path(&self) -> &Path {
        &self.pin_path
    }

    /// The agent's temporary directory (config, log; tests may add files).
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    #[must_use]
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The key store's file (in the agent's directory).
    #[must_use]
    pub fn store_path(&self) -> PathBuf {
        self.dir.join("keyfence.db")
    }

    /// `yaml` with a `store` section pointing into the agent's directory
    /// unless it names one: tests never touch `/var/lib/keyfence`.
    fn with_store(&self, yaml: &str) -> String {
        if yaml.lines().any(|l| l.starts_with("store:")) {
            return yaml.to_owned();
        }
        format!("store:\n  path: {}\n{yaml}", self.store_path().display())
    }

    /// Replace the config file's contents in place (truncate and write).
    pub fn write_config(&self, yaml: &str) -> anyhow::Result<()> {
        fs::write(&self.config, self.with_store(yaml))
            .with_context(|| format!("writing {}", self.config.display()))
    }

    /// Replace the config file atomically (write a sibling, rename it over), as
    /// editors and configuration managers do.
    pub fn replace_config(&self, yaml: &str) -> anyhow::Result<()> {
        let tmp = self.dir.join(".keyfence.yaml.new");
        fs::write(&tmp, self.with_store(yaml))?;
        fs::rename(&tmp, &self.config)
            .with_context(|| format!("renaming over {}", self.config.display()))
    }

    /// Start `keyfence run --config FILE` inside the namespace; stderr (the log)
    /// is appended to the agent's log file.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            bail!("the agent is already running");
        }
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        self.starts += 1;
        writeln!(log, "=== keyfence start #{} ===", self.starts)?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns.display()))
            .arg("--")
            .args(&self.wrapper)
            .arg(&self.bin)
            .args(["run", "--config"])
            .arg(&self.config)
            .args(&self.run_args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Wait until `/readyz` answers 200; fail early if the agent exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited()? {
                bail!(
                    "keyfence exited ({status}) before it was ready; log:\n{}",
                    self.log()
                );
            }
            let last = self.get("/readyz");
            if matches!(last, Ok((200, _))) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "keyfence not ready after {timeout:?} (last /readyz: {last:?}); log:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The exit status, if the agent has exited.
    pub fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => bail!("the agent was never started"),
        }
    }

    #[must_use]
    pub fn is_running(&mut self) -> bool {
        matches!(self.exited(), Ok(None))
    }

    /// The running agent's pid (`nsenter` execs it, so it is the agent's own).
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn signal(&self, sig: Signal) -> anyhow::Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| anyhow!("the agent is not running"))?;
        let pid = Pid::from_raw(i32::try_from(pid)?);
        signal::kill(pid, sig).with_context(|| format!("sending {sig} to keyfence"))
    }

    /// Ask for a reload.
    pub fn sighup(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGHUP)
    }

    /// SIGTERM and wait (up to 10 s) for the agent to exit.
    pub fn sigterm(&mut self) -> anyhow::Result<ExitStatus> {
        self.signal(Signal::SIGTERM)?;
        self.wait_exit(Duration::from_secs(10))
    }

    /// SIGKILL and reap: the agent gets no chance to clean up.
    pub fn sigkill(&mut self) -> anyhow::Result<ExitStatus> {
        self.signal(Signal::SIGKILL)?;
        self.wait_exit(Duration::from_secs(10))
    }

    fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("keyfence did not exit within {timeout:?}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM (SIGKILL if that does not work), start again, wait until ready.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.is_running() && self.sigterm().is_err() {
            self.sigkill()?;
        }
        self.child = None;
        self.spawn()?;
        self.wait_ready(ready_timeout())
    }

    /// `GET path` on the agent's metrics bind, from inside its namespace.
    pub fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let (addr, path, netns) = (self.metrics, path.to_owned(), self.netns.clone());
        thread::spawn(move || -> anyhow::Result<(u16, String)> {
            enter(&netns)?;
            crate::http::get(addr, &path)
        })
        .join()
        .map_err(|_| anyhow!("the metrics thread panicked"))?
    }

    /// The `/metrics` exposition text.
    pub fn metrics(&self) -> anyhow::Result<String> {
        match self.get("/metrics")? {
            (200, body) => Ok(body),
            (status, body) => bail!("/metrics answered {status}: {body}"),
        }
    }

    /// Every `keyfence_datapath_packets_total` sample.
    pub fn packets(&self) -> anyhow::Result<Vec<Sample>> {
        Ok(parse_samples(
            &self.metrics()?,
            "keyfence_datapath_packets_total",
        ))
    }

    /// `keyfence_datapath_packets_total` for `listener` and `reason`, summed over
    /// interfaces.
    pub fn packet_count(&self, listener: &str, reason: &str) -> anyhow::Result<u64> {
        let total: f64 = self
            .packets()?
            .iter()
            .filter(|s| s.label("listener") == Some(listener) && s.label("reason") == Some(reason))
            .map(|s| s.value)
            .sum();
        #[expect(
            clippy::cast_sign_loss,
            reason = "a counter is a non-negative integer below 2^53"
        )]
        Ok(total as u64)
    }

    /// `keyfence_http_requests_total` for `listener` and `outcome`.
    pub fn http_count(&self, listener: &str, outcome: &str) -> anyhow::Result<u64> {
        let total: f64 = parse_samples(&self.metrics()?, "keyfence_http_requests_total")
            .iter()
            .filter(|s| {
                s.label("listener") == Some(listener) && s.label("outcome") == Some(outcome)
            })
            .map(|s| s.value)
            .sum();
        #[expect(
            clippy::cast_sign_loss,
            reason = "a counter is a non-negative integer below 2^53"
        )]
        Ok(total as u64)
    }

    /// `(interface, mode)` of every `keyfence_datapath_attached` sample at 1.
    pub fn attached(&self) -> anyhow::Result<Vec<(String, String)>> {
        Ok(
            parse_samples(&self.metrics()?, "keyfence_datapath_attached")
                .into_iter()
                .filter(|s| (s.value - 1.0).abs() < f64::EPSILON)
                .map(|s| {
                    (
                        s.label("interface").unwrap_or_default().to_owned(),
                        s.label("mode").unwrap_or_default().to_owned(),
                    )
                })
                .collect(),
        )
    }

    /// `keyfence detach --config FILE` inside the namespace (the agent should
    /// have stopped): its report line. Drop runs it too; a second run finds
    /// nothing pinned.
    pub fn detach(&self) -> anyhow::Result<String> {
        self.subcommand("detach")
    }

    /// `keyfence status --config FILE` (`--json` when `json`) inside the
    /// namespace: its output.
    pub fn status(&self, json: bool) -> anyhow::Result<String> {
        if json {
            self.subcommand_args("status", &["--json"])
        } else {
            self.subcommand("status")
        }
    }

    /// `keyfence check --config FILE` with the agent's environment: its
    /// report line, or its errors.
    pub fn check(&self) -> anyhow::Result<String> {
        self.subcommand("check")
    }

    /// `keyfence SUBCOMMAND --config FILE` inside the namespace, with the
    /// agent's environment: stdout, or an error with stderr.
    fn subcommand(&self, subcommand: &str) -> anyhow::Result<String> {
        self.subcommand_args(subcommand, &[])
    }

    /// [`Self::subcommand`] with more arguments after `--config FILE`.
    fn subcommand_args(&self, subcommand: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.netns.display()))
            .arg("--")
            .arg(&self.bin)
            .args([subcommand, "--config"])
            .arg(&self.config)
            .args(args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run keyfence {subcommand}"))?;
        if !out.status.success() {
            bail!(
                "keyfence {subcommand} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// The agent's log file (stderr of every start).
    #[must_use]
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the agent logged so far (all starts).
    #[must_use]
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// [`Self::log`] without terminal colour sequences (the human log colours
    /// its fields), for tests that search it for `field=value`.
    #[must_use]
    pub fn plain_log(&self) -> String {
        strip_ansi(&self.log())
    }
}

/// `text` without ANSI CSI sequences (ESC `[` parameters, then a final letter).
#[must_use]
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            eprintln!(
                "--- keyfence log ({}) ---\n{}--- end of log ---",
                self.log.display(),
                self.log()
            );
        }
        if let Err(e) = self.detach() {
            eprintln!("agent: {e:#}");
        }
        if self.pin_path.exists()
            && let Err(e) = fs::remove_dir_all(&self.pin_path)
        {
            eprintln!("agent: could not remove {}: {e}", self.pin_path.display());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// How long a start may take to turn ready: 30 s, or `KEYFENCE_TEST_READY_SECS`
/// (the guest-kernel stage's emulated CPU starts the agent many times slower).
#[must_use]
pub fn ready_timeout() -> Duration {
    std::env::var("KEYFENCE_TEST_READY_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(30), Duration::from_secs)
}

/// Call `check` every `every` until it returns true or `timeout` passes.
pub fn poll_until(timeout: Duration, every: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    use super::parse_samples;

    #[test]
    fn parses_prometheus_samples() {
        let text = "# HELP keyfence_datapath_packets Packets\n\
            # TYPE keyfence_datapath_packets counter\n\
            keyfence_datapath_packets_total{interface=\"gw0\",listener=\"api\",verdict=\"drop\",reason=\"not_allowed\"} 12\n\
            keyfence_datapath_packets_total{interface=\"gw0\",listener=\"api\",verdict=\"pass\",reason=\"allowed_exact\"} 3\n\
            keyfence_datapath_packets_totalx 4\n\
            keyfence_keys 2\n";
        let samples = parse_samples(text, "keyfence_datapath_packets_total");
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].label("reason"), Some("not_allowed"));
        assert_eq!(samples[0].label("interface"), Some("gw0"));
        assert!((samples[0].value - 12.0).abs() < f64::EPSILON);
        assert!((parse_samples(text, "keyfence_keys")[0].value - 2.0).abs() < f64::EPSILON);
    }
}
