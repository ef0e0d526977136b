//! The lock as this node holds it: claims and their gates, the epoch on storage, and the
//! enforcer that closes a gate the moment this node may no longer write.

pub mod claims;
pub mod enforcer;
pub mod epoch_file;
pub mod gone_pods;
pub mod holders;
pub mod lock_request;
pub mod recovery;
