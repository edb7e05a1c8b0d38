//! Policy → datapath: full and incremental applies, the capacity check the
//! API asks before it commits, and what happens when the kernel refuses a
//! write (fail open where needed, then reconcile with back-off).

use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;

use super::Daemon;
use crate::{
    keys::Key,
    management::api::EnforceError,
    maps::policy::CapacityError,
    metrics,
    policy::{self, PolicyState},
    store::StoredKey,
};

/// After a failed datapath write, the first full reconcile comes this soon;
/// each failure doubles the wait, up to `RECONCILE_MAX`.
const RECONCILE_FIRST: Duration = Duration::from_millis(500);
const RECONCILE_MAX: Duration = Duration::from_secs(30);

/// Map writes from which an apply hands freed memory back to the kernel.
const BIG_APPLY: usize = 10_000;

impl Daemon {
    /// Whether the datapath can hold `key` in its new state (the API asks
    /// before it commits). Changes nothing.
    pub(super) fn check_key(&mut self, key: &StoredKey) -> Result<Duration, EnforceError> {
        let started = Instant::now();
        let Some(dp) = self.datapath.as_ref() else {
            // No datapath: the shim alone enforces and has no map to fill.
            return Ok(started.elapsed());
        };
        let old = self.stored.get(&key.id);
        let new = Some(key).filter(|k| k.is_active());
        let now = SystemTime::now();
        let full_check =
            |state: &PolicyState| tokio::task::block_in_place(|| dp.check_apply(&state.compiled()));
        let result =
            if self.reconcile.is_some() || self.policy.next_change().is_some_and(|t| now >= t) {
                // The next write is a full apply: check the whole policy.
                let mut accesses: Vec<&Key> = self
                    .statics
                    .iter()
                    .map(AsRef::as_ref)
                    .chain(
                        self.stored
                            .iter()
                            .filter(|k| k.id != key.id)
                            .map(AsRef::as_ref),
                    )
                    .collect();
                accesses.extend(new.map(|k| &*k.key));
                full_check(&PolicyState::build(&self.config.listeners, &accesses, now))
            } else {
                self.policy.preview_key(
                    old.map(AsRef::as_ref),
                    new.map(|k| &*k.key),
                    now,
                    |state, change| {
                        if !change.reshaped
                            && let Some(()) = dp.check_changes(&change.restricted)?
                        {
                            return Ok(());
                        }
                        full_check(state)
                    },
                )
            };
        result
            .map(|()| started.elapsed())
            .map_err(|e| match e.downcast::<CapacityError>() {
                Ok(full) => EnforceError::Full(full),
                Err(e) => EnforceError::Datapath(e),
            })
    }

    /// Compile the current config and store and make the datapath enforce
    /// it. On failure the previous policy stays.
    pub(super) fn apply_policy(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut phases = crate::phases::Phases::start();
        let state =
            PolicyState::build(&self.config.listeners, &self.key_facts(), SystemTime::now());
        phases.done("policy compiled");
        // Kept only once enforced: a failed reload goes back to the old state.
        let previous = std::mem::replace(&mut self.policy, state);
        if let Err(e) = self.enforce() {
            self.policy = previous;
            // A capacity refusal wrote nothing: the maps still hold the old
            // state (a refused reload changes nothing). Any other failure may
            // have stopped half-way; a failed reconcile must be retried.
            if (e.downcast_ref::<CapacityError>().is_none() || self.reconcile.is_some())
                && let Err(open) = self.datapath_failed(&e)
            {
                tracing::error!(error = %format!("{open:#}"), "failing open");
            }
            return Err(e);
        }
        self.record_policy(started);
        Ok(())
    }

    /// Make the datapath enforce `self.policy` with a full apply (which
    /// brings the maps back in sync).
    pub(super) fn enforce(&mut self) -> anyhow::Result<()> {
        let mut phases = crate::phases::Phases::start();
        let compiled = self.policy.compiled();
        phases.done("policy listed");
        self.write(&compiled)?;
        phases.done("maps written");
        self.datapath_in_sync();
        Ok(())
    }

