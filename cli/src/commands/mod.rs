//! One module per group of subcommands; each `cmd_*` runs one and returns its exit code.

pub(crate) mod cp;
pub(crate) mod exec;
pub(crate) mod image;
pub(crate) mod logs;
pub(crate) mod metrics;
pub(crate) mod sandbox;
pub(crate) mod snapshot;
pub(crate) mod ssh;
