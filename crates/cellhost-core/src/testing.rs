//! An in-memory [`Backend`] for testing what sits above the contract (the
//! supervisor's lifecycle and reconcile) without root or an engine.
//!
//! A [`FakeBackend`] keeps one [`FakeObject`] per cell that has "host
//! objects". Tests put objects in directly ([`FakeBackend::put`]) to model
//! what a crash or the workload left, script a failure of the next call of
//! an operation ([`FakeBackend::fail`]), and read back what was called.
//! It keeps the contract's promises: a failed `create` leaves nothing,
//! `destroy` is idempotent (a second destroy is a clean, `already_gone`
//! report), `status` of a cell without objects is `Gone`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use cellhost_spec::{Cell, Isolation};

use crate::ids::CellId;
use crate::{
    AddressPool, Backend, BackendError, CellHandle, CellState, CellStatus, CreateRequest, ExitInfo,
    ListedCell, LogChunk, ResourceUsage, TeardownReport,
};

/// A backend operation, for scripting failures and counting calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Create,
    Start,
    Stop,
    Destroy,
    Status,
    List,
    Release,
    Usage,
}

/// How a scripted call goes wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The call returns `BackendError::Engine` and changes nothing.
    Error,
    /// `destroy` only: the call returns a report that is not clean (one
    /// object left), and the object stays.
    Dirty,
}

/// One cell's host objects as the fake holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FakeObject {
    pub state: CellState,
    pub exit: Option<ExitInfo>,
}

#[derive(Default)]
struct Inner {
    objects: BTreeMap<CellId, FakeObject>,
    faults: HashMap<Op, VecDeque<Fault>>,
    calls: Vec<(Op, Option<CellId>)>,
    /// The address each create and destroy was given.
    addresses: Vec<(Op, CellId, Option<Ipv4Addr>)>,
}

/// See the module docs.
pub struct FakeBackend {
    isolation: Isolation,
    wants_uids: bool,
    pool: Option<AddressPool>,
    inner: Mutex<Inner>,
}

impl FakeBackend {
    /// A fake of `isolation` with no objects and nothing scripted.
    pub fn new(isolation: Isolation) -> FakeBackend {
        FakeBackend {
            isolation,
            wants_uids: false,
            pool: None,
            inner: Mutex::default(),
        }
    }

    /// Ask the supervisor for a uid range per cell, as the process tier does.
    pub fn with_uids(mut self) -> FakeBackend {
        self.wants_uids = true;
        self
    }

    /// Attach every cell to `pool`, as a bridged tier does.
    pub fn with_addresses(mut self, pool: AddressPool) -> FakeBackend {
        self.pool = Some(pool);
        self
    }

