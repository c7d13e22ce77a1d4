//! The reaper and reconcile: bring every row not held by a request to
//! its desired state after a crash or on a timer (rules in
//! `docs/supervisor.md`; `tests/reconcile.rs` drives every combination).

use super::*;

/// What one reconcile pass did (also logged and exported as metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReconcileSummary {
    pub adopted: u32,
    pub exited: u32,
    pub rolled_back: u32,
    pub destroys_finished: u32,
    /// Stops interrupted between their intent and their effect, finished.
    pub stops_finished: u32,
    pub reaped: u32,
    pub lost: u32,
    pub orphans: u32,
    pub errors: u32,
}

impl Supervisor {
    /// Destroy every cell whose lease has ended. Each in its own task, so
    /// one slow teardown does not hold up the rest.
    pub async fn reap_once(self: &Arc<Self>) -> Result<usize> {
        let now = now_ms();
        let expired = self.db(move |s| s.expired(now)).await?;
        let mut tasks = tokio::task::JoinSet::new();
        for rec in expired {
            let Some(guard) = self.try_lock(&rec.id) else {
                continue;
            };
            let this = self.clone();
            tasks.spawn(async move {
                let _guard = guard;
                this.reap(rec).await
            });
        }
        let mut n = 0;
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(Ok(())) => n += 1,
                Ok(Err(e)) => tracing::warn!("reaping: {e}"),
                Err(e) => tracing::warn!("reaper task: {e}"),
            }
        }
        Ok(n)
    }

    pub(super) async fn reap(&self, rec: CellRecord) -> Result<()> {
        // Re-read under the slot.
        let idc = rec.id.clone();
        let Some(rec) = self.db(move |s| s.get(&idc)).await? else {
            return Ok(());
        };
        if rec.expires_at > now_ms() {
            return Ok(()); // extended meanwhile
        }
        let data = json!({ "expiresAt": rfc3339_ms(rec.expires_at) });
        let idc = rec.id.clone();
        self.db(move |s| s.append_event(&idc, kinds::EXPIRED, &data))
            .await?;
        clean(self.teardown(&rec, "lease expired").await?)?;
        self.counters.leases_reaped.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// One reconcile pass; the rules are in `docs/supervisor.md`.
    pub async fn reconcile_once(self: &Arc<Self>) -> ReconcileSummary {
        let mut sum = ReconcileSummary::default();
        self.counters
            .reconcile_passes
            .fetch_add(1, Ordering::Relaxed);
        // Host objects first, rows second (see docs/supervisor.md).
        let mut objects: Vec<(Arc<dyn Backend>, cellhost_core::ListedCell)> = Vec::new();
        for b in self.backends.values() {
            match b.list().await {
                Ok(l) => objects.extend(l.into_iter().map(|c| (b.clone(), c))),
                Err(e) => {
                    sum.errors += 1;
                    tracing::warn!("reconcile: listing {} cells: {e}", b.isolation());
                }
            }
        }
        let rows = match self.db(|s| s.list_lenient()).await {
            Ok(r) => r,
            Err(e) => {
                sum.errors += 1;
                tracing::error!("reconcile: reading the store: {e}");
                return sum;
            }
        };
        let mut recorded = HashSet::new();
        // Orphans whose teardown left something: their leases stay.
        let mut kept = HashSet::new();
        for row in rows {
            let rec = match row {
                Ok(r) => r,
                Err(e) => {
                    sum.errors += 1;
                    tracing::error!("reconcile: {e}");
                    continue;
                }
            };
            recorded.insert(rec.id.clone());
            let Some(guard) = self.try_lock(&rec.id) else {
                continue;
            };
            if let Err(e) = self.reconcile_row(&rec.id, &mut sum).await {
                sum.errors += 1;
                tracing::warn!("reconcile {}: {e}", rec.id);
                let (idc, msg) = (rec.id.clone(), e.public_message());
                let _ = self.db(move |s| s.set_error(&idc, &msg)).await;
            }
            drop(guard);
        }
        for (backend, obj) in objects {
            if recorded.contains(&obj.id) {
                continue;
            }
            let Some(_guard) = self.try_lock(&obj.id) else {
                continue;
            };
            let idc = obj.id.clone();
            match self.db(move |s| s.get(&idc)).await {
                Ok(None) => {}
                Ok(Some(_)) => continue, // a create wrote its row meanwhile
                Err(_) => {
                    sum.errors += 1;
                    continue;
                }
            }
            let mut handle = backend.found_handle(&obj.id);
            // The address it was leased, for its network's teardown.
            let idc = obj.id.clone();
            if let Ok(Some(lease)) = self.db(move |s| s.lease_of(&idc)).await {
                handle.address = Some(lease.address);
            }
            let destroyed = backend.destroy(&handle).await;
            if destroyed.as_ref().map_or(true, |r| !r.is_clean()) {
                kept.insert(obj.id.clone());
            }
            match destroyed {
                Ok(report) if report.already_gone => {}
                Ok(report) => {
                    sum.orphans += 1;
                    self.counters
                        .orphans_destroyed
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!("destroyed orphan {}: {}", obj.id, report.summary());
                    let data = serde_json::to_value(&report).unwrap_or_default();
                    let idc = obj.id.clone();
                    if let Err(e) = self
                        .db(move |s| s.append_event(&idc, kinds::ORPHAN_DESTROYED, &data))
                        .await
                    {
                        tracing::warn!("recording orphan {}: {e}", obj.id);
                    }
                    self.notify();
                }
                Err(e) => {
                    sum.errors += 1;
                    tracing::warn!("destroying orphan {}: {e}", obj.id);
                }
            }
        }
        // After the orphans: the ranges of those just destroyed go back in
        // this pass, not the next one (which a stopped daemon never runs).
        self.sweep_uids(&recorded, &mut sum).await;
        kept.extend(recorded);
        self.sweep_network_leases(&kept, &mut sum).await;
        if sum.errors > 0 {
            self.counters
                .reconcile_errors
                .fetch_add(u64::from(sum.errors), Ordering::Relaxed);
        }
        if sum != ReconcileSummary::default() {
            tracing::info!(?sum, "reconcile");
        }
        self.reconciled.send_modify(|n| *n += 1);
        sum
    }

    /// Give back host ports and addresses of this store whose cell has no
    /// row and no host object left (`kept`: the recorded cells and the
    /// orphans whose teardown was not clean): a create cut short, a cell
    /// found gone, an orphan just destroyed.
    pub(super) async fn sweep_network_leases(
        &self,
        kept: &HashSet<CellId>,
        sum: &mut ReconcileSummary,
    ) {
        let held = self
            .db(|s| {
                let mut ids: Vec<CellId> = s.leases()?.into_iter().map(|l| l.cell).collect();
                ids.extend(s.port_holders()?);
                Ok(ids)
            })
            .await;
        let mut held = match held {
            Ok(h) => h,
            Err(e) => {
                sum.errors += 1;
                tracing::warn!("reconcile: reading network leases: {e}");
                return;
            }
        };
        held.sort();
        held.dedup();
        for cell in held {
            if kept.contains(&cell) {
                continue;
            }
            let Some(_guard) = self.try_lock(&cell) else {
                continue;
            };
            let idc = cell.clone();
            if matches!(self.db(move |s| s.get(&idc)).await, Ok(None))
                && let Err(e) = self.release_network(&cell).await
            {
                sum.errors += 1;
                tracing::warn!("reconcile: releasing {cell}'s ports and address: {e}");
            }
        }
    }

    /// Give back uid leases and claims of this store whose
    /// cell has no row (a create that crashed between leasing and
    /// recording), uids once no process runs as any id of the range.
    pub(super) async fn sweep_uids(&self, recorded: &HashSet<CellId>, sum: &mut ReconcileSummary) {
        let leases = match self.db(|s| s.uid_leases()).await {
            Ok(l) => l,
            Err(e) => {
                sum.errors += 1;
                tracing::warn!("reconcile: reading uid leases: {e}");
                return;
            }
        };
        for l in &leases {
            if recorded.contains(&l.cell) {
                continue;
            }
            let Some(_guard) = self.try_lock(&l.cell) else {
                continue;
            };
            let idc = l.cell.clone();
            if !matches!(self.db(move |s| s.get(&idc)).await, Ok(None)) {
                continue;
            }
            let left = cellhost_host::uids::processes_in(l.range);
            if !left.is_empty() {
                sum.errors += 1;
                tracing::warn!(
                    "uids {} of gone cell {} still run {} process(es); kept",
                    l.range,
                    l.cell,
                    left.len()
                );
                continue;
            }
            self.release_uids(&l.cell, Some(l.range)).await;
        }
        let leased: HashSet<&CellId> = leases.iter().map(|l| &l.cell).collect();
        for (base, cell) in self.claims.ours() {
            if leased.contains(&cell) || recorded.contains(&cell) {
                continue;
            }
            if let Some(_guard) = self.try_lock(&cell) {
                let range = UidRange {
                    base,
                    size: UidRange::CELL_SIZE,
                };
                if cellhost_host::uids::processes_in(range).is_empty() {
                    self.claims.release(&cell, range);
                }
            }
        }
    }

    /// Wait until a reconcile pass has finished since start: rows then say
    /// what the host holds (interrupted creates rolled back, lost cells
    /// marked), not what a crash left.
    pub async fn reconciled(&self) {
        let mut rx = self.reconciled.subscribe();
        let _ = rx.wait_for(|n| *n > 0).await;
    }

    /// Bring one row (whose slot the caller holds) to its desired state.
    pub(super) async fn reconcile_row(
        &self,
        id: &CellId,
        sum: &mut ReconcileSummary,
    ) -> Result<()> {
        let idc = id.clone();
        let Some(rec) = self.db(move |s| s.get(&idc)).await? else {
            return Ok(());
        };
        if rec.desired == Desired::Destroyed
            || matches!(rec.observed, Observed::Destroying | Observed::Failed)
        {
            clean(
                self.teardown(&rec, "finishing an interrupted destroy")
                    .await?,
            )?;
            sum.destroys_finished += 1;
            return Ok(());
        }
        if rec.observed == Observed::Creating {
            // Secrets are never stored: an interrupted create cannot be
            // finished, only rolled back.
            let idc = rec.id.clone();
            self.db(move |s| {
                s.append_event(
                    &idc,
                    kinds::ROLLED_BACK,
                    &json!({ "reason": "interrupted create" }),
                )
            })
            .await?;
            clean(
                self.teardown(&rec, "rolling back an interrupted create")
                    .await?,
            )?;
            self.counters.rolled_back.fetch_add(1, Ordering::Relaxed);
            sum.rolled_back += 1;
            return Ok(());
        }
        if rec.expires_at <= now_ms() {
            self.reap(rec).await?;
            sum.reaped += 1;
            return Ok(());
        }
        let backend = self.backend(rec.isolation)?.clone();
        let handle = self.handle_of(&rec)?;
        let status = backend.status(&handle).await?;
        match status.state {
            CellState::Running if rec.desired == Desired::Stopped => {
                // A stop was interrupted between its intent and its effect.
                self.finish_stop(&rec, &handle, &backend, None).await?;
                sum.stops_finished += 1;
            }
            CellState::Running => {
                let first = lock(&self.adopted).insert(rec.id.clone());
                if first || rec.observed != Observed::Running {
                    self.record(
                        &rec.id,
                        Change::event(kinds::ADOPTED, json!({ "pid": status.pid }))
                            .observed(Observed::Running),
                    )
                    .await?;
                    sum.adopted += 1;
                }
            }
            CellState::Exited if rec.observed != Observed::Exited => {
                let exit = status.exit.unwrap_or_else(ExitInfo::unknown);
                let data = serde_json::to_value(exit).unwrap_or_default();
                self.record(
                    &rec.id,
                    Change::event(kinds::EXITED, data)
                        .observed(Observed::Exited)
                        .exit(exit),
                )
                .await?;
                lock(&self.marks).remove(&rec.id);
                sum.exited += 1;
                if let Err(e) = backend.release(&handle).await {
                    tracing::warn!("releasing exited cell {}: {e}", rec.id);
                }
            }
            CellState::Gone => {
                // Not torn down by us: its ports and address stay leased
                // until a sweep finds nothing of it left.
                let idc = rec.id.clone();
                self.db(move |s| {
                    s.remove_lost(
                        &idc,
                        kinds::LOST,
                        &json!({ "reason": "its host objects are gone" }),
                    )
                })
                .await?;
                if let Some(r) = handle.uids {
                    self.claims.release(&rec.id, r);
                }
                self.forget(&rec.id);
                self.notify();
                sum.lost += 1;
            }
            _ => {}
        }
        Ok(())
    }

    /// The supervisor's background work until `shutdown` turns true:
    /// the first reconcile pass, then the reaper, reconcile and metering
    /// loops.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut reap = tokio::time::interval(self.cfg.reap_interval);
        let mut reconcile = tokio::time::interval(self.cfg.reconcile_interval);
        let mut meter = tokio::time::interval(self.cfg.meter_interval);
        for t in [&mut reap, &mut reconcile, &mut meter] {
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    if *shutdown.borrow() { return; }
                }
                _ = reap.tick() => {
                    if let Err(e) = self.reap_once().await {
                        tracing::warn!("reaper: {e}");
                    }
                }
                _ = reconcile.tick() => {
                    self.reconcile_once().await;
                }
                _ = meter.tick() => {
                    if let Err(e) = self.meter_once().await {
                        tracing::warn!("metering: {e}");
                    }
                }
            }
        }
    }
}
