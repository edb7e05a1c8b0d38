//! `cargo xtask bench` (refused requests and floods): what a refused attempt
//! costs the gateway, and what a flood of refused connection attempts does to
//! the latency of allowed requests, with the datapath on and off. A client
//! namespace and a gateway namespace (keyfence in proxy mode in front of nginx
//! answering `200 ok`) joined by a veth pair; the same client load each time.
//!
//! 1. **Refused attempt cost, as gateway CPU**: both veth ends run threaded
//!    NAPI (GRO on so veth runs NAPI without XDP, TSO/GSO off), so the
//!    gateway's whole receive path (XDP, IP, TCP) runs in a kernel thread of
//!    its own whose CPU time is readable, and the client's receive work is not
//!    charged to the gateway. Gateway CPU = the agent's threads plus that NAPI
//!    thread, minus the same over an idle window as long as the measured one.
//!    - 403: `ATTEMPTS` attempts from an address no key allows, each sending a
//!      request with a valid key, XDP attached and passing (`early_drop:
//!      false`), so both sides take the same receive path; the shim completes
//!      the handshake and answers 403.
//!    - XDP drop: a steady, bounded raw SYN flood (`FLOOD_PPS`) to the
//!      listener from refused sources, datapath on; gateway CPU per packet
//!      dropped (`keyfence_datapath_packets_total{verdict="drop"}`), the
//!      program's own run time (`BPF_ENABLE_STATS`) beside it, and the agent's
//!      CPU above idle (drop-sample logging, rate-limited) as a cost per
//!      second, since it does not grow with the attempts. The sparse attempts
//!      (one SYN each, the program cold) are reported beside.
//!    - The floor: the agent detached, the bench object's `kf_bench_drop` (an
//!      `XDP_DROP` that reads nothing) attached in its place and the same
//!      flood sent: the NAPI time per packet that any XDP drop pays on this
//!      veth, so the most any drop can be cheaper than a 403 here.
//! 2. **Flood resilience**: wrk latency of allowed requests (4 connections)
//!    with no flood, and while a bounded raw SYN flood (valid checksums, random
//!    sources in 203.0.113.0/24, `FLOOD_PPS`) runs, datapath on and off
//!    (measured first, before NAPI is made threaded).
//!
//! Every flood is paced as `FLOOD_PPS / 1000` frames each millisecond, one
//! `sendmmsg` per batch: the sender shares the gateway's cores, so its own
//! per-packet syscall is kept out of what the gateway is charged, and the
//! batches reach veth's NAPI as a NIC's interrupts deliver them, not in
//! bursts of several milliseconds' worth.
//!
//! Needs root, wrk, nginx, ethtool and `KEYFENCE_BIN`. Writes `flood.json` into
//! `$KF_BENCH_DIR` when set.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    programs::{Xdp, XdpMode},
};
use keyfence::datapath::BENCH_OBJECT;
use keyfence_common::bench::program_names;
use keyfence_tests::{
    bench,
    http::require,
    netns::{
        Agent, CLIENT_IF, GATEWAY_IF, GATEWAY_V4, Lab, METRICS_BIND, Netns, connect_from, enter,
        parse_samples,
    },
    wrk::{self, Run as Latency},
};
use serde_json::json;

const ALLOWED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const REFUSED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 66);
const API: u16 = 8443;
const UPSTREAM: u16 = 8080;
const SECRET: &str = "bench-flood-secret-0123456789";
const ATTEMPTS: usize = 2000;
const ATTEMPT_THREADS: usize = 20;
const FLOOD_PPS: u64 = 100_000;
/// Hard bounds on one flood, whatever happens to the measurement.
const FLOOD_MAX: Duration = Duration::from_secs(8);
const FLOOD_MAX_PACKETS: u64 = 1_000_000;
const WRK_DURATION: &str = "4s";
const ROUNDS: usize = 3;
/// The measured part of the steady flood (after `FLOOD_WARMUP`), inside
/// `FLOOD_MAX`.
const FLOOD_WINDOW: Duration = Duration::from_secs(3);
const FLOOD_WARMUP: Duration = Duration::from_millis(500);

/// How the datapath meets a source no key allows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Datapath {
    /// Not attached: the shim answers 403.
    Off,
    /// Attached, the listener `early_drop: false`: XDP runs and passes, the
    /// shim answers 403 (the same receive path as a drop, up to the verdict).
    Passing,
    /// Attached and dropping.
    Dropping,
}

