//! The cellhost Cell document (see DESIGN.md). Pure: no I/O.
mod types;
pub use types::*;
