//! HTTP peers for the shim's end-to-end tests: an echoing upstream, `curl` as
//! the client, and a guard for third-party daemons (nginx, HAProxy) run inside
//! a namespace.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::unix::{ffi::OsStringExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use nix::{
    sys::signal::{self, Signal},
    unistd::Pid,
};

use crate::netns::{Netns, connect_from, enter};

/// Largest request head the upstream reads.
const MAX_HEAD: usize = 64 * 1024;
/// Largest request body the upstream reads (above keyfence's 16 MiB limit,
/// so that the limit is keyfence's, not the upstream's).
const MAX_BODY: usize = 32 * 1024 * 1024;

/// An HTTP/1.1 upstream inside a namespace that answers every request with a
/// JSON echo of what reached it: `{"upstream":"echo","method","path","headers",
/// "body_bytes"}` (header names lower-case, repeated headers joined with `, `,
/// bytes that are not UTF-8 shown as U+FFFD). It reads a `Content-Length` or
/// chunked body whole before it answers, as an application would. A path
/// `/slow/MS` answers after MS milliseconds (at most 10 s). Keep-alive, one
/// thread per connection. Stops on drop.
pub struct Upstream {
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    pub fn start(ns: &Netns, bind: SocketAddr) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let path = ns.path();
        let (stop_flag, count) = (Arc::clone(&stop), Arc::clone(&requests));
        let thread = thread::spawn(move || {
            let bound = enter(&path).and_then(|()| {
                let l = TcpListener::bind(bind).with_context(|| format!("binding {bind}"))?;
                l.set_nonblocking(true)?;
                Ok(l)
            });
            let listener = match bound {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            while !stop_flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (stop, count) = (Arc::clone(&stop_flag), Arc::clone(&count));
                        thread::spawn(move || echo_connection(stream, &stop, &count));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("the upstream did not start")??;
        Ok(Self {
            stop,
            requests,
            thread: Some(thread),
        })
    }

    /// Requests answered so far.
    #[must_use]
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn echo_connection(stream: TcpStream, stop: &AtomicBool, count: &AtomicU64) {
    // Blocking reads without a timeout: a pooled keep-alive connection idles
    // until keyfence closes it (at the latest when the test's agent stops).
    let _ = stream.set_nonblocking(false);
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    while !stop.load(Ordering::SeqCst) {
        let Ok(Some(head)) = read_head(&mut reader) else {
            return;
        };
        let mut lines = head.lines();
        let request_line = lines.next().unwrap_or_default();
        let mut parts = request_line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        let mut headers: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in lines.filter_map(|l| l.split_once(':')) {
            headers
                .entry(name.trim().to_ascii_lowercase())
                .and_modify(|v| {
                    v.push_str(", ");
                    v.push_str(value.trim());
                })
                .or_insert_with(|| value.trim().to_owned());
        }
        let chunked = headers
            .get("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let body_bytes = if chunked {
            match read_chunked(&mut reader) {
                Ok(n) => n,
                Err(_) => return,
            }
        } else {
            let length: usize = headers
                .get("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if length > MAX_BODY {
                return;
            }
            if length > 0 {
                let mut body = vec![0; length];
                if reader.read_exact(&mut body).is_err() {
                    return;
                }
            }
            length
        };
        if let Some(ms) = path
            .strip_prefix("/slow/")
            .and_then(|ms| ms.parse::<u64>().ok())
        {
            thread::sleep(Duration::from_millis(ms.min(10_000)));
        }
        count.fetch_add(1, Ordering::SeqCst);
        let body = serde_json::json!({
            "upstream": "echo",
            "method": method,
            "path": path,
            "headers": headers,
            "body_bytes": body_bytes,
        })
        .to_string();
        let close = headers
            .get("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if writer.write_all(answer.as_bytes()).is_err() || close {
            return;
        }
    }
}

/// One request head, without its final empty line; `None` at a clean end.
/// Read as bytes (a header value may hold obs-text), shown lossily.
fn read_head(reader: &mut BufReader<TcpStream>) -> io::Result<Option<String>> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(None);
        }
        if line == b"\r\n" || line == b"\n" {
            if head.is_empty() {
                continue;
            }
            return Ok(Some(String::from_utf8_lossy(&head).into_owned()));
        }
        head.extend_from_slice(&line);
        if head.len() > MAX_HEAD {
            return Err(io::Error::other("request head too large"));
        }
    }
}