fn keyfence_config(pin: &Path, datapath: Datapath) -> String {
    let dp = if datapath == Datapath::Off {
        "mode: off"
    } else {
        "interfaces: [gw0], mode: auto"
    };
    let early_drop = datapath != Datapath::Passing;
    format!(
        r#"datapath: {{ {dp}, pin_path: "{pin}" }}
listeners:
  - {{ name: api, bind: "[::]:{API}", mode: proxy, upstream: "http://127.0.0.1:{UPSTREAM}", early_drop: {early_drop} }}
keys:
  - {{ id: bench, name: bench, secret_env: KF_BENCH_SECRET, ip_allow_list: ["{ALLOWED}"] }}
metrics: {{ bind: "127.0.0.1:9901" }}
"#,
        pin = pin.display()
    )
}

/// CPU time (ns) of task directory `dir` so far: `schedstat`'s first field,
/// the same accounting as `stat`'s utime + stime at ns resolution rather
/// than 10 ms ticks (a 403 costs about 100 µs).
fn task_ns(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("schedstat"))
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
}

/// CPU time of every thread of `pid` so far (`/proc/PID/task/*/schedstat`).
fn cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        total += task_ns(&task?.path());
    }
    Ok(total)
}

/// Kernel threads named `napi/<ifname>-<napi id>` (any namespace's).
fn napi_threads(ifname: &str) -> anyhow::Result<Vec<u32>> {
    let prefix = format!("napi/{ifname}-");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.starts_with(&prefix) {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// Threaded NAPI on both veth ends, GRO on (veth runs NAPI without XDP only
/// then) and TSO/GSO off (one segment, one packet): the gateway's receive
/// work runs in its own kernel thread, and what the gateway sends is
/// received in the client's, not charged to the gateway. Returns the
/// gateway's NAPI thread: the one `napi/gw0-*` thread that appeared (other
/// labs' `gw0` ends, in other namespaces, have none unless made threaded).
fn threaded_napi(lab: &Lab) -> anyhow::Result<u32> {
    let before = napi_threads(GATEWAY_IF)?;
    for (ns, ifname) in [(&lab.gateway, GATEWAY_IF), (&lab.client, CLIENT_IF)] {
        ns.exec(&[
            "ethtool", "-K", ifname, "tso", "off", "gso", "off", "gro", "on",
        ])?;
        ns.exec(&[
            "sh",
            "-c",
            &format!("echo 1 > /sys/class/net/{ifname}/threaded"),
        ])?;
    }
    let new: Vec<u32> = napi_threads(GATEWAY_IF)?
        .into_iter()
        .filter(|pid| !before.contains(pid))
        .collect();
    match new.as_slice() {
        [pid] => Ok(*pid),
        other => bail!(
            "threaded NAPI on {GATEWAY_IF}: expected one new napi/{GATEWAY_IF}-* thread, found {other:?}"
        ),
    }
}

/// `keyfence_datapath_packets_total{verdict="drop"}`, every listener.
fn drops(lab: &Lab) -> anyhow::Result<f64> {
    let (status, body) = lab.gateway.http_get(METRICS_BIND, "/metrics")?;
    if status != 200 {
        bail!("/metrics answered {status}");
    }
    Ok(parse_samples(&body, "keyfence_datapath_packets_total")
        .iter()
        .filter(|s| s.label("verdict") == Some("drop"))
        .map(|s| s.value)
        .sum())
}

/// The gateway's counters at one moment.
#[derive(Clone, Copy)]
struct Snapshot {
    at: Instant,
    agent_ns: u64,
    napi_ns: u64,
    bpf_ns: u64,
    runs: u64,
    drops: f64,
}

/// What the gateway spent between two snapshots.
#[derive(Clone, Copy, Debug)]
struct Spent {
    secs: f64,
    agent_ns: f64,
    napi_ns: f64,
    bpf_ns: f64,
    runs: f64,
    drops: f64,
}

impl Spent {
    /// This window's CPU above `idle`'s rate: agent and NAPI thread, each
    /// above its idle share, never below zero.
    fn above(&self, idle: &Self) -> (f64, f64) {
        let scale = self.secs / idle.secs.max(1e-9);
        (
            (self.agent_ns - idle.agent_ns * scale).max(0.0),
            (self.napi_ns - idle.napi_ns * scale).max(0.0),
        )
    }
}

struct Gateway<'a> {
    lab: &'a Lab,
    agent: u32,
    napi: u32,
}

impl Gateway<'_> {
    fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let (bpf_ns, runs) = xdp_runtime()?;
        Ok(Snapshot {
            at: Instant::now(),
            agent_ns: cpu_ns(self.agent)?,
            napi_ns: task_ns(Path::new(&format!("/proc/{}", self.napi))),
            bpf_ns,
            runs,
            drops: drops(self.lab)?,
        })
    }

    #[expect(clippy::cast_precision_loss, reason = "counters far below 2^52")]
    fn since(&self, before: &Snapshot) -> anyhow::Result<Spent> {
        let now = self.snapshot()?;
        Ok(Spent {
            secs: now.at.duration_since(before.at).as_secs_f64(),
            agent_ns: now.agent_ns.saturating_sub(before.agent_ns) as f64,
            napi_ns: now.napi_ns.saturating_sub(before.napi_ns) as f64,
            bpf_ns: now.bpf_ns.saturating_sub(before.bpf_ns) as f64,
            runs: now.runs.saturating_sub(before.runs) as f64,
            drops: now.drops - before.drops,
        })
    }

    /// As long a window as `busy` with nothing sent: the gateway's idle rate.
    fn idle(&self, busy: &Spent) -> anyhow::Result<Spent> {
        let before = self.snapshot()?;
        thread::sleep(Duration::from_secs_f64(busy.secs));
        self.since(&before)
    }
}