    /// Key and prefix gauges, warnings about listeners nothing can reach, and
    /// the time since `started` as one policy apply.
    pub(super) fn record_policy(&self, started: Instant) {
        let key_count = self.config.keys.len() + self.stored.len();
        self.metrics
            .keys
            .set(i64::try_from(key_count).unwrap_or(i64::MAX));
        self.metrics.policy_prefixes.clear();
        for (listener, count) in self.policy.prefix_counts() {
            self.metrics
                .policy_prefixes
                .get_or_create(&metrics::ListenerLabel {
                    listener: listener.to_owned(),
                })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        for listener in self.policy.unreachable() {
            tracing::warn!(
                listener,
                "no key this listener accepts allows any address: its packets are all dropped"
            );
        }
        self.metrics
            .policy_apply_seconds
            .observe(started.elapsed().as_secs_f64());
    }

    /// Write prefix changes of restricted listeners alone. `false`: the
    /// datapath needs a full apply instead.
    pub(super) fn write_changes(
        &mut self,
        changes: &[(String, crate::prefixset::Change)],
    ) -> anyhow::Result<bool> {
        let Some(dp) = self.datapath.as_mut() else {
            return Ok(true);
        };
        let Some(report) = tokio::task::block_in_place(|| dp.apply_changes(changes))? else {
            return Ok(false);
        };
        tracing::info!(
            added = report.added,
            removed = report.removed,
            updated = report.updated,
            "policy applied"
        );
        Ok(true)
    }

    fn write(&mut self, compiled: &policy::CompiledPolicy) -> anyhow::Result<()> {
        let Some(dp) = self.datapath.as_mut() else {
            return Ok(());
        };
        // Every full apply carries the current `datapath.unparsed`, so a
        // reload that changes only the setting takes effect too.
        dp.set_unparsed(self.config.datapath.unparsed);
        // Map writes are syscalls (about 2 µs each; a million prefixes take
        // seconds): let the runtime move other tasks off this worker.
        let report = tokio::task::block_in_place(|| dp.apply(compiled))?;
        tracing::info!(
            added = report.added,
            removed = report.removed,
            updated = report.updated,
            "policy applied"
        );
        // A big apply leaves big freed temporaries; a small one (an API
        // change) is not worth the heap walk.
        if report.added + report.removed + report.updated >= BIG_APPLY {
            crate::sys::release_free_memory();
        }
        Ok(())
    }

    pub(super) fn attach(&mut self) -> anyhow::Result<()> {
        if let Some(dp) = self.datapath.as_mut() {
            dp.set_tc_attach(self.config.datapath.tc_attach);
            dp.attach(&self.config.datapath.interfaces, self.config.datapath.mode)?;
        }
        Ok(())
    }

    /// A datapath write failed (or was refused) while `self.policy` is what
    /// the shim enforces: open, in the datapath, every listener whose
    /// entries do not cover that policy, so no source the shim accepts is
    /// dropped; report out of sync (`keyfence_datapath_in_sync` 0, `/readyz`
    /// degraded); schedule a full reconcile with back-off. `Err` only when
    /// even opening the listeners failed.
    pub(super) fn datapath_failed(&mut self, error: &anyhow::Error) -> anyhow::Result<()> {
        self.metrics.datapath_write_failures.inc();
        self.metrics.datapath_in_sync.set(0);
        let wait = self
            .reconcile
            .map_or(RECONCILE_FIRST, |(_, wait)| (wait * 2).min(RECONCILE_MAX));
        self.reconcile = Some((Instant::now() + wait, wait));
        tracing::error!(
            error = %format!("{error:#}"),
            retry_in_ms = wait.as_millis(),
            "the datapath does not match the policy: failing open where needed, reconciling"
        );
        let compiled = self.policy.compiled();
        let Some(dp) = self.datapath.as_mut() else {
            return Ok(());
        };
        let opened = tokio::task::block_in_place(|| dp.open_uncovered(&compiled))
            .context("opening listeners in the datapath after a failed write")?;
        if !opened.is_empty() {
            tracing::warn!(
                listeners = ?opened,
                "listeners open in the datapath until the reconcile succeeds; the shim still \
                 enforces every key"
            );
        }
        Ok(())
    }

    /// A full reconcile: read the maps back, diff against a fresh compile,
    /// write. A failure schedules the next one (longer back-off).
    pub(super) fn reconcile(&mut self) -> anyhow::Result<()> {
        tracing::info!("reconciling the datapath with the policy");
        let resync = self
            .datapath
            .as_mut()
            .map_or(Ok(()), |dp| tokio::task::block_in_place(|| dp.resync()));
        if let Err(e) = resync {
            // Reading failed: nothing was written, try again later.
            let _ = self.datapath_failed(&e);
            return Err(e);
        }
        self.apply_policy()
    }

    /// The maps match `self.policy` again.
    fn datapath_in_sync(&mut self) {
        if self.reconcile.take().is_some() {
            tracing::info!("the datapath matches the policy again");
        }
        self.metrics.datapath_in_sync.set(1);
    }
}