/// Read a chunked body to its end (trailers included): its length.
fn read_chunked(reader: &mut BufReader<TcpStream>) -> io::Result<usize> {
    let mut total = 0usize;
    loop {
        let mut line = Vec::new();
        if reader.read_until(b'\n', &mut line)? == 0 || line.len() > 1024 {
            return Err(io::Error::other("bad chunk size line"));
        }
        let text = String::from_utf8_lossy(&line);
        let size = text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16)
            .map_err(|_| io::Error::other(format!("bad chunk size {size:?}")))?;
        if size == 0 {
            // Trailers, up to the empty line.
            loop {
                let mut trailer = Vec::new();
                if reader.read_until(b'\n', &mut trailer)? == 0 {
                    return Err(io::Error::other("closed in the trailers"));
                }
                if trailer == b"\r\n" || trailer == b"\n" {
                    return Ok(total);
                }
            }
        }
        total = total.saturating_add(size);
        if total > MAX_BODY {
            return Err(io::Error::other("body too large"));
        }
        let mut chunk = vec![0; size + 2];
        reader.read_exact(&mut chunk)?;
    }
}

/// What one `curl` run met.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Answered {
        status: u16,
        body: String,
        /// `1.1` or `2`, from curl's `%{http_version}`.
        http_version: String,
    },
    /// curl gave up on connecting or on the answer: no handshake, for a
    /// dropped SYN.
    TimedOut,
    Failed(String),
}

impl Reply {
    #[must_use]
    pub fn status(&self) -> Option<u16> {
        match self {
            Reply::Answered { status, .. } => Some(*status),
            _ => None,
        }
    }

    #[must_use]
    pub fn body(&self) -> &str {
        match self {
            Reply::Answered { body, .. } => body,
            _ => "",
        }
    }

    /// The upstream's echo, when the request reached it.
    #[must_use]
    pub fn echo(&self) -> Option<serde_json::Value> {
        let value: serde_json::Value = serde_json::from_str(self.body()).ok()?;
        (value["upstream"] == "echo").then_some(value)
    }

    /// A header the upstream saw (lower-case name).
    #[must_use]
    pub fn upstream_header(&self, name: &str) -> Option<String> {
        self.echo()?["headers"][name].as_str().map(str::to_owned)
    }
}

/// A `curl` invocation from `source` inside `ns`.
pub struct Curl<'a> {
    ns: &'a Netns,
    source: IpAddr,
    url: String,
    args: Vec<OsString>,
    connect_timeout: Duration,
}

impl<'a> Curl<'a> {
    #[must_use]
    pub fn new(ns: &'a Netns, source: IpAddr, url: impl Into<String>) -> Self {
        Self {
            ns,
            source,
            url: url.into(),
            args: Vec::new(),
            connect_timeout: Duration::from_secs(2),
        }
    }

    /// `Authorization: Bearer SECRET`.
    #[must_use]
    pub fn bearer(self, secret: &str) -> Self {
        self.header(&format!("Authorization: Bearer {secret}"))
    }

    #[must_use]
    pub fn header(mut self, line: &str) -> Self {
        self.args.extend(["--header".into(), line.into()]);
        self
    }

    /// A header line given as raw bytes (obs-text, bytes that are not UTF-8).
    #[must_use]
    pub fn header_bytes(mut self, line: &[u8]) -> Self {
        self.args
            .extend(["--header".into(), OsString::from_vec(line.to_vec())]);
        self
    }

    #[must_use]
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.into());
        self
    }

    /// How long the handshake may take before the attempt counts as dropped.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Run it (at most the connect timeout plus five seconds).
    #[must_use]
    pub fn send(&self) -> Reply {
        let connect = format!("{:.3}", self.connect_timeout.as_secs_f64());
        let max = format!("{:.3}", self.connect_timeout.as_secs_f64() + 5.0);
        let out = self
            .ns
            .command("curl")
            .args(["--silent", "--show-error", "--globoff"])
            .args(["--interface", &self.source.to_string()])
            .args(["--connect-timeout", &connect, "--max-time", &max])
            .args(["--write-out", "\n%{http_code} %{http_version}"])
            .args(&self.args)
            .arg(&self.url)
            .stdin(Stdio::null())
            .output();
        let out = match out {
            Ok(out) => out,
            Err(e) => return Reply::Failed(format!("running curl: {e}")),
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        match out.status.code() {
            Some(0) => {
                let (body, trailer) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
                let mut t = trailer.split_whitespace();
                Reply::Answered {
                    status: t.next().and_then(|s| s.parse().ok()).unwrap_or(0),
                    http_version: t.next().unwrap_or_default().to_owned(),
                    body: body.to_owned(),
                }
            }
            Some(28) => Reply::TimedOut,
            _ => Reply::Failed(format!(
                "curl {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        }
    }
}

/// Connect from `source` inside `ns`, send `request` as is, and read until the
/// peer closes or `timeout` passes: `(answer, how long until the close)`. The
/// duration is `None` if the connection was still open at the timeout.
pub fn raw_exchange(
    ns: &Netns,
    source: IpAddr,
    dest: SocketAddr,
    request: Vec<u8>,
    timeout: Duration,
) -> anyhow::Result<(String, Option<Duration>)> {
    ns.run(move || -> anyhow::Result<(String, Option<Duration>)> {
        let mut stream = connect_from(source, dest, Duration::from_secs(2))?;
        let started = Instant::now();
        stream.write_all(&request)?;
        let mut answer = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Ok((String::from_utf8_lossy(&answer).into_owned(), None));
            }
            stream.set_read_timeout(Some(left))?;
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                // A reset is a close too.
                Err(_) => break,
            }
        }
        Ok((
            String::from_utf8_lossy(&answer).into_owned(),
            Some(started.elapsed()),
        ))
    })?
}

