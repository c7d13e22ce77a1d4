//! Metering: per-cell CPU, memory and wall time in intervals, from the
//! backend's usage counters, written to the store for per-second billing.
//! A counter that went backwards (a restarted workload) starts afresh.

use super::*;

impl Supervisor {
    /// Sample one running cell and record the interval since its mark.
    pub(super) async fn meter_cell(&self, rec: &CellRecord, handle: &CellHandle) {
        let Some(backend) = self.backends.get(&rec.isolation) else {
            return;
        };
        let Ok(usage) = backend.usage(handle).await else {
            return;
        };
        let Some(interval) = self
            .interval_for(rec, usage.cpu_ns, usage.memory_bytes)
            .await
        else {
            return;
        };
        if let Err(e) = self.db(move |s| s.record_usage(&[interval])).await {
            tracing::warn!("metering {}: {e}", rec.id);
        }
    }

    pub(super) async fn interval_for(
        &self,
        rec: &CellRecord,
        cpu_ns: u64,
        memory_bytes: u64,
    ) -> Option<UsageInterval> {
        let now = now_ms();
        let known = lock(&self.marks).get(&rec.id).copied();
        let mark = match known {
            Some(m) => m,
            None => {
                // After a restart: resume from the last recorded interval.
                let idc = rec.id.clone();
                let t = self.db(move |s| s.usage_totals(&idc)).await.ok()?;
                Mark {
                    at_ms: t.last_end_ms.unwrap_or(rec.created_at),
                    cpu_ns: t.last_cpu_ns_counter.unwrap_or(0),
                }
            }
        };
        lock(&self.marks).insert(rec.id.clone(), Mark { at_ms: now, cpu_ns });
        if now <= mark.at_ms {
            return None;
        }
        let secs = (now - mark.at_ms) as f64 / 1000.0;
        // A counter that went backwards was reset (cell restarted): the
        // whole new value is this interval's.
        let cpu = cpu_ns.checked_sub(mark.cpu_ns).unwrap_or(cpu_ns);
        Some(UsageInterval {
            cell_id: rec.id.clone(),
            owner: rec.owner.clone(),
            start_ms: mark.at_ms,
            end_ms: now,
            cpu_ns_counter: cpu_ns,
            cpu_seconds: cpu as f64 / 1e9,
            memory_byte_seconds: memory_bytes as f64 * secs,
            wall_seconds: secs,
        })
    }

    /// One metering pass over every running cell: one store commit.
    pub async fn meter_once(&self) -> Result<usize> {
        let rows = self.db(|s| s.list_lenient()).await?;
        let mut intervals = Vec::new();
        for rec in rows.into_iter().flatten() {
            if rec.observed != Observed::Running || lock(&self.busy).contains(&rec.id) {
                continue;
            }
            let Some(backend) = self.backends.get(&rec.isolation) else {
                continue;
            };
            let Ok(handle) = self.handle_of(&rec) else {
                continue;
            };
            let Ok(u) = backend.usage(&handle).await else {
                continue;
            };
            if let Some(iv) = self.interval_for(&rec, u.cpu_ns, u.memory_bytes).await {
                intervals.push(iv);
            }
        }
        let n = intervals.len();
        self.db(move |s| s.record_usage(&intervals)).await?;
        Ok(n)
    }
}