/// Run time and run count of every loaded `keyfence_xdp` (with stats enabled).
fn xdp_runtime() -> anyhow::Result<(u64, u64)> {
    runtime_of("keyfence_xdp")
}

/// Run time and run count of every loaded program named `name`.
fn runtime_of(name: &str) -> anyhow::Result<(u64, u64)> {
    let mut ns = 0;
    let mut count = 0;
    for info in aya::programs::loaded_programs() {
        let info = info?;
        if info.name_as_str() == Some(name) {
            ns += u64::try_from(info.run_time().as_nanos())?;
            count += info.run_count();
        }
    }
    Ok((ns, count))
}

/// `ATTEMPTS` attempts from `REFUSED` (`ATTEMPT_THREADS` in parallel), each a
/// connect and, if it completes, a request with the key: how many were
/// answered 403 and how many never completed the handshake.
fn refused_attempts(client: &Netns) -> anyhow::Result<(usize, usize)> {
    let dest = SocketAddr::new(GATEWAY_V4.into(), API);
    let path = client.path();
    let handles: Vec<_> = (0..ATTEMPT_THREADS)
        .map(|_| {
            let path = path.clone();
            thread::spawn(move || -> anyhow::Result<(usize, usize)> {
                enter(&path)?;
                let (mut refused, mut dropped) = (0, 0);
                for _ in 0..ATTEMPTS / ATTEMPT_THREADS {
                    let Ok(mut stream) =
                        connect_from(REFUSED.into(), dest, Duration::from_millis(50))
                    else {
                        dropped += 1;
                        continue;
                    };
                    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
                    write!(
                        stream,
                        "GET /v1/orders HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {SECRET}\r\nConnection: close\r\n\r\n"
                    )?;
                    let mut answer = String::new();
                    let _ = stream.read_to_string(&mut answer);
                    if answer.starts_with("HTTP/1.1 403") {
                        refused += 1;
                    }
                }
                Ok((refused, dropped))
            })
        })
        .collect();
    let mut total = (0, 0);
    for h in handles {
        let (r, d) = h
            .join()
            .map_err(|_| anyhow::anyhow!("an attempt thread panicked"))??;
        total.0 += r;
        total.1 += d;
    }
    Ok(total)
}

fn mac(ns: &Netns, ifname: &str) -> anyhow::Result<[u8; 6]> {
    let out = ns.exec(&["ip", "-j", "link", "show", ifname])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let text = v[0]["address"].as_str().context("no address")?;
    let mut mac = [0u8; 6];
    for (b, part) in mac.iter_mut().zip(text.split(':')) {
        *b = u8::from_str_radix(part, 16)?;
    }
    Ok(mac)
}

fn checksum(words: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for pair in words.chunks(2) {
        let hi = u32::from(pair[0]) << 8;
        let lo = pair.get(1).copied().map_or(0, u32::from);
        sum += hi | lo;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    #[expect(clippy::cast_possible_truncation, reason = "folded to 16 bits")]
    let folded = sum as u16;
    !folded
}

/// An Ethernet + IPv4 + TCP SYN frame with valid checksums, so the gateway's
/// kernel treats it as a real connection attempt when nothing drops it first.
fn syn_frame(src_mac: [u8; 6], dst_mac: [u8; 6], src: Ipv4Addr, sport: u16, seq: u32) -> Vec<u8> {
    let mut f = Vec::with_capacity(54);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&GATEWAY_V4.octets());
    let c = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&API.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&GATEWAY_V4.octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    let pseudo_sum: u32 = pseudo
        .chunks(2)
        .map(|p| (u32::from(p[0]) << 8) | u32::from(p[1]))
        .sum();
    let c = checksum(&tcp, pseudo_sum);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp);
    f
}

