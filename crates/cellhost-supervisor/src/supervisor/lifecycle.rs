//! A cell's life on request: create (admit, lease, record, make, start,
//! roll back on failure), start, stop, extend, destroy, exec and logs.
//! Each step writes the desired state before its side effect and the
//! observed state after it (see the parent module).

use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

use cellhost_core::AddressPool;
use cellhost_store::{LeaseOutcome, PortRefusal};

use super::*;

/// How [`Supervisor::create_with`] makes a cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Start the workload once it is made.
    pub start: bool,
    /// Where `spec.ports` entries with host port 0 get theirs: this range
    /// within the policy's `ports` (the market's `portRange`); `None`: the
    /// policy's whole range.
    pub host_ports: Option<RangeInclusive<u16>>,
}

impl Supervisor {
    /// Admit, record, create and (unless `start` is false) start a cell.
    /// `cell` must be validated; `confidential` holds its secret values and
    /// volume key.
    pub async fn create(
        self: &Arc<Self>,
        caller: &Caller,
        cell: Cell,
        confidential: Confidential,
        start: bool,
    ) -> Result<CellView> {
        let opts = CreateOptions {
            start,
            host_ports: None,
        };
        self.create_with(caller, cell, confidential, opts).await
    }

    /// [`Supervisor::create`] with every option.
    pub async fn create_with(
        self: &Arc<Self>,
        caller: &Caller,
        cell: Cell,
        confidential: Confidential,
        opts: CreateOptions,
    ) -> Result<CellView> {
        caller.must_have_paid("create a cell")?;
        let mut cell = cell;
        self.admit_document(&mut cell)?;
        let backend = self.backend(cell.spec.isolation)?.clone();
        let want = Reservation::of(&cell.spec, &self.cfg.policy);
        let id = CellId::random();
        let guard = self.lock_for_request(&id).await?;
        {
            let mut res = lock(&self.reservations);
            self.tenant_room(caller, &res)?;
            let reserved: Reservation = res.values().map(|h| &h.res).sum();
            if let Err(why) = self.capacity.admit(reserved, want) {
                self.counters
                    .admission_refusals
                    .fetch_add(1, Ordering::Relaxed);
                return Err(SupervisorError::Capacity(why));
            }
            res.insert(
                id.clone(),
                Held {
                    res: want,
                    owner: caller.owner.clone(),
                },
            );
        }
        let t0 = Instant::now();
        let out = self
            .create_inner(caller, &id, cell, confidential, &opts, &backend)
            .await;
        drop(guard);
        match &out {
            Ok(_) => {
                self.counters.creates.fetch_add(1, Ordering::Relaxed);
                self.counters.create_us_sum.fetch_add(
                    u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
            }
            Err(_) => {
                self.counters
                    .create_failures
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        out
    }

    pub(super) async fn create_inner(
        &self,
        caller: &Caller,
        id: &CellId,
        mut cell: Cell,
        confidential: Confidential,
        opts: &CreateOptions,
        backend: &Arc<dyn Backend>,
    ) -> Result<CellView> {
        let start = opts.start;
        let now = now_ms();
        let ttl_ms =
            i64::try_from(cell.spec.lifetime.ttl().saturating_mul(1000)).unwrap_or(i64::MAX);
        // The network plan and host ids, leased before anything is made
        // (one allocator for every tier): the host ports (written into the
        // document, which the handle and the stored copy then show), the
        // address, the uid range. Each goes back with the row.
        if let Err(e) = self
            .lease_ports(id, &mut cell, opts.host_ports.clone())
            .await
        {
            self.forget(id);
            return Err(e);
        }
        let redacted = cellhost_spec::Redacted::of(&cell);
        let mut handle = backend.handle_for(id, &cell);
        let planned = match backend.address_pool(&cell) {
            Some(pool) => self.lease_address(id, pool).await.map(Some),
            None => Ok(None),
        };
        let leased = match planned {
            Ok(address) => {
                handle.address = address;
                if backend.wants_uids() {
                    self.lease_uids(id).await.map(|r| handle.uids = Some(r))
                } else {
                    Ok(())
                }
            }
            Err(e) => Err(e),
        };
        if let Err(e) = leased {
            self.release_leases(id, handle.uids).await;
            self.forget(id);
            return Err(e);
        }
        {
            let (idc, owner, h) = (id.clone(), caller.owner.clone(), handle.clone());
            let data = json!({ "name": cell.metadata.name, "isolation": cell.spec.isolation });
            let inserted = self
                .db(move |s| {
                    s.insert_cell_with(
                        &NewCell {
                            id: &idc,
                            name: &redacted.metadata.name,
                            isolation: redacted.spec.isolation,
                            owner: &owner,
                            document: &redacted,
                            created_at: now,
                            expires_at: now.saturating_add(ttl_ms),
                        },
                        &CellUpdate::default()
                            .handle(&h)
                            .event(kinds::CREATING, &data),
                    )
                })
                .await;
            if let Err(e) = inserted {
                self.release_leases(id, handle.uids).await;
                self.forget(id);
                return Err(e);
            }
        }
        self.notify();

        let made = backend
            .create(CreateRequest {
                id: id.clone(),
                cell,
                secrets: confidential.secrets,
                owner: Some(caller.owner.clone()),
                volume_key: confidential.volume_key,
                uids: handle.uids,
                address: handle.address,
            })
            .await;
        // A tier may learn more at create than handle_for could say (a
        // bridged cell's leased address): keep what create returned.
        let handle = match &made {
            Ok(h) if *h != handle => {
                let (idc, hc) = (id.clone(), h.clone());
                // Not fatal: the stored handle still finds every host
                // object by the id; only inspect shows less.
                if let Err(e) = self.db(move |s| s.set_handle(&idc, &hc)).await {
                    tracing::warn!(cell = %id, "keeping the handle create returned: {e}");
                }
                h.clone()
            }
            _ => handle,
        };
        let started = match made {
            Ok(_) if start => backend.start(&handle).await,
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = started {
            let cause = SupervisorError::from(e);
            return Err(match self.roll_back(id, &handle, backend, &cause).await {
                Ok(()) => cause,
                Err(rollback) => SupervisorError::RollbackFailed {
                    cause: Box::new(cause),
                    rollback: Box::new(rollback),
                },
            });
        }
        let observed = if start {
            Observed::Running
        } else {
            Observed::Created
        };
        self.mark_started(id);
        // Known to this process: reconcile does not announce it as adopted.
        lock(&self.adopted).insert(id.clone());
        self.record_view(
            id,
            Change::event(kinds::CREATED, json!({ "state": observed.as_str() })).observed(observed),
        )
        .await
    }

    /// Undo a create that failed with `cause`: mark the row destroyed,
    /// destroy what was made, remove the row. An error (or a report that is
    /// not clean) leaves the row for reconcile.
    pub(super) async fn roll_back(
        &self,
        id: &CellId,
        handle: &CellHandle,
        backend: &Arc<dyn Backend>,
        cause: &SupervisorError,
    ) -> Result<()> {
        // The event and the row's error are the tenant's to read: the
        // public text there. The whole error is the caller's to report
        // (the API and the market log it, `run` prints it).
        tracing::debug!(cell = %id, "create failed: {cause}");
        let msg = cause.public_message();
        self.record(
            id,
            Change::event(kinds::CREATE_FAILED, json!({ "error": msg }))
                .desired(Desired::Destroyed)
                .observed(Observed::Destroying)
                .error(msg),
        )
        .await?;
        let report = backend.destroy(handle).await?;
        self.finish_teardown(id, &report, handle.uids).await?;
        clean(report).map(drop)
    }

    /// Lease `id` a uid range: the lowest slot of the policy's range that
    /// neither this store nor another one on the host holds (see
    /// `uid_claims`).
    pub(super) async fn lease_uids(&self, id: &CellId) -> Result<UidRange> {
        let pool = cellhost_store::UidPool {
            start: self.cfg.policy.uids.start,
            size: UidRange::CELL_SIZE,
            count: self.cfg.policy.uids.count,
        };
        let (store, claims, idc) = (self.store.clone(), self.claims.clone(), id.clone());
        tokio::task::spawn_blocking(move || {
            // Each retry learns of one more foreign claim; bounded anyway.
            for _ in 0..64 {
                let skip = claims.foreign();
                let Some(r) = store.lease_uids(&idc, pool, &skip)? else {
                    return Err(SupervisorError::Capacity(format!(
                        "every one of the {} uid ranges of this host is leased (policy: uids.count)",
                        pool.count
                    )));
                };
                match claims.claim(&idc, r) {
                    Ok(true) => return Ok(r),
                    Ok(false) => {
                        // Claimed by another store since we looked.
                        store.release_uids(&idc)?;
                    }
                    Err(e) => {
                        store.release_uids(&idc)?;
                        return Err(SupervisorError::Internal(format!(
                            "claiming uids {r} in {}: {e}",
                            claims.dir().display()
                        )));
                    }
                }
            }
            Err(SupervisorError::Internal(
                "no uid range could be claimed: other stores took each one first".into(),
            ))
        })
        .await
        .map_err(|e| SupervisorError::Internal(format!("uid lease task: {e}")))?
    }

    /// Lease the host ports `cell` publishes, across every tier: one
    /// allocator above the tiers, so no cell's published port is another's
    /// (a DNAT would otherwise win over a container's proxy). Entries with
    /// host port 0 get the lowest free port of the range, written into
    /// `cell`.
    pub(super) async fn lease_ports(
        &self,
        id: &CellId,
        cell: &mut Cell,
        narrow: Option<RangeInclusive<u16>>,
    ) -> Result<()> {
        if cell.spec.ports.is_empty() {
            return Ok(());
        }
        let (wanted, range) = (self.ports_wanted(cell), self.port_range(narrow)?);
        let idc = id.clone();
        let got = self
            .db(move |s| s.lease_ports(&idc, &wanted, range, &host_port_free))
            .await?
            .map_err(port_refusal)?;
        for (p, n) in cell.spec.ports.iter_mut().zip(got) {
            p.host = u32::from(n);
        }
        Ok(())
    }

    /// Would [`Supervisor::create_with`] find `cell` its host ports now?
    /// Leases nothing: a check before money is taken (the market's).
    pub async fn check_ports(
        &self,
        cell: &Cell,
        narrow: Option<RangeInclusive<u16>>,
    ) -> Result<()> {
        if cell.spec.ports.is_empty() {
            return Ok(());
        }
        let (wanted, range) = (self.ports_wanted(cell), self.port_range(narrow)?);
        self.db(move |s| s.fit_ports(&wanted, range, &host_port_free))
            .await?
            .map(drop)
            .map_err(port_refusal)
    }

    fn ports_wanted(&self, cell: &Cell) -> Vec<(&'static str, u16)> {
        cell.spec
            .ports
            .iter()
            .map(|p| (p.protocol.as_str(), u16::try_from(p.host).unwrap_or(0)))
            .collect()
    }

    /// The policy's host ports, narrowed to `narrow`.
    fn port_range(&self, narrow: Option<RangeInclusive<u16>>) -> Result<RangeInclusive<u16>> {
        let p = &self.cfg.policy.ports;
        let (lo, hi) = match &narrow {
            Some(n) => ((*n.start()).max(p.min), (*n.end()).min(p.max)),
            None => (p.min, p.max),
        };
        if lo > hi {
            return Err(SupervisorError::Capacity(format!(
                "no host port range left: {narrow:?} is outside the policy's ports {}-{}",
                p.min, p.max
            )));
        }
        Ok(lo..=hi)
    }

    /// Lease `id` an address of `pool` for its tier to plumb in.
    pub(super) async fn lease_address(&self, id: &CellId, pool: AddressPool) -> Result<Ipv4Addr> {
        let idc = id.clone();
        let (name, first, last) = (pool.pool.clone(), pool.first, pool.last);
        match self
            .db(move |s| s.lease_address(&idc, &pool.pool, &pool.owner, pool.first..=pool.last))
            .await?
        {
            LeaseOutcome::Leased { address, .. } => Ok(address),
            LeaseOutcome::PoolExhausted => Err(SupervisorError::Capacity(format!(
                "no free address left on {name} ({first}-{last})"
            ))),
        }
    }

    /// Give back everything leased to a cell that never got (or no longer
    /// has) a row: its uid range, host ports and address.
    pub(super) async fn release_leases(&self, id: &CellId, uids: Option<UidRange>) {
        self.release_uids(id, uids).await;
        if let Err(e) = self.release_network(id).await {
            tracing::warn!(cell = %id, "releasing host ports and address: {e}");
        }
    }

    /// Give back `id`'s host ports and address.
    pub(super) async fn release_network(&self, id: &CellId) -> Result<()> {
        let idc = id.clone();
        self.db(move |s| {
            s.release_ports(&idc)?;
            s.release_lease(&idc).map(drop)
        })
        .await
    }

    /// Give back a range whose cell never got (or no longer has) a row.
    pub(super) async fn release_uids(&self, id: &CellId, uids: Option<UidRange>) {
        let Some(r) = uids else { return };
        let idc = id.clone();
        if let Err(e) = self.db(move |s| s.release_uids(&idc)).await {
            tracing::warn!(cell = %id, "releasing uids {r}: {e}");
            return;
        }
        self.claims.release(id, r);
    }

    /// After backend.destroy: remove the row on a clean report (one commit
    /// with the `destroyed` event, which takes the uid lease with it), or
    /// mark it failed for reconcile. The host-wide uid claim goes last.
    pub(super) async fn finish_teardown(
        &self,
        id: &CellId,
        report: &TeardownReport,
        uids: Option<UidRange>,
    ) -> Result<()> {
        let (idc, rep) = (id.clone(), report.clone());
        self.db(move |s| record_teardown(s, &idc, &rep)).await?;
        self.notify();
        if report.is_clean() {
            if let Some(r) = uids {
                self.claims.release(id, r);
            }
            self.forget(id);
            self.counters.destroys.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters
                .dirty_teardowns
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Destroy a cell whose slot the caller holds. `reason` goes in the
    /// `destroying` event.
    pub(super) async fn teardown(&self, rec: &CellRecord, reason: &str) -> Result<TeardownReport> {
        let backend = self.backend(rec.isolation)?.clone();
        let handle = self.handle_of(rec)?;
        if rec.observed == Observed::Running {
            self.meter_cell(rec, &handle).await;
        }
        self.record(
            &rec.id,
            Change::event(kinds::DESTROYING, json!({ "reason": reason }))
                .desired(Desired::Destroyed)
                .observed(Observed::Destroying),
        )
        .await?;
        let report = backend.destroy(&handle).await?;
        self.finish_teardown(&rec.id, &report, handle.uids).await?;
        Ok(report)
    }

    pub async fn destroy(&self, caller: &Caller, id: &str) -> Result<TeardownReport> {
        let (rec, _slot) = self.visible_locked(caller, id).await?;
        self.teardown(&rec, "requested").await
    }

    /// End a cell its driver watched in the foreground (`cellhost run`):
    /// record how it ended (`kind`: exited, expired or interrupted, with
    /// the exit when known), then destroy it.
    pub async fn end(
        &self,
        caller: &Caller,
        id: &CellId,
        kind: &'static str,
        exit: Option<ExitInfo>,
    ) -> Result<TeardownReport> {
        let (rec, _slot) = self.visible_locked(caller, id.as_str()).await?;
        let data = serde_json::to_value(exit).unwrap_or_default();
        let mut change = Change::event(kind, data)
            .desired(Desired::Destroyed)
            .observed(Observed::Destroying);
        if let Some(x) = exit {
            change = change.exit(x);
        }
        self.record(&rec.id, change).await?;
        let rec = CellRecord {
            observed: Observed::Destroying,
            ..rec
        };
        let reason = match kind {
            kinds::EXPIRED => "lease expired",
            kinds::INTERRUPTED => "interrupted",
            _ => "exited",
        };
        self.teardown(&rec, reason).await
    }

    /// Start a created or exited cell. `volume_key` reopens its encrypted
    /// volume first (closed when the cell stopped).
    pub async fn start(
        &self,
        caller: &Caller,
        id: &str,
        volume_key: Option<VolumeKey>,
    ) -> Result<CellView> {
        let (rec, _slot) = self.visible_locked(caller, id).await?;
        if !matches!(rec.observed, Observed::Created | Observed::Exited) {
            return Err(SupervisorError::Conflict(format!(
                "cell {} is {}; start needs it created or exited",
                rec.id,
                rec.observed.as_str()
            )));
        }
        let handle = self.handle_of(&rec)?;
        let backend = self.backend(rec.isolation)?;
        if let Some(key) = &volume_key {
            backend.open_volume(&handle, key).await?;
        }
        drop(volume_key);
        backend.start(&handle).await?;
        self.mark_started(&rec.id);
        self.record_view(
            &rec.id,
            Change::event(kinds::STARTED, json!({}))
                .desired(Desired::Running)
                .observed(Observed::Running),
        )
        .await
    }

    pub async fn stop(
        &self,
        caller: &Caller,
        id: &str,
        grace: Option<Duration>,
    ) -> Result<CellView> {
        let (rec, _slot) = self.visible_locked(caller, id).await?;
        if !matches!(
            rec.observed,
            Observed::Running | Observed::Created | Observed::Exited
        ) {
            return Err(SupervisorError::Conflict(format!(
                "cell {} is {}; stop needs it running",
                rec.id,
                rec.observed.as_str()
            )));
        }
        let handle = self.handle_of(&rec)?;
        let backend = self.backend(rec.isolation)?.clone();
        let idc = rec.id.clone();
        self.db(move |s| s.set_desired(&idc, Desired::Stopped))
            .await?;
        self.finish_stop(&rec, &handle, &backend, grace).await
    }

    /// The effect of a stop whose intent (`desired=stopped`) is recorded:
    /// meter, stop, record the exit.
    pub(super) async fn finish_stop(
        &self,
        rec: &CellRecord,
        handle: &CellHandle,
        backend: &Arc<dyn Backend>,
        grace: Option<Duration>,
    ) -> Result<CellView> {
        if rec.observed == Observed::Running {
            self.meter_cell(rec, handle).await;
        }
        backend
            .stop(handle, grace.unwrap_or(self.cfg.stop_grace))
            .await?;
        let status = backend.status(handle).await?;
        let exit = status.exit.unwrap_or_else(ExitInfo::unknown);
        lock(&self.marks).remove(&rec.id);
        let data = serde_json::to_value(exit).unwrap_or_default();
        self.record_view(
            &rec.id,
            Change::event(kinds::STOPPED, data)
                .observed(Observed::Exited)
                .exit(exit),
        )
        .await
    }

    /// Move the lease end by `seconds`. An ended lease cannot be extended
    /// (the reaper owns it).
    pub async fn extend(&self, caller: &Caller, id: &str, seconds: u64) -> Result<CellView> {
        self.extend_for(caller, id, seconds, None).await
    }

    /// [`Supervisor::extend`], naming in the `extended` event what the
    /// extension was for (`request`: the market's request id), so
    /// [`Supervisor::extended_for`] can find it later.
    pub async fn extend_for(
        &self,
        caller: &Caller,
        id: &str,
        seconds: u64,
        request: Option<&str>,
    ) -> Result<CellView> {
        caller.must_have_paid("extend a lease")?;
        if seconds == 0 || seconds > MAX_EXTEND_SECONDS {
            return Err(SupervisorError::invalid(
                "seconds",
                format!("must be 1..={MAX_EXTEND_SECONDS}"),
            ));
        }
        let (rec, _slot) = self.visible_locked(caller, id).await?;
        let now = now_ms();
        if rec.expires_at <= now || rec.desired == Desired::Destroyed {
            return Err(SupervisorError::Conflict(format!(
                "the lease of cell {} has ended; it is being destroyed",
                rec.id
            )));
        }
        let at = rec.expires_at.saturating_add((seconds * 1000) as i64);
        // No lease runs longer than the policy's from now, however it was
        // reached: one create or many extends.
        let max = self.cfg.policy.lease.max_seconds;
        let left = u64::try_from((at - now).max(0) / 1000).unwrap_or(u64::MAX);
        if left > max {
            return Err(SupervisorError::Policy(cellhost_policy::PolicyError {
                refusals: vec![cellhost_policy::Refusal {
                    field: "seconds".into(),
                    message: format!(
                        "the lease would end in {left} s; at most {max} s from now is allowed"
                    ),
                    rule: "lease.maxSeconds".into(),
                }],
            }));
        }
        self.record_view(
            &rec.id,
            Change::event(kinds::EXTENDED, {
                let mut data = json!({ "seconds": seconds, "expiresAt": rfc3339_ms(at) });
                if let Some(r) = request {
                    data["request"] = r.into();
                }
                data
            })
            .expires_at(at),
        )
        .await
    }

    /// The backend and handle of the caller's cell, which must be
    /// running for `what`.
    async fn running(
        &self,
        caller: &Caller,
        id: &str,
        what: &str,
    ) -> Result<(&Arc<dyn Backend>, CellHandle)> {
        let rec = self.visible(caller, id).await?;
        if rec.observed != Observed::Running {
            return Err(SupervisorError::Conflict(format!(
                "cell {} is {}; {what} needs it running",
                rec.id,
                rec.observed.as_str()
            )));
        }
        Ok((self.backend(rec.isolation)?, self.handle_of(&rec)?))
    }

    pub async fn exec(&self, caller: &Caller, id: &str, req: ExecRequest) -> Result<ExecOutput> {
        let (backend, handle) = self.running(caller, id, "exec").await?;
        Ok(backend.exec(&handle, req).await?)
    }

    /// A TCP connection to `port` inside the caller's running cell (see
    /// `Backend::connect`): nothing is published on the host.
    pub async fn connect(
        &self,
        caller: &Caller,
        id: &str,
        port: u16,
    ) -> Result<std::net::TcpStream> {
        if port == 0 {
            return Err(SupervisorError::invalid("port", "must be 1..=65535"));
        }
        let (backend, handle) = self.running(caller, id, "a connection").await?;
        Ok(backend.connect(&handle, port).await?)
    }

    pub async fn logs(&self, caller: &Caller, id: &str, offset: u64) -> Result<LogChunk> {
        let rec = self.visible(caller, id).await?;
        let handle = self.handle_of(&rec)?;
        Ok(self.backend(rec.isolation)?.logs(&handle, offset).await?)
    }

    /// Whether the cell's workload can still write to its log.
    pub async fn log_open(&self, caller: &Caller, id: &str) -> bool {
        match self.visible(caller, id).await {
            Ok(rec) => matches!(
                rec.observed,
                Observed::Creating | Observed::Created | Observed::Running
            ),
            Err(_) => false,
        }
    }
}

/// Can a host service bind `port` now (on every address)? The allocator
/// skips ports the host already uses.
fn host_port_free(protocol: &str, port: u16) -> bool {
    cellhost_host::ports::free(protocol, port).is_ok()
}

/// The allocator's refusal, naming the `spec.ports` entry.
fn port_refusal(r: PortRefusal) -> SupervisorError {
    match r {
        PortRefusal::Taken {
            index,
            protocol,
            port,
            ..
        } => SupervisorError::PortTaken {
            field: format!("spec.ports.{index}.host"),
            message: format!("{protocol} port {port} is published by another cell"),
        },
        PortRefusal::InUse {
            index,
            protocol,
            port,
        } => SupervisorError::PortTaken {
            field: format!("spec.ports.{index}.host"),
            message: format!("{protocol} port {port} is in use on the host"),
        },
        PortRefusal::Exhausted {
            index,
            protocol,
            range,
        } => SupervisorError::Capacity(format!(
            "spec.ports.{index}.host: no {protocol} host port of {}-{} is free",
            range.start(),
            range.end()
        )),
    }
}
