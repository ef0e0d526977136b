//! Publishing on the node: the kernel mounts, the table of published targets, and the
//! record of FUSE targets that survives a restart of the plugin.

pub mod fuse_targets;
pub mod kernel_mounts;
pub mod published;
pub mod publisher;
