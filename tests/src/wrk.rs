//! wrk for the benches: run it inside a namespace, parse its `--latency`
//! report, and take medians over rounds.

use anyhow::{Context as _, bail};

use crate::{bench::median, netns::Netns};

/// One wrk run: requests/s and latency percentiles.
#[derive(Clone, Copy, Debug, Default)]
pub struct Run {
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

impl Run {
    /// The median of each figure over `runs` (each on its own).
    #[must_use]
    pub fn median(runs: &[Self]) -> Self {
        Self {
            rps: median(runs.iter().map(|r| r.rps).collect()),
            p50_us: median(runs.iter().map(|r| r.p50_us).collect()),
            p99_us: median(runs.iter().map(|r| r.p99_us).collect()),
        }
    }
}

/// `12.34us`, `1.20ms`, `2.00s` → microseconds.
fn micros(text: &str) -> Option<f64> {
    let (number, unit) = text.split_at(text.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = number.parse().ok()?;
    Some(match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        _ => return None,
    })
}

/// wrk's `--latency` report; error answers or a missing rate are errors.
pub fn parse(out: &str) -> anyhow::Result<Run> {
    let mut run = Run::default();
    for line in out.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Requests/sec:"), Some(v)) => run.rps = v.parse()?,
            (Some("50%"), Some(v)) => run.p50_us = micros(v).context("p50")?,
            (Some("99%"), Some(v)) => run.p99_us = micros(v).context("p99")?,
            _ => {}
        }
        if line.contains("Non-2xx or 3xx responses") {
            bail!("wrk saw error answers:\n{out}");
        }
    }
    if run.rps == 0.0 {
        bail!("no Requests/sec in wrk's output:\n{out}");
    }
    Ok(run)
}

/// `wrk -t1 -d DURATION --latency -c CONNECTIONS [-H bearer] URL` inside `ns`.
pub fn run(
    ns: &Netns,
    url: &str,
    connections: u32,
    duration: &str,
    bearer: Option<&str>,
) -> anyhow::Result<Run> {
    let mut cmd = ns.command("wrk");
    cmd.args(["-t1", "-d", duration, "--latency", "--timeout", "2s"])
        .args(["-c", &connections.to_string()]);
    if let Some(secret) = bearer {
        cmd.args(["-H", &format!("Authorization: Bearer {secret}")]);
    }
    let out = cmd.arg(url).output().context("running wrk")?;
    if !out.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    parse(&String::from_utf8_lossy(&out.stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_latency_report_parses_and_error_answers_do_not() {
        assert!((median(vec![3.0, 1.0, 2.0]) - 2.0).abs() < 1e-9);
        assert!(median(Vec::new()).is_nan());
        let report = "  Latency Distribution\n     50%   25.00us\n     99%    1.20ms\nRequests/sec:  37188.10\n";
        let run = parse(report).unwrap();
        assert!((run.rps - 37188.10).abs() < 1e-6);
        assert!((run.p50_us - 25.0).abs() < 1e-9);
        assert!((run.p99_us - 1200.0).abs() < 1e-9);
        assert!(parse(&format!("{report}  Non-2xx or 3xx responses: 3\n")).is_err());
        assert!(parse("nothing").is_err());
    }
}