/// A SYN flood from the client namespace at `FLOOD_PPS` until `stop` or the
/// hard bounds; returns the packets sent.
fn flood(
    client: &Netns,
    gateway_mac: [u8; 6],
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> anyhow::Result<thread::JoinHandle<anyhow::Result<()>>> {
    let path = client.path();
    let client_mac = mac(client, CLIENT_IF)?;
    Ok(thread::spawn(move || -> anyhow::Result<()> {
        enter(&path)?;
        let ifindex = nix::net::if_::if_nametoindex(CLIENT_IF)?;
        // SAFETY: plain socket(2) call; the descriptor is closed below.
        #[expect(unsafe_code, reason = "AF_PACKET has no safe wrapper here")]
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: all-zero is a valid sockaddr_ll.
        #[expect(unsafe_code, reason = "zeroed C struct")]
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = u16::try_from(libc::AF_PACKET)?;
        addr.sll_ifindex = i32::try_from(ifindex)?;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&gateway_mac);
        let started = Instant::now();
        let batch = usize::try_from(FLOOD_PPS / 1000)?;
        let addr_len = u32::try_from(std::mem::size_of::<libc::sockaddr_ll>())?;
        let mut packets: u64 = 0;
        let mut state: u32 = 0x9e37_79b9;
        while !stop.load(Ordering::Relaxed)
            && started.elapsed() < FLOOD_MAX
            && packets < FLOOD_MAX_PACKETS
        {
            let mut frames: Vec<Vec<u8>> = (0..batch)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    let bytes = state.to_be_bytes();
                    syn_frame(
                        client_mac,
                        gateway_mac,
                        Ipv4Addr::new(203, 0, 113, bytes[0] | 1),
                        u16::from_be_bytes([bytes[1], bytes[2]]) | 1024,
                        state.rotate_left(8),
                    )
                })
                .collect();
            let mut iovecs: Vec<libc::iovec> = frames
                .iter_mut()
                .map(|f| libc::iovec {
                    iov_base: f.as_mut_ptr().cast(),
                    iov_len: f.len(),
                })
                .collect();
            let mut messages: Vec<libc::mmsghdr> = iovecs
                .iter_mut()
                .map(|iov| {
                    // SAFETY: all-zero is a valid msghdr (no control data).
                    #[expect(unsafe_code, reason = "zeroed C struct")]
                    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
                    hdr.msg_name = std::ptr::from_mut(&mut addr).cast();
                    hdr.msg_namelen = addr_len;
                    hdr.msg_iov = std::ptr::from_mut(iov);
                    hdr.msg_iovlen = 1;
                    libc::mmsghdr {
                        msg_hdr: hdr,
                        msg_len: 0,
                    }
                })
                .collect();
            // One syscall per batch, so the sender's own cost stays small
            // beside the gateway's (they share the machine's cores).
            // SAFETY: the headers point at frames, iovecs and the address,
            // all alive across the call.
            #[expect(unsafe_code, reason = "sendmmsg on AF_PACKET")]
            let done = unsafe {
                libc::sendmmsg(fd, messages.as_mut_ptr(), u32::try_from(messages.len())?, 0)
            };
            packets += u64::try_from(done.max(0))?;
            sent.store(packets, Ordering::Relaxed);
            // Pace to FLOOD_PPS: a batch every millisecond (steady, not bursts).
            let due = Duration::from_micros(packets * 1_000_000 / FLOOD_PPS);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                thread::sleep(wait);
            }
        }
        // SAFETY: the descriptor opened above.
        #[expect(unsafe_code, reason = "close(2)")]
        unsafe {
            libc::close(fd);
        }
        Ok(())
    }))
}

/// wrk from the allowed client through keyfence, 4 connections.
fn wrk(client: &Netns) -> anyhow::Result<Latency> {
    wrk::run(
        client,
        &format!("http://{GATEWAY_V4}:{API}/"),
        4,
        WRK_DURATION,
        Some(SECRET),
    )
}

