//! `cargo xtask test`: what CI runs (`.ci/run`). Setup, then rustfmt, clippy on
//! every crate and target, the unprivileged tests (default members), the fuzz
//! targets for a bounded time each (`fuzz.rs`), a debug build of `keyfence` for
//! the privileged tests to run, the privileged tests (`keyfence-tests`, one
//! thread: they share the kernel), `cargo xtask demo` (the README's first
//! command) and `cargo xtask demo --fleet`, then the datapath's tests again in a guest on Debian 12's 6.1
//! kernel (`guest.rs`). Every step runs even when an earlier one failed; the
//! last line is `N passed, N failed`, the sum of cargo's `test result:` lines
//! plus one per fuzz target and one per demo, for CI to read.

use std::{fmt::Write as _, path::Path, time::Instant};

use anyhow::bail;

use crate::{
    build::{self, Profile},
    cmd, demo, fuzz,
};

/// Passed and failed tests, summed over cargo's `test result:` lines, and
/// the names of the failed ones (`test NAME ... FAILED`), so that the closing
/// summary, the part of a CI log that is always kept, says which test failed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    passed: u64,
    failed: u64,
    failed_names: Vec<String>,
}

impl Tally {
    /// Add one line of `cargo test` output: `test result: ok. 3 passed; 1
    /// failed; 0 ignored; …` adds to the counts, `test NAME ... FAILED` names
    /// a failure; other lines are ignored.
    fn add_line(&mut self, line: &str) {
        let line = line.trim();
        if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|rest| rest.strip_suffix(" ... FAILED"))
        {
            self.failed_names.push(name.to_owned());
            return;
        }
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match what {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                _ => {}
            }
        }
    }

    /// Add another step's counts and names into this one.
    fn absorb(&mut self, other: &Self) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.failed_names.extend(other.failed_names.iter().cloned());
    }

    /// `N passed, N failed`, and the failed tests' names when there are any.
    fn summary(&self) -> String {
        let mut s = format!("{} passed, {} failed", self.passed, self.failed);
        if !self.failed_names.is_empty() {
            let _ = write!(s, ": {}", self.failed_names.join(", "));
        }
        s
    }
}

/// One step's outcome, for the closing summary.
pub struct Step {
    name: &'static str,
    ok: bool,
    note: String,
}

pub fn run() -> anyhow::Result<()> {
    crate::setup::run()?;
    let mut steps = Vec::new();
    let mut tally = Tally::default();

    let mut fmt = cmd::cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    steps.push(plain("rustfmt", &mut fmt));

    let mut clippy = cmd::cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    steps.push(plain("clippy", &mut clippy));

    let mut unit = cmd::cargo();
    unit.args(["test", "--no-fail-fast"]);
    steps.push(tests("unprivileged tests", &mut unit, &mut tally));

    steps.extend(fuzz_targets(&mut tally));

    let bin = build::agent(Profile::Debug);
    steps.push(Step {
        name: "build keyfence (debug)",
        ok: bin.is_ok(),
        note: bin
            .as_ref()
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default(),
    });

    let privileged = "privileged tests";
    match &bin {
        Ok(_) if !cmd::is_root() => {
            tally.failed += 1;
            steps.push(Step {
                name: privileged,
                ok: false,
                note: "they need root (BPF, namespaces): run `sudo -E cargo xtask test`".into(),
            });
        }
        Ok(bin) => {
            steps.push(privileged_tests(privileged, bin, &mut tally));
            steps.push(demo(&mut tally, false));
            steps.push(demo(&mut tally, true));
        }
        Err(_) => {
            tally.failed += 1;
            steps.push(Step {
                name: privileged,
                ok: false,
                note: "not run: keyfence did not build".into(),
            });
        }
    }

    steps.push(guest_stage(&mut tally));

    println!();
    for step in &steps {
        let status = if step.ok { "ok" } else { "FAILED" };
        if step.note.is_empty() {
            println!("test: {}: {status}", step.name);
        } else {
            println!("test: {}: {status} ({})", step.name, step.note);
        }
    }
    if !tally.failed_names.is_empty() {
        println!("failed tests: {}", tally.failed_names.join(", "));
    }
    println!("{} passed, {} failed", tally.passed, tally.failed);
    let failed: Vec<&str> = steps.iter().filter(|s| !s.ok).map(|s| s.name).collect();
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("failed: {}", failed.join(", "))
    }
}

/// Build the fuzz crate, then run each target for its time: one step (and one
/// test in the tally) per target.
fn fuzz_targets(tally: &mut Tally) -> Vec<Step> {
    let started = Instant::now();
    let outcomes = fuzz::build().and_then(|()| fuzz::run_all());
    println!("test: fuzz: {} s in all", started.elapsed().as_secs());
    match outcomes {
        Ok(outcomes) => outcomes
            .into_iter()
            .map(|o| {
                if o.ok {
                    tally.passed += 1;
                } else {
                    tally.failed += 1;
                }
                Step {
                    name: o.target,
                    ok: o.ok,
                    note: format!("fuzz: {}", o.note),
                }
            })
            .collect(),
        Err(e) => {
            tally.failed += 1;
            vec![Step {
                name: "fuzz",
                ok: false,
                note: format!("{e:#}"),
            }]
        }
    }
}

