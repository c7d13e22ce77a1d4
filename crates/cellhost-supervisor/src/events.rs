//! Events as CloudEvents 1.0 (structured JSON mode).
//!
//! The store keeps the append-only log (`events` table); this module only
//! gives each row the CloudEvents envelope the API streams:
//!
//! ```json
//! { "specversion": "1.0", "id": "42", "source": "cellhost://node-a",
//!   "type": "cellhost.cell.created", "subject": "0123456789ab",
//!   "time": "2026-11-23T10:00:00.123Z", "datacontenttype": "application/json",
//!   "data": { ... } }
//! ```
//!
//! `id` is the store's event id (strictly increasing), so it doubles as the
//! SSE `id:` and a client resumes with `Last-Event-ID` or `?after=`.

use std::time::{Duration, UNIX_EPOCH};

use cellhost_store::Event;
use serde::Serialize;

/// Event types the supervisor appends. One place, so the API docs and the
/// tests agree with the code.
pub mod kinds {
    pub const CREATING: &str = "cellhost.cell.creating";
    pub const CREATED: &str = "cellhost.cell.created";
    pub const CREATE_FAILED: &str = "cellhost.cell.create_failed";
    pub const STARTED: &str = "cellhost.cell.started";
    pub const STOPPED: &str = "cellhost.cell.stopped";
    pub const EXITED: &str = "cellhost.cell.exited";
    pub const EXTENDED: &str = "cellhost.cell.extended";
    pub const EXPIRED: &str = "cellhost.cell.expired";
    /// `cellhost run` was interrupted (Ctrl-C, SIGTERM) and destroyed it.
    pub const INTERRUPTED: &str = "cellhost.cell.interrupted";
    pub const DESTROYING: &str = "cellhost.cell.destroying";
    pub const DESTROYED: &str = "cellhost.cell.destroyed";
    pub const TEARDOWN_FAILED: &str = "cellhost.cell.teardown_failed";
    pub const ADOPTED: &str = "cellhost.cell.adopted";
    pub const ROLLED_BACK: &str = "cellhost.cell.create_rolled_back";
    pub const LOST: &str = "cellhost.cell.lost";
    pub const ORPHAN_DESTROYED: &str = "cellhost.orphan.destroyed";
}

/// One event in the CloudEvents envelope.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CloudEvent {
    pub specversion: &'static str,
    /// The store's event id, as a string (CloudEvents ids are strings).
    pub id: String,
    /// `cellhost://<node name>`.
    pub source: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The cell id.
    pub subject: String,
    /// RFC 3339, millisecond precision, UTC.
    pub time: String,
    pub datacontenttype: &'static str,
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

impl CloudEvent {
    pub fn from_event(e: &Event, node: &str) -> CloudEvent {
        CloudEvent {
            specversion: "1.0",
            id: e.id.to_string(),
            source: format!("cellhost://{node}"),
            kind: e.kind.clone(),
            subject: e.cell_id.to_string(),
            time: rfc3339_ms(e.at),
            datacontenttype: "application/json",
            data: e.data.clone(),
        }
    }
}

/// Unix ms → `2026-11-23T10:00:00.123Z` (times before 1970 clamp to it).
pub fn rfc3339_ms(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellhost_core::ids::CellId;

    #[test]
    fn envelope_has_the_required_attributes() {
        let e = Event {
            id: 7,
            cell_id: CellId::parse("0123456789ab").unwrap(),
            at: 1_700_000_000_123,
            kind: kinds::CREATED.into(),
            data: serde_json::json!({"x": 1}),
            owner: Some("alice".into()),
        };
        let v = serde_json::to_value(CloudEvent::from_event(&e, "node-a")).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["id"], "7");
        assert_eq!(v["type"], "cellhost.cell.created");
        assert_eq!(v["source"], "cellhost://node-a");
        assert_eq!(v["subject"], "0123456789ab");
        assert_eq!(v["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["data"]["x"], 1);
        // The owner is for filtering, not for the wire.
        assert!(v.get("owner").is_none());
    }
}