/// A single-threaded runtime for one client exchange on the calling thread
/// (which may have entered a namespace).
fn block_on<T>(exchange: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(exchange)
}

/// `GET path` to `addr` over HTTP/1.1 (`Connection: close`) from the calling
/// thread's namespace: `(status, body)`. The tests' one HTTP client besides
/// curl (the client under test) and [`h2_post`]; hyper decodes the body.
pub fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use http_body_util::BodyExt as _;

    block_on(async move {
        let stream =
            tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| anyhow!("connecting to {addr}: timed out"))?
                .with_context(|| format!("connecting to {addr}"))?;
        let exchange = async {
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let request = hyper::Request::get(path)
                .header(hyper::header::HOST, addr.to_string())
                .header(hyper::header::CONNECTION, "close")
                .body(http_body_util::Empty::<bytes::Bytes>::new())?;
            let response = sender.send_request(request).await?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
        };
        tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .map_err(|_| anyhow!("GET {path} from {addr}: no answer within 5 s"))?
    })
}

/// POST `total` bytes over HTTP/2 with prior knowledge (h2c) from `source`
/// inside `ns`, in 64 KiB frames: `(status, body)` of the answer. With
/// `announce` the length goes in `Content-Length`; without, the server only
/// learns the size as the body streams. `headers` are `(name, value)` pairs.
/// Bounded by `timeout`.
pub fn h2_post(
    ns: &Netns,
    source: IpAddr,
    dest: SocketAddr,
    headers: &[(&str, &str)],
    (total, announce): (usize, bool),
    timeout: Duration,
) -> anyhow::Result<(u16, String)> {
    use http_body_util::BodyExt as _;

    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect();
    ns.run(move || -> anyhow::Result<(u16, String)> {
        let stream = connect_from(source, dest, Duration::from_secs(2))?;
        stream.set_nonblocking(true)?;
        block_on(async move {
            let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::from_std(stream)?);
            let exchange = async {
                let mut sender = h2_handshake(io).await?;
                let mut request = hyper::Request::post(format!("http://{dest}/upload"));
                for (name, value) in &headers {
                    request = request.header(name, value);
                }
                let response = sender
                    .send_request(request.body(Generated {
                        left: total,
                        announce,
                    })?)
                    .await?;
                let status = response.status().as_u16();
                let body = response.into_body().collect().await?.to_bytes();
                anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
            };
            tokio::time::timeout(timeout, exchange)
                .await
                .map_err(|_| anyhow!("no HTTP/2 answer within {timeout:?}"))?
        })
    })?
}

/// `GET` each of `paths` over one HTTP/2 connection (prior knowledge) from
/// `source` inside `ns`, all at once as concurrent streams: `(status, body)`
/// of each answer, in `paths`' order. `headers` go on every request. Bounded
/// by `timeout`. (curl 7.88's `--parallel` fails every stream but the first
/// on a reused prior-knowledge connection, curl#10634.)
pub fn h2_get_concurrently(
    ns: &Netns,
    source: IpAddr,
    dest: SocketAddr,
    headers: &[(&str, &str)],
    paths: &[&str],
    timeout: Duration,
) -> anyhow::Result<Vec<(u16, String)>> {
    use http_body_util::BodyExt as _;

    let requests = paths
        .iter()
        .map(|path| {
            let mut request = hyper::Request::get(format!("http://{dest}{path}"));
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            Ok(request.body(http_body_util::Empty::<bytes::Bytes>::new())?)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    ns.run(move || -> anyhow::Result<Vec<(u16, String)>> {
        let stream = connect_from(source, dest, Duration::from_secs(2))?;
        stream.set_nonblocking(true)?;
        block_on(async move {
            let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::from_std(stream)?);
            let exchange = async {
                let sender = h2_handshake(io).await?;
                // All sent before any is awaited: in flight together.
                let streams: Vec<_> = requests
                    .into_iter()
                    .map(|request| {
                        let mut sender = sender.clone();
                        tokio::spawn(async move {
                            let response = sender.send_request(request).await?;
                            let status = response.status().as_u16();
                            let body = response.into_body().collect().await?.to_bytes();
                            anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
                        })
                    })
                    .collect();
                let mut answers = Vec::with_capacity(streams.len());
                for stream in streams {
                    answers.push(stream.await??);
                }
                anyhow::Ok(answers)
            };
            tokio::time::timeout(timeout, exchange)
                .await
                .map_err(|_| anyhow!("no HTTP/2 answers within {timeout:?}"))?
        })
    })?
}

/// The client side of an HTTP/2 connection on `io`, its protocol task
/// spawned on the current runtime.
async fn h2_handshake<B>(
    io: hyper_util::rt::TokioIo<tokio::net::TcpStream>,
) -> anyhow::Result<hyper::client::conn::http2::SendRequest<B>>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// A request body of `left` bytes in 64 KiB frames; its size hint is exact
/// (hyper sends `Content-Length`) only with `announce`.
struct Generated {
    left: usize,
    announce: bool,
}

impl hyper::body::Body for Generated {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if this.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = this.left.min(64 * 1024);
        this.left -= n;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(bytes::Bytes::from(
            vec![b'k'; n],
        )))))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        if self.announce {
            hyper::body::SizeHint::with_exact(self.left as u64)
        } else {
            hyper::body::SizeHint::default()
        }
    }
}

