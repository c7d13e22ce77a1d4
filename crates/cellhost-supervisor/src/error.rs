//! The supervisor's errors, each with the HTTP status and stable code the
//! API gives it.

use cellhost_core::BackendError;
use cellhost_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The request or document is wrong; `field` names where.
    #[error("{}{message}", field.as_ref().map(|f| format!("{f}: ")).unwrap_or_default())]
    Invalid {
        field: Option<String>,
        message: String,
    },
    /// No such cell, or not one the caller may see (the same answer on
    /// purpose: a tenant cannot probe for other tenants' ids).
    #[error("no cell {0}")]
    NotFound(String),
    /// The cell is in the wrong state or another operation on it is running.
    #[error("{0}")]
    Conflict(String),
    /// Admission refused the cell: the node lacks what it asks for.
    #[error("insufficient capacity: {0}")]
    Capacity(String),
    /// The host cannot run this tier (see `cellhost doctor`).
    #[error("{0}")]
    Unavailable(String),
    /// The operator's policy does not allow what the document asks.
    #[error("{0}")]
    Policy(#[source] cellhost_policy::PolicyError),
    /// Only payment buys this (a key's signature alone does not).
    #[error("{0}")]
    Unpaid(String),
    /// A host port the document publishes is another cell's.
    #[error("{field}: {message}")]
    PortTaken { field: String, message: String },
    /// A per-tenant cap of the policy is reached (cells, streams, rate).
    #[error("{message}")]
    TooMany { code: &'static str, message: String },
    #[error("{0}")]
    Backend(#[source] BackendError),
    /// A create failed, and so did its rollback: the create's cause first,
    /// then why the rollback did not finish (reconcile retries it).
    #[error("{cause}; rolling back also failed: {rollback}")]
    RollbackFailed {
        #[source]
        cause: Box<SupervisorError>,
        rollback: Box<SupervisorError>,
    },
    /// A teardown ran but left host objects (the report's summary); the row
    /// is kept as `failed` and reconcile retries.
    #[error("teardown left residue: {0}")]
    Residue(String),
    #[error("state store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
}

impl SupervisorError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        SupervisorError::Invalid {
            field: Some(field.into()),
            message: message.into(),
        }
    }

    /// HTTP status and stable code, from one table.
    fn class(&self) -> (u16, &'static str) {
        match self {
            SupervisorError::Invalid { .. } => (400, "invalid"),
            SupervisorError::NotFound(_) => (404, "not_found"),
            SupervisorError::Conflict(_) => (409, "conflict"),
            SupervisorError::Capacity(_) => (409, "capacity"),
            SupervisorError::Unavailable(_) => (422, "tier_unavailable"),
            SupervisorError::Policy(_) => (403, "policy"),
            SupervisorError::Unpaid(_) => (403, "payment_required"),
            SupervisorError::TooMany { code, .. } => (429, code),
            SupervisorError::PortTaken { .. } => (409, "port_taken"),
            SupervisorError::Backend(b) => match b {
                BackendError::Invalid(_) => (400, "invalid"),
                BackendError::PortClosed(_) => (502, "port_closed"),
                BackendError::NotFound(_) => (404, "not_found"),
                BackendError::WrongState { .. } => (409, "conflict"),
                BackendError::MissingCapability { .. } => (422, "tier_unavailable"),
                BackendError::Unsupported { .. } => (422, "unsupported"),
                BackendError::Timeout(..) => (504, "timeout"),
                BackendError::Io { .. } | BackendError::Engine { .. } => (500, "backend"),
            },
            SupervisorError::RollbackFailed { cause, .. } => cause.class(),
            SupervisorError::Residue(_) => (500, "teardown_failed"),
            SupervisorError::Store(_) => (500, "store"),
            SupervisorError::Internal(_) => (500, "internal"),
        }
    }

    /// The HTTP status this error maps to.
    pub fn status(&self) -> u16 {
        self.class().0
    }

    /// A stable, machine-readable code (`not_found`, `capacity`...).
    pub fn code(&self) -> &'static str {
        self.class().1
    }

    /// What a tenant may read. Errors about its request keep their
    /// message; the host's own failures (a tier's engine or I/O error, the
    /// store, a teardown's residue, an internal error) get a fixed
    /// sentence, since their text names host paths and objects. The whole
    /// error goes to the operator's log.
    pub fn public_message(&self) -> String {
        match self {
            SupervisorError::Backend(BackendError::Io { .. } | BackendError::Engine { .. }) => {
                "the tier failed on the host".into()
            }
            SupervisorError::Store(_) => "the state store failed".into(),
            SupervisorError::Internal(_) => "internal error".into(),
            SupervisorError::Residue(_) => {
                "the teardown left host objects behind; it is retried".into()
            }
            SupervisorError::RollbackFailed { cause, .. } => format!(
                "{}; rolling back also failed and is retried",
                cause.public_message()
            ),
            other => other.to_string(),
        }
    }

    /// Does [`SupervisorError::public_message`] leave out what the error
    /// says?
    pub fn is_redacted(&self) -> bool {
        self.public_message() != self.to_string()
    }

    pub fn field(&self) -> Option<&str> {
        match self {
            SupervisorError::Invalid { field, .. } => field.as_deref(),
            SupervisorError::Policy(p) => p.first().map(|r| r.field.as_str()),
            SupervisorError::PortTaken { field, .. } => Some(field),
            SupervisorError::RollbackFailed { cause, .. } => cause.field(),
            _ => None,
        }
    }
}

/// A tier's refusals ([`cellhost_spec::validate_for`]): the first one's
/// field, every message.
impl From<cellhost_spec::ValidationErrors> for SupervisorError {
    fn from(e: cellhost_spec::ValidationErrors) -> Self {
        let mut errors = e.errors.into_iter();
        let Some(first) = errors.next() else {
            return SupervisorError::Invalid {
                field: None,
                message: "invalid document".into(),
            };
        };
        let mut message = first.message;
        for more in errors {
            message.push_str(&format!("; {more}"));
        }
        SupervisorError::Invalid {
            field: (!first.path.is_empty()).then_some(first.path),
            message,
        }
    }
}

impl From<BackendError> for SupervisorError {
    fn from(e: BackendError) -> Self {
        SupervisorError::Backend(e)
    }
}
