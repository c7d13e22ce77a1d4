//! Host capability probe (`cellhost doctor`). Placeholder: being written.