/// `http://ADDR:PORT` with IPv6 addresses bracketed.
#[must_use]
pub fn url(scheme: &str, addr: SocketAddr, path: &str) -> String {
    format!("{scheme}://{addr}{path}")
}

/// A third-party daemon (nginx, HAProxy) run in the foreground inside a
/// namespace, with its output in a log file. Stopped on drop (see
/// [`Daemon::stop`]).
pub struct Daemon {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Spawn `program args…` inside `ns`, then wait until `ready` (a TCP
    /// address inside `ns`) accepts connections.
    pub fn start(
        ns: &Netns,
        program: &str,
        args: &[&str],
        log: &Path,
        ready: SocketAddr,
    ) -> anyhow::Result<Self> {
        let log_file = std::fs::File::create(log)?;
        // Its own process group: the stop below can see (and, as the last
        // resort, kill) every worker the master forked.
        let child = ns
            .command(program)
            .args(args)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        let mut daemon = Self {
            name: program.to_owned(),
            child: Some(child),
            log: log.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(child) = daemon.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("{program} exited ({status}): {}", daemon.log());
            }
            let up =
                ns.run(move || TcpStream::connect_timeout(&ready, Duration::from_millis(200)))?;
            if up.is_ok() {
                return Ok(daemon);
            }
            if Instant::now() > deadline {
                bail!("{program} does not listen on {ready}: {}", daemon.log());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// nginx in `ns` with the config file `conf` (its error log and output
    /// under `dir`), once `ready` accepts.
    pub fn nginx(ns: &Netns, dir: &Path, conf: &Path, ready: SocketAddr) -> anyhow::Result<Self> {
        Self::start(
            ns,
            "nginx",
            &[
                "-c",
                &conf.to_string_lossy(),
                "-e",
                &dir.join("nginx-error.log").to_string_lossy(),
            ],
            &dir.join("nginx.out"),
            ready,
        )
    }

    /// Its output so far.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// How long a daemon may take to stop after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);

impl Daemon {
    /// Stop it the way nginx and HAProxy want: SIGTERM to the master, which
    /// stops its workers and waits for them, then reap the master and check
    /// that nothing of its process group is left. A master that does not
    /// exit in time, or workers that outlive it, are killed (`SIGKILL`) and the stop
    /// fails (SIGKILL to the master alone would leave its workers running).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = i32::try_from(child.id())?;
        let _ = signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        let mut exited = false;
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                exited = true;
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        // The group outlives the master only through stray workers.
        let group_alive = || signal::kill(Pid::from_raw(-pid), None).is_ok();
        let strays = exited && {
            let until = Instant::now() + Duration::from_secs(2);
            while group_alive() && Instant::now() < until {
                thread::sleep(Duration::from_millis(20));
            }
            group_alive()
        };
        if !exited || strays {
            let _ = signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = child.wait();
            bail!(
                "{} did not stop cleanly on SIGTERM ({}): killed; log: {}",
                self.name,
                if exited {
                    "workers outlived the master"
                } else {
                    "the master did not exit"
                },
                self.log()
            );
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let stopped = self.stop();
        if thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.name, self.log());
        } else if let Err(e) = stopped {
            panic!("{e:#}");
        }
    }
}

/// Whether `program` is on `PATH` (`cargo xtask setup` installs the peers).
pub fn require(program: &str) -> anyhow::Result<()> {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .map_err(|e| anyhow!("running sh: {e}"))?;
    if found.success() {
        Ok(())
    } else {
        bail!("{program} is not installed: run `cargo xtask setup`")
    }
}
