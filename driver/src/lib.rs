//! holdfast's node plugin (`holdfast-driver`).
//!
//! - [`args`]: the command line and the checked [`args::Config`].
//! - [`mount`]: every mount syscall and the mount table (the only place they happen).

pub mod args;
pub mod mount;