/// `ROUNDS` wrk runs without a flood and `ROUNDS` with one, interleaved:
/// medians `(no flood, flood, packets sent per flood)`.
fn latency_pair(lab: &Lab, gateway_mac: [u8; 6]) -> anyhow::Result<(Latency, Latency, u64)> {
    let (mut quiet, mut flooded, mut sent_total) = (Vec::new(), Vec::new(), 0);
    for _ in 0..ROUNDS {
        quiet.push(wrk(&lab.client)?);
        let (measured, sent) = steady_flood(lab, gateway_mac, Duration::from_millis(300), || {
            wrk(&lab.client)
        })?;
        flooded.push(measured);
        sent_total += sent;
    }
    Ok((
        Latency::median(&quiet),
        Latency::median(&flooded),
        sent_total / ROUNDS as u64,
    ))
}

fn restart(agent: &mut Agent, datapath: Datapath) -> anyhow::Result<()> {
    if agent.is_running() {
        agent.sigterm()?;
    }
    agent.write_config(&keyfence_config(agent.pin_path(), datapath))?;
    agent.spawn()?;
    agent.wait_ready(Duration::from_secs(30))
}

/// The refused attempt, both sides, as gateway CPU.
#[derive(Clone, Copy)]
struct Refused {
    /// 403 with XDP passing: gateway CPU per attempt, its NAPI part, and the
    /// program's run time per packet it passed.
    answered_ns: f64,
    answered_napi_ns: f64,
    answered_bpf_ns: f64,
    /// XDP drop under the steady flood: gateway CPU per packet dropped, its
    /// NAPI part, the program's run time per run, packets dropped per second
    /// and the agent's CPU above idle per second (drop-sample logging).
    dropped_ns: f64,
    dropped_napi_ns: f64,
    dropped_bpf_ns: f64,
    drop_pps: f64,
    agent_ns_per_s: f64,
    /// Sparse attempts (one SYN each): the program's run time per run, cold.
    sparse_bpf_ns: f64,
}

/// 403s with XDP attached and passing, sparse drops, then a steady flood of
/// drops; the agent restarted for each datapath setting.
#[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
fn refused(
    lab: &Lab,
    agent: &mut Agent,
    napi: u32,
    gateway_mac: [u8; 6],
) -> anyhow::Result<Refused> {
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;

    restart(agent, Datapath::Passing)?;
    let gw = Gateway {
        lab,
        agent: agent.pid().context("agent pid")?,
        napi,
    };
    let before = gw.snapshot()?;
    let (answered, not_connected) = refused_attempts(&lab.client)?;
    let busy = gw.since(&before)?;
    if answered != ATTEMPTS {
        bail!(
            "XDP passing: {answered} of {ATTEMPTS} attempts answered 403 ({not_connected} not connected)"
        );
    }
    // A handshake, a request and a close are at least 3 packets each way in.
    if busy.runs < 3.0 * ATTEMPTS as f64 {
        bail!(
            "XDP passing: the program ran {} times for {ATTEMPTS} attempts: not attached?",
            busy.runs
        );
    }
    let (agent_ns, napi_ns) = busy.above(&gw.idle(&busy)?);
    let attempts = ATTEMPTS as f64;
    let answered_ns = (agent_ns + napi_ns) / attempts;
    let answered_napi_ns = napi_ns / attempts;
    let answered_bpf_ns = busy.bpf_ns / busy.runs;

    restart(agent, Datapath::Dropping)?;
    let gw = Gateway {
        lab,
        agent: agent.pid().context("agent pid")?,
        napi,
    };
    let before = gw.snapshot()?;
    let (answered, dropped) = refused_attempts(&lab.client)?;
    let sparse = gw.since(&before)?;
    if dropped != ATTEMPTS {
        bail!("datapath on: {dropped} of {ATTEMPTS} attempts dropped ({answered} answered)");
    }
    let sparse_bpf_ns = sparse.bpf_ns / sparse.runs.max(1.0);

    let (flood, sent) = steady_flood(lab, gateway_mac, FLOOD_WARMUP, || {
        let before = gw.snapshot()?;
        thread::sleep(FLOOD_WINDOW);
        gw.since(&before)
    })?;
    // Every flood SYN comes from a refused source: nearly all the program's
    // runs must be counted drops, or the figure is not a drop's.
    if flood.drops < 0.95 * flood.runs || flood.runs < 1000.0 {
        bail!(
            "flood: {} drops counted for {} program runs ({sent} packets sent)",
            flood.drops,
            flood.runs,
        );
    }
    let (agent_ns, napi_ns) = flood.above(&gw.idle(&flood)?);
    Ok(Refused {
        answered_ns,
        answered_napi_ns,
        answered_bpf_ns,
        dropped_ns: (agent_ns + napi_ns) / flood.drops,
        dropped_napi_ns: napi_ns / flood.drops,
        dropped_bpf_ns: flood.bpf_ns / flood.runs,
        drop_pps: flood.drops / flood.secs,
        agent_ns_per_s: agent_ns / flood.secs,
        sparse_bpf_ns,
    })
}

