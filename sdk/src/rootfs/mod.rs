//! Preparing a sandbox's root filesystem on the host: the merged view of its layers
//! ([`view`]) and the patches written into its upper directory before the first boot
//! ([`patch`]).

pub(crate) mod patch;
pub(crate) mod view;

pub use patch::{Patch, PatchBuilder};
