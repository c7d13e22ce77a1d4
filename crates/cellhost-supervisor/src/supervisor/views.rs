//! What callers read: cells as the API shows them (`CellView`), lists,
//! events, counts and the node's status. Reads only; a tenant sees only
//! its own cells.

use super::*;

/// A cell as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CellView {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub isolation: String,
    /// What the supervisor is driving it to: running | stopped | destroyed.
    pub desired: String,
    /// What was last observed: creating | created | running | exited |
    /// destroying | gone | failed.
    pub observed: String,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339: end of the lease.
    pub expires_at: String,
    /// Seconds left on the lease (0 when ended).
    pub expires_in_seconds: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub exit: Option<ExitInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The document, with inline secret values redacted.
    #[schema(value_type = Object)]
    pub document: Cell,
    /// Metered totals (inspect only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageView>,
    /// What the tier says about its host objects: e.g. the accelerator
    /// (kvm | tcg) and the image's sha256 digests of a vm or microvm cell,
    /// the container's name. Never secrets.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub tier_details: Option<serde_json::Value>,
}

/// Metered totals of one cell: what per-second billing reads.
#[derive(Debug, Clone, Copy, Default, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageView {
    pub intervals: u64,
    pub cpu_seconds: f64,
    pub memory_byte_seconds: f64,
    pub wall_seconds: f64,
}

impl From<UsageTotals> for UsageView {
    fn from(t: UsageTotals) -> Self {
        UsageView {
            intervals: t.intervals,
            cpu_seconds: t.cpu_seconds,
            memory_byte_seconds: t.memory_byte_seconds,
            wall_seconds: t.wall_seconds,
        }
    }
}

impl CellView {
    pub(super) fn from_record(r: &CellRecord, now: i64, usage: Option<UsageView>) -> CellView {
        CellView {
            id: r.id.to_string(),
            name: r.name.clone(),
            owner: r.owner.clone(),
            isolation: r.isolation.to_string(),
            desired: r.desired.as_str().to_string(),
            observed: r.observed.as_str().to_string(),
            created_at: rfc3339_ms(r.created_at),
            expires_at: rfc3339_ms(r.expires_at),
            expires_in_seconds: u64::try_from((r.expires_at - now).max(0) / 1000).unwrap_or(0),
            exit: r.exit,
            last_error: r.last_error.clone(),
            document: r.document.clone(),
            usage,
            tier_details: r
                .handle
                .as_ref()
                .map(|h| h.tier.clone())
                .filter(|t| !t.is_null()),
        }
    }
}

/// Merge `live` into `into`, one level deep: objects under the same key
/// are merged key by key, anything else is replaced.
fn merge_details(into: &mut serde_json::Value, live: serde_json::Value) {
    let (Some(into), serde_json::Value::Object(live)) = (into.as_object_mut(), live) else {
        return;
    };
    for (k, v) in live {
        match (into.get_mut(&k), v) {
            (Some(serde_json::Value::Object(old)), serde_json::Value::Object(new)) => {
                old.extend(new);
            }
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

impl Supervisor {
    pub async fn get(&self, caller: &Caller, id: &str) -> Result<CellView> {
        let rec = self.visible(caller, id).await?;
        let idc = rec.id.clone();
        let usage = self.db(move |s| s.usage_totals(&idc)).await?;
        let mut view = CellView::from_record(&rec, now_ms(), Some(usage.into()));
        if let (Some(h), Some(b)) = (&rec.handle, self.backends.get(&rec.isolation))
            && let Ok(Some(live)) = b.live_details(h).await
        {
            merge_details(view.tier_details.get_or_insert(serde_json::json!({})), live);
        }
        Ok(view)
    }

    pub async fn list(&self, caller: &Caller) -> Result<Vec<CellView>> {
        let rows = self.db(|s| s.list_lenient()).await?;
        let now = now_ms();
        Ok(rows
            .into_iter()
            .filter_map(|r| match r {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!("skipping a corrupt cell row: {e}");
                    None
                }
            })
            .filter(|r| caller.may_see(Some(&r.owner)))
            .map(|r| CellView::from_record(&r, now, None))
            .collect())
    }

    /// Events after `after` the caller may see, oldest first, up to `limit`
    /// (scanned; a tenant's page may be shorter). Returns the events and the
    /// cursor to resume from.
    pub async fn events(
        &self,
        caller: &Caller,
        after: i64,
        limit: u32,
    ) -> Result<(Vec<CloudEvent>, i64)> {
        let events = self.db(move |s| s.events_since(after, limit)).await?;
        let cursor = events.last().map_or(after, |e| e.id);
        let node = &self.cfg.node_name;
        Ok((
            events
                .iter()
                .filter(|e| caller.may_see(e.owner.as_deref()))
                .map(|e| CloudEvent::from_event(e, node))
                .collect(),
            cursor,
        ))
    }

    /// Cells in the store, and how many run.
    pub async fn cell_counts(&self) -> Result<CellCounts> {
        let rows = self.db(|s| s.list_lenient()).await?;
        let mut counts = CellCounts::default();
        for r in rows.iter().flatten() {
            counts.total += 1;
            if r.observed == Observed::Running {
                counts.running += 1;
            }
        }
        Ok(counts)
    }

    pub async fn node(&self) -> Result<NodeStatus> {
        let sample = self.host.sample();
        let counts = self.cell_counts().await?;
        let reserved = self.reserved();
        let state_dir = self.cfg.state_dir.clone();
        let disk = tokio::task::spawn_blocking(move || HostInfo::disk_for(&state_dir))
            .await
            .ok()
            .flatten();
        Ok(NodeStatus {
            name: self.cfg.node_name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            kernel: sysinfo::System::kernel_version(),
            uptime_seconds: sysinfo::System::uptime(),
            cpu: CpuStatus {
                logical: sample.cpus,
                usage_percent: sample.cpu_usage,
                load_average: HostInfo::load_average(),
            },
            memory: sample.memory,
            disk,
            capacity: self.capacity,
            reserved,
            free: self.capacity.free(reserved),
            tiers: self.tiers().iter().map(|t| t.to_string()).collect(),
            cells: counts,
        })
    }

    /// Rows of the store by tier and observed state, for `/metrics`.
    pub async fn cell_states(&self) -> Result<Vec<(String, String, usize)>> {
        let rows = self.db(|s| s.list_lenient()).await?;
        let mut m: HashMap<(String, String), usize> = HashMap::new();
        for r in rows.iter().flatten() {
            *m.entry((r.isolation.to_string(), r.observed.as_str().to_string()))
                .or_default() += 1;
        }
        let mut v: Vec<_> = m.into_iter().map(|((a, b), n)| (a, b, n)).collect();
        v.sort();
        Ok(v)
    }

    /// Was cell `id` extended for `request` ([`Supervisor::extend_for`])?
    /// Read from its `extended` events, so the answer holds after the
    /// cell is gone.
    pub async fn extended_for(&self, caller: &Caller, id: &str, request: &str) -> Result<bool> {
        let Ok(id) = CellId::parse(id) else {
            return Ok(false);
        };
        let events = self
            .db(move |s| s.cell_events(&id, kinds::EXTENDED))
            .await?;
        Ok(events
            .iter()
            .any(|e| caller.may_see(e.owner.as_deref()) && e.data["request"] == request))
    }
}
