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
    /// The tier cannot do this operation.
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Backend(#[source] BackendError),
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

    /// HTTP status for the API.
    pub fn status(&self) -> u16 {
        match self {
            SupervisorError::Invalid { .. } => 400,
            SupervisorError::NotFound(_) => 404,
            SupervisorError::Conflict(_) | SupervisorError::Capacity(_) => 409,
            SupervisorError::Unavailable(_) | SupervisorError::Unsupported(_) => 422,
            SupervisorError::Backend(b) => match b {
                BackendError::Invalid(_) => 400,
                BackendError::NotFound(_) => 404,
                BackendError::WrongState { .. } => 409,
                BackendError::MissingCapability { .. } | BackendError::Unsupported { .. } => 422,
                BackendError::Timeout(..) => 504,
                BackendError::Io { .. } | BackendError::Engine(_) => 500,
            },
            SupervisorError::Store(_) | SupervisorError::Internal(_) => 500,
        }
    }

    /// A stable, machine-readable code (`not_found`, `capacity`...).
    pub fn code(&self) -> &'static str {
        match self {
            SupervisorError::Invalid { .. } => "invalid",
            SupervisorError::NotFound(_) => "not_found",
            SupervisorError::Conflict(_) => "conflict",
            SupervisorError::Capacity(_) => "capacity",
            SupervisorError::Unavailable(_) => "tier_unavailable",
            SupervisorError::Unsupported(_) => "unsupported",
            SupervisorError::Backend(b) => match b {
                BackendError::Invalid(_) => "invalid",
                BackendError::NotFound(_) => "not_found",
                BackendError::WrongState { .. } => "conflict",
                BackendError::MissingCapability { .. } => "tier_unavailable",
                BackendError::Unsupported { .. } => "unsupported",
                BackendError::Timeout(..) => "timeout",
                BackendError::Io { .. } | BackendError::Engine(_) => "backend",
            },
            SupervisorError::Store(_) => "store",
            SupervisorError::Internal(_) => "internal",
        }
    }

    pub fn field(&self) -> Option<&str> {
        match self {
            SupervisorError::Invalid { field, .. } => field.as_deref(),
            _ => None,
        }
    }
}

impl From<BackendError> for SupervisorError {
    fn from(e: BackendError) -> Self {
        SupervisorError::Backend(e)
    }
}
