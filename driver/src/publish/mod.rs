//! Publishing on the node: the kernel mounts, the table of published targets, and the
//! record of FUSE targets that survives a restart of the plugin, and telling Kubernetes
//! about the pods whose FUSE data path died with a previous plugin.

pub mod data_path_loss;
pub mod fuse_targets;
pub mod kernel_mounts;
pub mod published;
pub mod publisher;
