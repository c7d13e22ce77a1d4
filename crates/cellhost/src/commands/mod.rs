//! One file per command: each parses nothing (clap does, in `cli`) and
//! prints what its command prints; the work is in the library crates.

pub mod doctor;
pub mod image;
pub mod market;
pub mod remote;
pub mod run;
pub mod serve;
