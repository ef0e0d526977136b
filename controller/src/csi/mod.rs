//! The CSI boundary: the Controller service over the directory backend, the conversion
//! of CSI messages into the backend's types, and the attach gate that
//! ControllerPublishVolume asks before any node may mount an exclusive volume.

pub(crate) mod convert;
pub mod gate;
pub mod service;