/// The steady flood (`FLOOD_PPS`, after `warmup`) around `measure`: what it
/// returned and the packets sent.
fn steady_flood<T>(
    lab: &Lab,
    gateway_mac: [u8; 6],
    warmup: Duration,
    measure: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, u64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let sender = flood(
        &lab.client,
        gateway_mac,
        Arc::clone(&stop),
        Arc::clone(&sent),
    )?;
    thread::sleep(warmup);
    let measured = measure();
    stop.store(true, Ordering::Relaxed);
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("the flood thread panicked"))??;
    Ok((measured?, sent.load(Ordering::Relaxed)))
}

/// The receive floor of a drop on this veth: NAPI time per packet and the
/// program's run time per run with `kf_bench_drop` attached.
#[derive(Clone, Copy)]
struct Floor {
    napi_ns: f64,
    bpf_ns: f64,
}

/// `kf_bench_drop` attached to the gateway's veth end (native, as keyfence's
/// program was; the agent must have detached) under the same steady flood.
#[expect(clippy::cast_precision_loss, reason = "counters far below 2^52")]
fn drop_floor(lab: &Lab, napi: u32, gateway_mac: [u8; 6]) -> anyhow::Result<Floor> {
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
    let netns = lab.gateway.path();
    // Attached from inside the namespace (the interface is named there);
    // detached when `_attached` drops.
    let _attached = thread::spawn(move || -> anyhow::Result<Ebpf> {
        enter(&netns)?;
        let mut ebpf = Ebpf::load(BENCH_OBJECT).context("loading the bench object")?;
        let program: &mut Xdp = ebpf
            .program_mut(program_names::DROP)
            .context("the bench object has no drop program")?
            .try_into()?;
        program.load()?;
        program
            .attach(GATEWAY_IF, XdpMode::Driver)
            .with_context(|| format!("attaching {} to {GATEWAY_IF}", program_names::DROP))?;
        Ok(ebpf)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the attaching thread panicked"))??;
    let napi_task = std::path::PathBuf::from(format!("/proc/{napi}"));
    let counters = || -> anyhow::Result<(Instant, u64, u64, u64)> {
        let (bpf_ns, runs) = runtime_of(program_names::DROP)?;
        Ok((Instant::now(), task_ns(&napi_task), bpf_ns, runs))
    };
    let ((at, napi_ns, bpf_ns, runs), sent) = steady_flood(lab, gateway_mac, FLOOD_WARMUP, || {
        let (at0, napi0, bpf0, runs0) = counters()?;
        thread::sleep(FLOOD_WINDOW);
        let (at1, napi1, bpf1, runs1) = counters()?;
        Ok((at1 - at0, napi1 - napi0, bpf1 - bpf0, runs1 - runs0))
    })?;
    if runs < 1000 {
        bail!("drop floor: the program ran {runs} times for {sent} packets sent");
    }
    let idle_from = task_ns(&napi_task);
    thread::sleep(at);
    let idle = task_ns(&napi_task).saturating_sub(idle_from);
    let runs = runs as f64;
    Ok(Floor {
        napi_ns: napi_ns.saturating_sub(idle) as f64 / runs,
        bpf_ns: bpf_ns as f64 / runs,
    })
}

/// What `main` measured, for the report.
#[derive(Clone, Copy)]
struct Measured {
    refused: Refused,
    floor: Floor,
    quiet_off: Latency,
    flood_off: Latency,
    quiet_on: Latency,
    flood_on: Latency,
    sent: (u64, u64),
}

/// The refused-attempt table and its note.
fn refused_table(r: &Refused, floor: &Floor, out: &mut String) {
    let ratio = r.answered_ns / r.dropped_ns;
    let _ = writeln!(
        out,
        "| refused attempt (gateway CPU: agent threads + the gateway's threaded-NAPI thread, idle subtracted) | per attempt | of it NAPI | XDP program per packet | ratio |\n|---|---:|---:|---:|---:|"
    );
    let _ = writeln!(
        out,
        "| shim answers 403 (XDP attached, passing: `early_drop: false`) | {:.1} µs | {:.1} µs | {:.0} ns | 1 |",
        r.answered_ns / 1e3,
        r.answered_napi_ns / 1e3,
        r.answered_bpf_ns
    );
    let _ = writeln!(
        out,
        "| XDP drops the SYN (steady flood, {:.0} drops/s) | {:.2} µs | {:.2} µs | {:.0} ns | {ratio:.0}× cheaper |",
        r.drop_pps,
        r.dropped_ns / 1e3,
        r.dropped_napi_ns / 1e3,
        r.dropped_bpf_ns
    );
    let _ = writeln!(
        out,
        "| XDP program alone (BPF stats run time under the flood) | {:.2} µs | | {:.0} ns | {:.0}× cheaper |",
        r.dropped_bpf_ns / 1e3,
        r.dropped_bpf_ns,
        r.answered_ns / r.dropped_bpf_ns
    );
    let _ = writeln!(
        out,
        "| the floor: `kf_bench_drop` (`XDP_DROP`, reads nothing) in keyfence's place, same flood | {:.2} µs | {:.2} µs | {:.0} ns | {:.0}× (the most any XDP drop reaches on this veth) |",
        floor.napi_ns / 1e3,
        floor.napi_ns / 1e3,
        floor.bpf_ns,
        r.answered_ns / floor.napi_ns
    );
    let _ = writeln!(
        out,
        "\nDrop-sample logging (the agent's CPU above idle during the flood) costs {:.2} ms of CPU per second; it is rate-limited, so it does not grow with the drop rate ({:.0} ns per drop at this rate, included above). \
Sparse attempts (one SYN each, {ATTEMPTS} of them) run the program cold: {:.0} ns per run. \
veth copies every packet into a fresh page before its XDP program runs (`veth_convert_skb_to_xdp_buff`: an skb's headroom is below XDP's 256 bytes), so the NAPI time per drop holds a copy and a page round trip that a NIC driver's XDP does not pay: the floor row pays them with a program that does nothing, and keyfence's drop costs {}. The program-only row is the drop's cost on top of a driver's receive.",
        r.agent_ns_per_s / 1e6,
        r.agent_ns_per_s / r.drop_pps,
        r.sparse_bpf_ns,
        above_floor(r.dropped_ns - floor.napi_ns)
    );
}

/// keyfence's drop against the floor's: two measurements of one flood, so a
/// difference below zero is their noise, not a drop cheaper than `XDP_DROP`.
fn above_floor(ns: f64) -> String {
    if ns < 0.0 {
        format!("no more than it (measured {:.0} ns below it)", -ns)
    } else {
        format!("{ns:.0} ns above it")
    }
}

/// Print the tables; write `flood.json` into `$KF_BENCH_DIR` when set.
fn report(m: &Measured) -> anyhow::Result<()> {
    let Measured {
        refused: r,
        floor,
        quiet_off,
        flood_off,
        quiet_on,
        flood_on,
        sent: (sent_off, sent_on),
    } = *m;
    let ratio = r.answered_ns / r.dropped_ns;
    let program_ratio = r.answered_ns / r.dropped_bpf_ns;
    let flood_ratio = flood_on.p99_us / quiet_on.p99_us;
    let mut out = String::new();
    refused_table(&r, &floor, &mut out);
    let ceiling = r.answered_ns / floor.napi_ns;
    let _ = writeln!(
        out,
        "\n| allowed requests (wrk -c4 from an allowed address) | requests/s | p50 µs | p99 µs | p99 × no flood |\n|---|---:|---:|---:|---:|"
    );
    for (name, l, base) in [
        ("no flood, datapath off", quiet_off, quiet_off),
        ("SYN flood, datapath off", flood_off, quiet_off),
        ("no flood, datapath on", quiet_on, quiet_on),
        ("SYN flood, datapath on", flood_on, quiet_on),
    ] {
        let _ = writeln!(
            out,
            "| {name} | {:.0} | {:.0} | {:.0} | {:.2} |",
            l.rps,
            l.p50_us,
            l.p99_us,
            l.p99_us / base.p99_us
        );
    }
    let _ = writeln!(
        out,
        "\n{ATTEMPTS} refused attempts from {REFUSED} ({ATTEMPT_THREADS} threads). Floods: raw SYNs from random 203.0.113.0/24 sources at {FLOOD_PPS}/s, {} per sendmmsg each millisecond ({sent_off} and {sent_on} packets per latency run; the cost flood measured over {} s after {} ms), wrk {WRK_DURATION}, median of {ROUNDS} rounds, before NAPI was made threaded.",
        FLOOD_PPS / 1000,
        FLOOD_WINDOW.as_secs(),
        FLOOD_WARMUP.as_millis()
    );
    print!("{out}");
    let report = json!({
        "refused_attempt_ns": {
            "answered": r.answered_ns,
            "answered_napi": r.answered_napi_ns,
            "answered_program": r.answered_bpf_ns,
            "dropped": r.dropped_ns,
            "dropped_napi": r.dropped_napi_ns,
            "dropped_program": r.dropped_bpf_ns,
            "sparse_program": r.sparse_bpf_ns,
            "drops_per_s": r.drop_pps,
            "logging_ns_per_s": r.agent_ns_per_s,
            "ratio": ratio,
            "program_ratio": program_ratio,
            "floor_napi": floor.napi_ns,
            "floor_program": floor.bpf_ns,
            "ceiling": ceiling,
        },
        "latency": [
            { "case": "no flood, datapath off", "rps": quiet_off.rps, "p50_us": quiet_off.p50_us, "p99_us": quiet_off.p99_us },
            { "case": "flood, datapath off", "rps": flood_off.rps, "p50_us": flood_off.p50_us, "p99_us": flood_off.p99_us },
            { "case": "no flood, datapath on", "rps": quiet_on.rps, "p50_us": quiet_on.p50_us, "p99_us": quiet_on.p99_us },
            { "case": "flood, datapath on", "rps": flood_on.rps, "p50_us": flood_on.p50_us, "p99_us": flood_on.p99_us },
        ],
        "goals": [
            bench::goal_within(
                "a refused attempt ≥ 100× cheaper as gateway CPU when XDP drops it (steady flood) than when the shim answers 403 (XDP passing); veth copies each packet (program alone beside)",
                &format!("{ratio:.0}× ({:.2} µs against {:.0} µs; program alone {program_ratio:.0}×)", r.dropped_ns / 1e3, r.answered_ns / 1e3),
                ratio >= 100.0,
                // Out of reach when even a program that does nothing cannot
                // get there, and keyfence's drop is near that floor.
                (ceiling < 100.0 && ratio >= 0.8 * ceiling)
                    .then(|| {
                        format!(
                            "veth's floor: an XDP_DROP that reads nothing costs {:.2} µs per packet here, so no drop exceeds {ceiling:.0}×",
                            floor.napi_ns / 1e3
                        )
                    })
                    .as_deref(),
            ),
            bench::goal(
                "allowed p99 under a flood with the datapath on ≤ 1.5× no flood",
                &format!("{flood_ratio:.2}×"),
                flood_ratio <= 1.5,
            ),
        ],
    });
    bench::save("flood", &report)?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    for program in ["wrk", "nginx", "ethtool"] {
        require(program)?;
    }
    let lab = Lab::new(&[ALLOWED.into(), REFUSED.into()])?;
    let mut agent = Agent::new(&lab.gateway)?;
    agent
        .env("KF_BENCH_SECRET", SECRET)
        .run_arg("--detach-on-exit");
    let dir = agent.dir().to_owned();
    let _nginx = bench::nginx(
        &lab.gateway,
        &dir,
        &bench::upstream_server(UPSTREAM),
        SocketAddr::from(([127, 0, 0, 1], UPSTREAM)),
    )?;
    let gateway_mac = mac(&lab.gateway, GATEWAY_IF)?;

    // Latency first, on the veth pair as it comes.
    restart(&mut agent, Datapath::Off)?;
    let (quiet_off, flood_off, sent_off) = latency_pair(&lab, gateway_mac)?;
    restart(&mut agent, Datapath::Dropping)?;
    let (quiet_on, flood_on, sent_on) = latency_pair(&lab, gateway_mac)?;

    // Then the refused attempt's cost, with the receive path in a thread.
    let napi = threaded_napi(&lab)?;
    let refused = refused(&lab, &mut agent, napi, gateway_mac)?;
    // `--detach-on-exit`: the floor's program takes the interface after it.
    agent.sigterm()?;
    let floor = drop_floor(&lab, napi, gateway_mac)?;

    report(&Measured {
        refused,
        floor,
        quiet_off,
        flood_off,
        quiet_on,
        flood_on,
        sent: (sent_off, sent_on),
    })
}

#[cfg(test)]
mod tests {
    use super::above_floor;

    #[test]
    fn a_drop_below_the_floor_is_not_reported_as_a_negative_cost() {
        assert_eq!(above_floor(37.4), "37 ns above it");
        assert_eq!(
            above_floor(-12.2),
            "no more than it (measured 12 ns below it)"
        );
    }
}
