//! `cargo xtask bench` (refused requests and floods): what a refused attempt
//! costs the gateway, and what a flood of refused connection attempts does to
//! the latency of allowed requests, with the datapath on and off. A client
//! namespace and a gateway namespace (keyfence in proxy mode in front of nginx
//! answering `200 ok`) joined by a veth pair; the same client load each time.
//!
//! 1. **Refused attempt cost**: `ATTEMPTS` connection attempts from an address
//!    no key allows, each sending a request with a valid key. Datapath off: the
//!    shim completes the handshake and answers 403; its CPU time (every thread,
//!    `/proc/PID/task/*/schedstat`) per attempt. Datapath on: the SYN is
//!    dropped in XDP; the program's run time (`BPF_ENABLE_STATS`) plus the
//!    agent's CPU time above its idle rate (drop samples it reads and logs)
//!    per attempt. The shim's figure leaves out the kernel's
//!    own TCP work, so the ratio understates the datapath's advantage.
//! 2. **Flood resilience**: wrk latency of allowed requests (4 connections)
//!    with no flood, and while a bounded raw SYN flood (valid checksums, random
//!    sources in 203.0.113.0/24, `FLOOD_PPS`) runs, datapath on and off.
//!
//! Needs root, wrk, nginx and `KEYFENCE_BIN`. Writes `flood.json` into
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
use keyfence_tests::{
    bench,
    http::require,
    netns::{Agent, CLIENT_IF, GATEWAY_IF, GATEWAY_V4, Lab, Netns, connect_from, enter},
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

fn keyfence_config(pin: &Path, datapath: bool) -> String {
    let dp = if datapath {
        "interfaces: [gw0], mode: auto"
    } else {
        "mode: off"
    };
    format!(
        r#"datapath: {{ {dp}, pin_path: "{pin}" }}
listeners:
  - {{ name: api, bind: "[::]:{API}", mode: proxy, upstream: "http://127.0.0.1:{UPSTREAM}" }}
keys:
  - {{ id: bench, name: bench, secret_env: KF_BENCH_SECRET, ip_allow_list: ["{ALLOWED}"] }}
metrics: {{ bind: "127.0.0.1:9901" }}
"#,
        pin = pin.display()
    )
}

/// CPU time of every thread of `pid` so far (`/proc/PID/task/*/schedstat`).
fn cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = std::fs::read_to_string(task?.path().join("schedstat")).unwrap_or_default();
        total += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

/// Run time and run count of every loaded `keyfence_xdp` (with stats enabled).
fn xdp_runtime() -> anyhow::Result<(u64, u64)> {
    let mut ns = 0;
    let mut count = 0;
    for info in aya::programs::loaded_programs() {
        let info = info?;
        if info.name_as_str() == Some("keyfence_xdp") {
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
        let batch = FLOOD_PPS / 200;
        let mut packets: u64 = 0;
        let mut state: u32 = 0x9e37_79b9;
        while !stop.load(Ordering::Relaxed)
            && started.elapsed() < FLOOD_MAX
            && packets < FLOOD_MAX_PACKETS
        {
            for _ in 0..batch {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let bytes = state.to_be_bytes();
                let frame = syn_frame(
                    client_mac,
                    gateway_mac,
                    Ipv4Addr::new(203, 0, 113, bytes[0] | 1),
                    u16::from_be_bytes([bytes[1], bytes[2]]) | 1024,
                    state.rotate_left(8),
                );
                // SAFETY: the frame and address outlive the call.
                #[expect(unsafe_code, reason = "sendto on AF_PACKET")]
                let _ = unsafe {
                    libc::sendto(
                        fd,
                        frame.as_ptr().cast(),
                        frame.len(),
                        0,
                        std::ptr::from_ref(&addr).cast(),
                        u32::try_from(std::mem::size_of::<libc::sockaddr_ll>())?,
                    )
                };
                packets += 1;
            }
            sent.store(packets, Ordering::Relaxed);
            // Pace to FLOOD_PPS: batch every 5 ms.
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
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let sender = flood(
            &lab.client,
            gateway_mac,
            Arc::clone(&stop),
            Arc::clone(&sent),
        )?;
        thread::sleep(Duration::from_millis(300));
        let measured = wrk(&lab.client);
        stop.store(true, Ordering::Relaxed);
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("the flood thread panicked"))??;
        flooded.push(measured?);
        sent_total += sent.load(Ordering::Relaxed);
    }
    Ok((
        Latency::median(&quiet),
        Latency::median(&flooded),
        sent_total / ROUNDS as u64,
    ))
}

fn restart(agent: &mut Agent, datapath: bool) -> anyhow::Result<()> {
    if agent.is_running() {
        agent.sigterm()?;
    }
    agent.write_config(&keyfence_config(agent.pin_path(), datapath))?;
    agent.spawn()?;
    agent.wait_ready(Duration::from_secs(30))
}

/// What `main` measured, for the report.
#[derive(Clone, Copy)]
struct Measured {
    shim_ns: f64,
    xdp_ns: f64,
    bpf_ns_per_run: f64,
    runs: u64,
    quiet_off: Latency,
    flood_off: Latency,
    quiet_on: Latency,
    flood_on: Latency,
    sent: (u64, u64),
}

/// Print the tables; write `flood.json` into `$KF_BENCH_DIR` when set.
fn report(m: &Measured) -> anyhow::Result<()> {
    let Measured {
        shim_ns,
        xdp_ns,
        quiet_off,
        flood_off,
        quiet_on,
        flood_on,
        sent: (sent_off, sent_on),
        ..
    } = *m;
    let ratio = shim_ns / xdp_ns;
    let flood_ratio = flood_on.p99_us / quiet_on.p99_us;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| refused attempt | gateway CPU per attempt | ratio |\n|---|---:|---:|"
    );
    let _ = writeln!(
        out,
        "| shim answers 403 (datapath off; keyfence's CPU, full TCP + HTTP) | {:.1} µs | 1 |",
        shim_ns / 1e3
    );
    let _ = writeln!(
        out,
        "| XDP drops the SYN (datapath on; program run time {:.0} ns over {} runs, plus keyfence's CPU above idle) | {:.2} µs | {ratio:.0}× cheaper |",
        m.bpf_ns_per_run,
        m.runs,
        m.xdp_ns / 1e3
    );
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
        "\n{ATTEMPTS} refused attempts from {REFUSED} ({ATTEMPT_THREADS} threads). Floods: raw SYNs from random 203.0.113.0/24 sources at {FLOOD_PPS}/s ({sent_off} and {sent_on} packets per run), wrk {WRK_DURATION}, median of {ROUNDS} rounds."
    );
    print!("{out}");
    let report = json!({
        "refused_attempt_ns": { "shim": shim_ns, "datapath": xdp_ns, "ratio": ratio },
        "latency": [
            { "case": "no flood, datapath off", "rps": quiet_off.rps, "p50_us": quiet_off.p50_us, "p99_us": quiet_off.p99_us },
            { "case": "flood, datapath off", "rps": flood_off.rps, "p50_us": flood_off.p50_us, "p99_us": flood_off.p99_us },
            { "case": "no flood, datapath on", "rps": quiet_on.rps, "p50_us": quiet_on.p50_us, "p99_us": quiet_on.p99_us },
            { "case": "flood, datapath on", "rps": flood_on.rps, "p50_us": flood_on.p50_us, "p99_us": flood_on.p99_us },
        ],
        "goals": [
            bench::goal(
                "a refused attempt ≥ 100× cheaper in the datapath than answered by the shim",
                &format!("{ratio:.0}×"),
                ratio >= 100.0,
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

#[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
fn main() -> anyhow::Result<()> {
    for program in ["wrk", "nginx"] {
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

    // Datapath off: the shim answers every refused attempt.
    restart(&mut agent, false)?;
    let pid = agent.pid().context("agent pid")?;
    let before = cpu_ns(pid)?;
    let (answered, not_connected) = refused_attempts(&lab.client)?;
    let shim_ns = (cpu_ns(pid)? - before) as f64 / ATTEMPTS as f64;
    if answered != ATTEMPTS {
        bail!(
            "datapath off: {answered} of {ATTEMPTS} attempts answered 403 ({not_connected} not connected)"
        );
    }
    let (quiet_off, flood_off, sent_off) = latency_pair(&lab, gateway_mac)?;

    // Datapath on: XDP drops them.
    restart(&mut agent, true)?;
    let pid = agent.pid().context("agent pid")?;
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
    let (bpf_before, runs_before) = xdp_runtime()?;
    let agent_before = cpu_ns(pid)?;
    let window = Instant::now();
    let (answered, dropped) = refused_attempts(&lab.client)?;
    let window = window.elapsed();
    let (bpf_after, runs_after) = xdp_runtime()?;
    let busy = cpu_ns(pid)? - agent_before;
    // The agent's own housekeeping over as long a window without attempts is
    // not the attempts' cost: subtract it.
    let idle_before = cpu_ns(pid)?;
    thread::sleep(window);
    let idle = cpu_ns(pid)? - idle_before;
    let agent_ns = busy.saturating_sub(idle) as f64;
    if dropped != ATTEMPTS {
        bail!("datapath on: {dropped} of {ATTEMPTS} attempts dropped ({answered} answered)");
    }
    let bpf_ns = (bpf_after - bpf_before) as f64;
    let xdp_ns = (bpf_ns + agent_ns) / ATTEMPTS as f64;
    let (quiet_on, flood_on, sent_on) = latency_pair(&lab, gateway_mac)?;
    agent.sigterm()?;

    report(&Measured {
        shim_ns,
        xdp_ns,
        bpf_ns_per_run: bpf_ns / (runs_after - runs_before).max(1) as f64,
        runs: runs_after - runs_before,
        quiet_off,
        flood_off,
        quiet_on,
        flood_on,
        sent: (sent_off, sent_on),
    })
}