    /// The address each `create` and `destroy` of cell `id` was given, in
    /// order.
    pub fn addresses_on(&self, id: &CellId) -> Vec<(Op, Option<Ipv4Addr>)> {
        self.lock()
            .addresses
            .iter()
            .filter(|(_, c, _)| c == id)
            .map(|(o, _, a)| (*o, *a))
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next call of `op` fails with `fault` (queued after any fault
    /// already scripted for it).
    pub fn fail(&self, op: Op, fault: Fault) {
        self.lock().faults.entry(op).or_default().push_back(fault);
    }

    /// Give cell `id` host objects in `state` (what a crash, the workload
    /// or another process left).
    pub fn put(&self, id: &CellId, state: CellState, exit: Option<ExitInfo>) {
        self.lock()
            .objects
            .insert(id.clone(), FakeObject { state, exit });
    }

    /// Cell `id`'s objects, if it has any.
    pub fn object(&self, id: &CellId) -> Option<FakeObject> {
        self.lock().objects.get(id).copied()
    }

    /// Every cell that has objects.
    pub fn ids(&self) -> Vec<CellId> {
        self.lock().objects.keys().cloned().collect()
    }

    /// How many times `op` was called (for any cell).
    pub fn calls(&self, op: Op) -> usize {
        self.lock().calls.iter().filter(|(o, _)| *o == op).count()
    }

    /// The operations called on cell `id`, in order.
    pub fn calls_on(&self, id: &CellId) -> Vec<Op> {
        self.lock()
            .calls
            .iter()
            .filter(|(_, c)| c.as_ref() == Some(id))
            .map(|(o, _)| *o)
            .collect()
    }

    /// Record the call; the scripted fault for it, if any.
    fn enter(&self, op: Op, id: Option<&CellId>) -> Option<Fault> {
        let mut g = self.lock();
        g.calls.push((op, id.cloned()));
        g.faults.get_mut(&op).and_then(VecDeque::pop_front)
    }

    fn scripted(op: Op) -> BackendError {
        BackendError::engine(format!("scripted {op:?} failure"))
    }

    fn handle(&self, id: &CellId, name: &str) -> CellHandle {
        CellHandle {
            id: id.clone(),
            name: name.to_string(),
            isolation: self.isolation,
            state_dir: PathBuf::from(format!("/nonexistent/cellhost-fake/{id}")),
            tier: serde_json::json!({ "fake": true }),
            uids: None,
            address: None,
        }
    }
}

#[async_trait]
impl Backend for FakeBackend {
    fn isolation(&self) -> Isolation {
        self.isolation
    }

    fn handle_for(&self, id: &CellId, cell: &Cell) -> CellHandle {
        self.handle(id, &cell.metadata.name)
    }

    fn found_handle(&self, id: &CellId) -> CellHandle {
        self.handle(id, &id.object_name())
    }

    fn wants_uids(&self) -> bool {
        self.wants_uids
    }

    fn address_pool(&self, _cell: &Cell) -> Option<AddressPool> {
        self.pool.clone()
    }

    async fn create(&self, req: CreateRequest) -> Result<CellHandle, BackendError> {
        self.lock()
            .addresses
            .push((Op::Create, req.id.clone(), req.address));
        if self.enter(Op::Create, Some(&req.id)).is_some() {
            return Err(Self::scripted(Op::Create));
        }
        if self.pool.is_some() && req.address.is_none() {
            return Err(BackendError::Invalid("no address planned".into()));
        }
        let mut handle = self.handle(&req.id, &req.cell.metadata.name);
        handle.uids = req.uids;
        handle.address = req.address;
        self.put(&req.id, CellState::Created, None);
        Ok(handle)
    }

    async fn start(&self, handle: &CellHandle) -> Result<(), BackendError> {
        if self.enter(Op::Start, Some(&handle.id)).is_some() {
            return Err(Self::scripted(Op::Start));
        }
        let mut g = self.lock();
        let Some(o) = g.objects.get_mut(&handle.id) else {
            return Err(BackendError::NotFound(handle.id.clone()));
        };
        if o.state == CellState::Running {
            return Err(BackendError::WrongState {
                id: handle.id.clone(),
                op: "start",
                state: o.state,
                wanted: "created or exited",
            });
        }
        *o = FakeObject {
            state: CellState::Running,
            exit: None,
        };
        Ok(())
    }

    async fn stop(&self, handle: &CellHandle, _grace: Duration) -> Result<(), BackendError> {
        if self.enter(Op::Stop, Some(&handle.id)).is_some() {
            return Err(Self::scripted(Op::Stop));
        }
        let mut g = self.lock();
        let Some(o) = g.objects.get_mut(&handle.id) else {
            return Err(BackendError::NotFound(handle.id.clone()));
        };
        if o.state == CellState::Running {
            *o = FakeObject {
                state: CellState::Exited,
                exit: Some(ExitInfo::signaled(libc::SIGTERM)),
            };
        }
        Ok(())
    }

    async fn destroy(&self, handle: &CellHandle) -> Result<TeardownReport, BackendError> {
        self.lock()
            .addresses
            .push((Op::Destroy, handle.id.clone(), handle.address));
        let fault = self.enter(Op::Destroy, Some(&handle.id));
        if fault == Some(Fault::Error) {
            return Err(Self::scripted(Op::Destroy));
        }
        let mut report = TeardownReport::new(handle.id.as_str());
        let mut g = self.lock();
        if fault == Some(Fault::Dirty) && g.objects.contains_key(&handle.id) {
            report.check_detail("objects", "fake", 1, "scripted residue");
            return Ok(report);
        }
        report.already_gone = g.objects.remove(&handle.id).is_none();
        report.check("objects", "fake", 0);
        Ok(report)
    }

    async fn status(&self, handle: &CellHandle) -> Result<CellStatus, BackendError> {
        if self.enter(Op::Status, Some(&handle.id)).is_some() {
            return Err(Self::scripted(Op::Status));
        }
        Ok(match self.object(&handle.id) {
            Some(o) => CellStatus {
                state: o.state,
                pid: (o.state == CellState::Running).then_some(1),
                exit: o.exit,
            },
            None => CellStatus {
                state: CellState::Gone,
                pid: None,
                exit: None,
            },
        })
    }

    async fn list(&self) -> Result<Vec<ListedCell>, BackendError> {
        if self.enter(Op::List, None).is_some() {
            return Err(Self::scripted(Op::List));
        }
        Ok(self
            .lock()
            .objects
            .iter()
            .map(|(id, o)| ListedCell {
                id: id.clone(),
                isolation: self.isolation,
                state: o.state,
            })
            .collect())
    }

    async fn logs(&self, _handle: &CellHandle, offset: u64) -> Result<LogChunk, BackendError> {
        Ok(LogChunk {
            data: Vec::new(),
            next_offset: offset,
            more: false,
        })
    }

    async fn usage(&self, handle: &CellHandle) -> Result<ResourceUsage, BackendError> {
        if self.enter(Op::Usage, Some(&handle.id)).is_some() {
            return Err(Self::scripted(Op::Usage));
        }
        Ok(ResourceUsage::default())
    }

    async fn release(&self, handle: &CellHandle) -> Result<(), BackendError> {
        if self.enter(Op::Release, Some(&handle.id)).is_some() {
            return Err(Self::scripted(Op::Release));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> Cell {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "cellhost.dev/v1",
            "kind": "Cell",
            "metadata": { "name": "t" },
            "spec": { "isolation": "process", "command": ["/bin/true"] }
        }))
        .unwrap()
    }

    fn block<F: std::future::Future>(f: F) -> F::Output {
        // The fake never awaits anything: one poll finishes it.
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut f = std::pin::pin!(f);
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => panic!("the fake awaited"),
        }
    }

