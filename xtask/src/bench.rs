//! `cargo xtask bench`: performance measured side by side in one run (never by
//! timed tests; these machines are noisy, so ratios within one run are what
//! count). Sections, each a release binary of the tests package:
//!
//! - datapath (`kf-bench`): the real XDP program's ns per packet through
//!   `BPF_PROG_TEST_RUN` at 10 to 1M prefixes, IPv4/IPv6, host entries and
//!   mixed lengths, beside a parse-only floor and a bare LPM lookup (the bench
//!   object, which only the tests crate's `bench` feature builds);
//! - refused requests and floods (`kf-bench-flood`): CPU per refused attempt,
//!   datapath against shim, and allowed latency under a SYN flood;
//! - shim (`kf-bench-shim`): wrk against the upstream, keyfence proxy mode,
//!   keyfence auth mode behind nginx `auth_request`, nginx `allow`/`deny`;
//! - change and scale (`kf-bench-change`): an allow-list change through the
//!   API until enforced with 100k prefixes loaded; 1M prefixes and 100k keys
//!   from start, RSS and BPF map memory;
//! - fleet (`kf-bench-fleet`): three hosts on one PostgreSQL, a change through
//!   one host until enforced on all three (and with `?wait=local`, the
//!   others' lag) with 100k prefixes; initial sync of 100k keys;
//! - guest (`kf-bench` again, in a qemu guest on Debian 12's 6.1 kernel, TCG;
//!   `guest.rs`): the datapath's per-packet cost on that kernel, as ratios to
//!   the guest's own floor, up to 100k prefixes.
//!
//! `--only NAME` (repeatable) runs just those sections.
//!
//! Writes `target/bench/report.md`, `report.json` (each section's numbers and
//! the goals, met or missed) and `datapath.svg`, and prints the report.

use std::{fmt::Write as _, path::Path, time::Instant};

use anyhow::Context as _;
use serde_json::{Map, Value};

use crate::{build, cmd, setup};

/// (binary, JSON file and key, report heading)
const SECTIONS: [(&str, &str, &str); 6] = [
    (
        "kf-bench",
        "datapath",
        "Datapath cost (BPF_PROG_TEST_RUN, repeat 1,000,000, median of 5)",
    ),
    (
        "kf-bench-flood",
        "flood",
        "A refused request's cost, and allowed requests under a flood",
    ),
    ("kf-bench-shim", "shim", "Shim overhead (wrk on loopback)"),
    ("kf-bench-change", "change", "Change and scale"),
    (
        "kf-bench-fleet",
        "fleet",
        "Fleet mode (three hosts, one PostgreSQL)",
    ),
    (
        "kf-bench",
        "guest",
        "Datapath cost on Debian 12's 6.1 kernel (qemu guest, TCG: compare the ratios, not the ns)",
    ),
];

/// Run one bench binary of the tests package (release) and return its stdout.
fn section(bin: &str, keyfence: &Path, dir: &Path) -> anyhow::Result<String> {
    let mut bench = cmd::cargo();
    bench
        .env("KEYFENCE_BIN", keyfence)
        .env("KF_BENCH_DIR", dir)
        .args([
            "run",
            "--release",
            "--package",
            "keyfence-tests",
            "--bin",
            bin,
        ]);
    println!("bench: {}", cmd::display(&bench));
    let output = bench.output().with_context(|| format!("running {bin}"))?;
    if !output.status.success() {
        anyhow::bail!(
            "{bin} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The goals of every section as a markdown table.
fn goals(report: &Map<String, Value>) -> String {
    let mut out = String::from("| goal | measured | |\n|---|---:|---|\n");
    for (_, section) in report {
        for goal in section["goals"].as_array().into_iter().flatten() {
            let met = match (goal["met"].as_bool(), goal["limit"].as_str()) {
                (Some(true), _) => "met".to_owned(),
                (_, Some(limit)) => format!("**missed**: out of reach here ({limit})"),
                _ => "**missed**".to_owned(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {met} |",
                goal["goal"].as_str().unwrap_or("?"),
                goal["measured"].as_str().unwrap_or("?")
            );
        }
    }
    out
}

/// Every section, or only those named in `only` (their JSON keys); a partial
/// run prints its tables but leaves `report.md` and `report.json` alone, so
/// they always hold one whole run.
pub fn run(only: &[String]) -> anyhow::Result<()> {
    if let Some(unknown) = only
        .iter()
        .find(|o| !SECTIONS.iter().any(|(_, key, _)| key == o))
    {
        anyhow::bail!(
            "--only {unknown}: no such section (datapath, flood, shim, change, fleet, guest)"
        );
    }
    let started = Instant::now();
    setup::run()?;
    let keyfence = build::agent(build::Profile::Release)?;
    let dir = cmd::target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let mut markdown = String::new();
    let mut report = Map::new();
    let partial = !only.is_empty();
    for (bin, key, heading) in SECTIONS {
        if partial && !only.iter().any(|o| o == key) {
            continue;
        }
        let table = if key == "guest" {
            crate::guest::bench(&dir)?
        } else {
            section(bin, &keyfence, &dir)?
        };
        let _ = write!(markdown, "\n## {heading}\n\n{table}");
        let file = dir.join(format!("{key}.json"));
        let json: Value = serde_json::from_str(
            &std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?,
        )
        .with_context(|| format!("parsing {}", file.display()))?;
        report.insert(key.to_owned(), json);
    }
    if dir.join("datapath.svg").exists() {
        markdown.push_str("\n![datapath cost against prefixes](datapath.svg)\n");
    }
    let markdown = format!(
        "# keyfence bench\n\n## Goals\n\n{}{markdown}\nWhole run: {:.0} s on this machine ({} CPUs).\n",
        goals(&report),
        started.elapsed().as_secs_f64(),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
    );
    if partial {
        print!("{markdown}");
        println!(
            "\nbench: only {} run; {} left as it was",
            only.join(", "),
            dir.join("report.md").display()
        );
        return Ok(());
    }
    std::fs::write(dir.join("report.md"), &markdown)?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&Value::Object(report))?,
    )?;
    print!("{markdown}");
    println!(
        "\nbench: wrote {}, report.json and datapath.svg",
        dir.join("report.md").display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::goals;

    #[test]
    fn a_goal_is_met_missed_or_out_of_reach_with_its_limit() {
        let report = json!({
            "flood": { "goals": [
                { "goal": "a", "measured": "117×", "met": true, "limit": null },
                { "goal": "b", "measured": "61×", "met": false, "limit": "veth's floor: 0.94 µs" },
                { "goal": "c", "measured": "0.88×", "met": false },
                { "goal": "d", "measured": "130×", "met": true, "limit": "ignored when met" },
            ] }
        });
        let table = goals(report.as_object().unwrap());
        let rows: Vec<&str> = table.lines().skip(2).collect();
        assert_eq!(
            rows,
            [
                "| a | 117× | met |",
                "| b | 61× | **missed**: out of reach here (veth's floor: 0.94 µs) |",
                "| c | 0.88× | **missed** |",
                "| d | 130× | met |",
            ]
        );
    }
}
