//! The session watch: a kube-runtime watcher on the session Lease objects of the
//! kubernetes lease store (label selector `app.kubernetes.io/managed-by=holdfast,
//! holdfast.csi.dev/kind=session`, in the store's namespace), keeping every session
//! record with its resourceVersion in memory for the expiry sweep
//! ([`crate::expiry::ExpiryWatch::with_session_watch`]).
//!
//! The cache is *synced* only between the watcher's first complete list (`InitDone`)
//! and its next error: while it lists again after a failure, the sweep does not use
//! it and reads the store as it did before. A synced cache can still lag the API
//! server; the sweep never writes a mark on the cache's word alone (it re-reads the
//! session first), so a lag can only delay a mark or make the sweep read more.
//!
//! Every replica runs it (the cache is warm when one becomes leader); a few hundred
//! small objects. Sessions are kept by object name, so a deleted Lease leaves the
//! cache whatever its record said; a Lease whose record does not decode is left out
//! (and logged): the sweep's periodic full pass still reads every claim.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use holdfast_core::lease::SessionRecord;
use holdfast_core::store::kubernetes::{decode_session, kind_selector};
use holdfast_core::store::Versioned;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, ResourceExt};
use tokio::sync::watch;

use crate::metrics;

#[derive(Default)]
struct Inner {
    synced: bool,
    sessions: HashMap<String, Versioned<SessionRecord>>,
}

/// The session records the watch has seen. Cheap to clone (shared).
#[derive(Clone, Default)]
pub struct SessionCache {
    inner: Arc<Mutex<Inner>>,
}

impl SessionCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every session record known, or `None` while the watch has not (re)listed.
    pub fn snapshot(&self) -> Option<Vec<Versioned<SessionRecord>>> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner
            .synced
            .then(|| inner.sessions.values().cloned().collect())
    }

    /// Replaces every session and marks the cache synced (the watch's relist; tests).
    pub fn replace(&self, sessions: impl IntoIterator<Item = (String, Versioned<SessionRecord>)>) {
        let sessions = sessions.into_iter().collect();
        self.with(|c| {
            c.sessions = sessions;
            c.synced = true;
        });
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut inner)
    }
}

fn decoded(lease: &Lease) -> Option<Versioned<SessionRecord>> {
    match decode_session(lease) {
        Ok(s) => Some(s),
        Err(err) => {
            tracing::warn!(lease = %lease.name_any(), %err, "session watch: a session Lease that does not decode is left out");
            None
        }
    }
}

/// Watches the session Leases of `namespace` into `cache` until `stop` turns true;
/// each watch request lasts `timeout`.
pub async fn run(
    client: kube::Client,
    namespace: String,
    cache: SessionCache,
    timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let leases: Api<Lease> = Api::namespaced(client, &namespace);
    let seconds = timeout.as_secs().clamp(1, u64::from(u32::MAX)) as u32;
    let config = watcher::Config::default()
        .labels(&kind_selector("session"))
        .timeout(seconds);
    let stream = watcher(leases, config).default_backoff();
    let mut stream = std::pin::pin!(stream);
    // A relist is gathered apart and replaces the cache at its end.
    let mut relist: HashMap<String, Versioned<SessionRecord>> = HashMap::new();
    loop {
        let item = tokio::select! {
            item = stream.next() => item,
            _ = stop.wait_for(|s| *s) => return,
        };
        match item {
            Some(Ok(watcher::Event::Init)) => relist.clear(),
            Some(Ok(watcher::Event::InitApply(lease))) => {
                if let Some(s) = decoded(&lease) {
                    relist.insert(lease.name_any(), s);
                }
            }
            Some(Ok(watcher::Event::InitDone)) => {
                tracing::debug!(sessions = relist.len(), "session watch listed");
                cache.replace(std::mem::take(&mut relist));
            }
            Some(Ok(watcher::Event::Apply(lease))) => {
                let name = lease.name_any();
                let s = decoded(&lease);
                cache.with(|c| match s {
                    Some(s) => {
                        c.sessions.insert(name, s);
                    }
                    None => {
                        c.sessions.remove(&name);
                    }
                });
            }
            Some(Ok(watcher::Event::Delete(lease))) => {
                let name = lease.name_any();
                cache.with(|c| c.sessions.remove(&name));
            }
            Some(Err(err)) => {
                // Until the watcher has listed again, the sweep reads the store itself.
                cache.with(|c| c.synced = false);
                metrics::count_watch_restart("leases");
                tracing::warn!(%err, "session Lease watch failed; it backs off and re-lists");
            }
            None => return,
        }
    }
}
