//! Open file and directory handles: the FUSE `fh` ↔ the daemon's backing fd.
//!
//! Handles are numbered by a counter and never reused, so a stale `fh` can only miss, never
//! reach another file. Inserted by open/create/opendir, removed by release/releasedir.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use fuser::Errno;

pub(super) struct Handles<T> {
    map: RwLock<HashMap<u64, Arc<T>>>,
    next: AtomicU64,
}

impl<T> Handles<T> {
    pub fn new() -> Self {
        Self {
            map: RwLock::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }

    pub fn insert(&self, value: T) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, Arc::new(value));
        fh
    }

    pub fn get(&self, fh: u64) -> Result<Arc<T>, Errno> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fh)
            .cloned()
            .ok_or(Errno::EBADF)
    }

    pub fn remove(&self, fh: u64) -> Option<Arc<T>> {
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh)
    }
}
