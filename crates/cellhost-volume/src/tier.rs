//! What a tier does with a cell's encrypted volume: the same steps for the
//! process and container tiers, which differ only in how they bind
//! [`OpenVolume::data_dir`] into the cell.
//!
//! Only `spec.volume` with `encrypted: true` is handled here; a tier
//! decides what a plain volume is (for containers, an ext4 of its own).

use cellhost_core::{BackendError, CreateRequest, TeardownReport, VolumeKey, ids::CellId};
use cellhost_spec::Cell;

use crate::{OpenVolume, VolumeError, Volumes};

impl From<VolumeError> for BackendError {
    fn from(e: VolumeError) -> Self {
        match e {
            VolumeError::Unavailable(detail) => BackendError::MissingCapability {
                capability: "encrypted-volume".into(),
                detail,
            },
            e @ (VolumeError::WrongKey(_) | VolumeError::NotFound(_) | VolumeError::Size(_)) => {
                BackendError::Invalid(e.to_string())
            }
            e @ (VolumeError::Step { .. } | VolumeError::Io { .. }) => {
                BackendError::engine_from("encrypted volume", e)
            }
        }
    }
}

/// Where a key comes from, for error messages.
const KEY_HINT: &str = "API header Cellhost-Volume-Key, or --volume-key-file";

fn encrypted_size(cell: &Cell) -> Option<u64> {
    cell.spec
        .volume
        .as_ref()
        .filter(|v| v.encrypted)
        .map(|v| v.size_gib)
}

impl Volumes {
    /// Run `f` on a blocking thread: every volume step runs a tool or does
    /// file I/O, which must not hold up a tier's async callers.
    pub async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Volumes) -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, BackendError> {
        let vols = self.clone();
        tokio::task::spawn_blocking(move || f(&vols))
            .await
            .map_err(|e| BackendError::engine_from("volume task", e))?
    }

    /// Before any side effect: can this cell's encrypted volume be made
    /// here, with the key (or its absence) that came along?
    pub fn admit(&self, cell: &Cell, key: Option<&VolumeKey>) -> Result<(), BackendError> {
        match (encrypted_size(cell), key) {
            (Some(_), None) => Err(BackendError::Invalid(format!(
                "spec.volume.encrypted: the cell needs its volume key ({KEY_HINT})"
            ))),
            (None, Some(_)) => Err(BackendError::Invalid(
                "a volume key was given but the document has no spec.volume with encrypted: true"
                    .into(),
            )),
            (Some(_), Some(_)) => match self.engine() {
                Ok(_) => Ok(()),
                Err(why) => Err(VolumeError::Unavailable(why.to_string()).into()),
            },
            (None, None) => Ok(()),
        }
    }

    /// Make the request's encrypted volume, if its document has one, on a
    /// blocking thread (only the id, size and a copy of the key move there).
    pub async fn create_for(
        &self,
        req: &CreateRequest,
    ) -> Result<Option<OpenVolume>, BackendError> {
        let (Some(size), Some(key)) = (encrypted_size(&req.cell), req.volume_key.as_ref()) else {
            return Ok(None);
        };
        let (id, key) = (req.id.clone(), key.duplicate());
        self.blocking(move |v| Ok(Some(v.create(&id, size, &key)?)))
            .await
    }

    /// A cell whose volume is closed cannot start: its data dir would be
    /// missing. Cells without a volume pass.
    pub fn require_open(&self, id: &CellId) -> Result<(), BackendError> {
        if self.exists(id) && !self.is_open(id) {
            return Err(BackendError::Invalid(format!(
                "the encrypted volume of cell {id} is closed; start the cell with its volume key ({KEY_HINT})"
            )));
        }
        Ok(())
    }

    /// Close the cell's volume if it has one (after its workload ended).
    pub fn close_if_any(&self, id: &CellId) -> Result<(), BackendError> {
        if self.exists(id) {
            self.close(id)?;
        }
        Ok(())
    }

    /// Destroy the cell's volume if anything of it exists, adding its
    /// checks to `report`.
    pub fn destroy_if_any(&self, id: &CellId, report: &mut TeardownReport) {
        if self.exists(id) {
            self.destroy_into(id, report);
        }
    }
}