/// `cargo xtask demo` (with `fleet`, `--fleet`: about 40 s more), exactly as
/// a user runs it (release build included): it fails when any attempt ends
/// otherwise than the demo says it will.
fn demo(tally: &mut Tally, fleet: bool) -> Step {
    let (name, flag) = if fleet {
        ("demo-fleet", " --fleet")
    } else {
        ("demo", "")
    };
    println!("test: {name}: cargo xtask demo{flag}");
    let started = Instant::now();
    let result = demo::run(fleet);
    let took = started.elapsed().as_secs();
    if result.is_ok() {
        tally.passed += 1;
    } else {
        tally.failed += 1;
    }
    Step {
        name,
        ok: result.is_ok(),
        note: match result {
            Ok(()) => format!("{took} s"),
            Err(e) => format!("{e:#}"),
        },
    }
}

/// The guest-kernel stage (see `guest.rs`): its own pass/fail count, and a
/// failure (never a skip) when it cannot run, so a red guest cannot hide.
pub fn guest_stage(tally: &mut Tally) -> Step {
    let name = "guest kernel 6.1 (prog_fixtures, prog_differential, e2e_datapath, e2e_tc, e2e_datapath_log)";
    if !cmd::is_root() {
        tally.failed += 1;
        return Step {
            name,
            ok: false,
            note: "it needs root (qemu, BPF in the guest): run `sudo -E cargo xtask test`".into(),
        };
    }
    let mut mine = Tally::default();
    let outcome = crate::guest::run(&mut |line| mine.add_line(line));
    let ok = outcome.error.is_none() && mine.failed == 0;
    if !ok && mine.failed == 0 {
        mine.failed = 1;
    }
    tally.absorb(&mine);
    let mut note = format!("{}, {} s", mine.summary(), outcome.seconds);
    if let Some(e) = outcome.error {
        let _ = write!(note, "; {e}");
    }
    Step { name, ok, note }
}

/// `cargo xtask guest`: setup, then only the guest-kernel stage.
pub fn guest_only() -> anyhow::Result<()> {
    crate::setup::run()?;
    let mut tally = Tally::default();
    let step = guest_stage(&mut tally);
    let status = if step.ok { "ok" } else { "FAILED" };
    println!("test: {}: {status} ({})", step.name, step.note);
    if !tally.failed_names.is_empty() {
        println!("failed tests: {}", tally.failed_names.join(", "));
    }
    println!("{} passed, {} failed", tally.passed, tally.failed);
    if step.ok {
        Ok(())
    } else {
        bail!("failed: {}", step.name)
    }
}

/// Every test binary runs even when one fails (`--no-fail-fast`): one red file
/// must not hide the others' results.
fn privileged_tests(name: &'static str, bin: &Path, tally: &mut Tally) -> Step {
    let mut cmd = cmd::cargo();
    cmd.env("KEYFENCE_BIN", bin)
        .args([
            "test",
            "--no-fail-fast",
            "--package",
            "keyfence-tests",
            "--",
        ])
        .arg("--test-threads=1");
    tests(name, &mut cmd, tally)
}

/// A step whose success is its exit status.
fn plain(name: &'static str, cmd: &mut std::process::Command) -> Step {
    println!("test: {name}: {}", cmd::display(cmd));
    match cmd::run(cmd) {
        Ok(()) => Step {
            name,
            ok: true,
            note: String::new(),
        },
        Err(e) => Step {
            name,
            ok: false,
            note: format!("{e:#}"),
        },
    }
}

/// A `cargo test` step: its result lines go into `tally`. A failure that left no
/// failed test behind (a build error, a crashed test binary) counts as one failed
/// test, so the summary line never reads `0 failed` for a red run.
fn tests(name: &'static str, cmd: &mut std::process::Command, tally: &mut Tally) -> Step {
    println!("test: {name}: {}", cmd::display(cmd));
    let mut mine = Tally::default();
    let outcome = cmd::run_streaming(cmd, |line| mine.add_line(line));
    let (ok, note) = match outcome {
        Ok(true) => (true, String::new()),
        Ok(false) => (false, "cargo test exited non-zero".to_owned()),
        Err(e) => (false, format!("{e:#}")),
    };
    if !ok && mine.failed == 0 {
        mine.failed = 1;
    }
    tally.absorb(&mine);
    Step {
        name,
        ok,
        note: if note.is_empty() {
            mine.summary()
        } else {
            format!("{}; {note}", mine.summary())
        },
    }
}

#[cfg(test)]
mod tests {
    use super::Tally;

    #[test]
    fn sums_result_lines_and_ignores_the_rest() {
        let mut tally = Tally::default();
        for line in [
            "running 3 tests",
            "test a ... ok",
            "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s",
            "test result: FAILED. 5 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.20s",
            "test passed_and_failed_names ... ok",
            "test e2e_tc_restart ... FAILED",
            "test a_result_line ... FAILED trailing words",
        ] {
            tally.add_line(line);
        }
        assert_eq!(
            tally,
            Tally {
                passed: 8,
                failed: 2,
                failed_names: vec!["e2e_tc_restart".to_owned()],
            }
        );
        assert_eq!(tally.summary(), "8 passed, 2 failed: e2e_tc_restart");
    }
}