    #[test]
    fn keeps_the_contract() {
        let b = FakeBackend::new(Isolation::Process);
        let id = CellId::random();
        let h = block(b.create(CreateRequest::new(id.clone(), doc()))).unwrap();
        assert_eq!(b.object(&id).unwrap().state, CellState::Created);
        block(b.start(&h)).unwrap();
        assert!(block(b.start(&h)).is_err(), "a running cell starts twice");
        block(b.stop(&h, Duration::ZERO)).unwrap();
        let st = block(b.status(&h)).unwrap();
        assert_eq!(st.state, CellState::Exited);
        assert_eq!(st.exit, Some(ExitInfo::signaled(libc::SIGTERM)));

        b.fail(Op::Destroy, Fault::Dirty);
        let r = block(b.destroy(&h)).unwrap();
        assert!(!r.is_clean());
        assert!(b.object(&id).is_some(), "a dirty destroy keeps the object");
        b.fail(Op::Destroy, Fault::Error);
        assert!(block(b.destroy(&h)).is_err());
        let r = block(b.destroy(&h)).unwrap();
        assert!(r.is_clean() && !r.already_gone);
        let r = block(b.destroy(&h)).unwrap();
        assert!(r.is_clean() && r.already_gone, "destroy is idempotent");
        assert_eq!(block(b.status(&h)).unwrap().state, CellState::Gone);

        let id2 = CellId::random();
        b.fail(Op::Create, Fault::Error);
        assert!(block(b.create(CreateRequest::new(id2.clone(), doc()))).is_err());
        assert!(b.ids().is_empty(), "a failed create leaves nothing");
        assert_eq!(b.calls(Op::Destroy), 4);
        assert_eq!(b.calls_on(&id2), vec![Op::Create]);
    }
}
