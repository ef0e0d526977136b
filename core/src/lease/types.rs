//! The records the lease protocol keeps in a [`crate::store::LeaseStore`].
//!
//! These are plain data. Their meaning — who may write, when a claim is free — lives in
//! the decision functions beside this module, never in the stores.

use serde::{Deserialize, Serialize};

/// A fencing epoch. Each change of a claim's holder, and each fence, increases it; it
/// never goes down. Whoever holds a lower epoch than the one on record has lost the claim.
pub type Epoch = u64;

/// Identifies one node plugin instance's session: a node runs one plugin at a time,
/// except during a rolling update when an old and a new instance overlap, each with its
/// own session.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SessionKey {
    pub node: String,
    pub instance: String,
}

/// One node plugin instance's session lease. Its holder rewrites it every D/3; observers
/// never read the times inside it (they come from another machine's clock) but only
/// watch its store version change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub node: String,
    /// Random per process start; names this session.
    pub instance: String,
    /// `/proc/sys/kernel/random/boot_id` of the holder's machine.
    pub boot_id: String,
    /// `/etc/machine-id` of the holder's machine.
    pub machine_id: String,
    /// D, the session duration the holder promises to self-fence within.
    pub duration_ms: u64,
    /// Increases with every renewal, so that each renewal is a real write that changes
    /// the record's version.
    pub renewals: u64,
}

impl SessionRecord {
    pub fn key(&self) -> SessionKey {
        SessionKey {
            node: self.node.clone(),
            instance: self.instance.clone(),
        }
    }
}

/// Who holds, or last held, a claim.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Holder {
    pub node: String,
    pub pod_uid: String,
    /// The session instance the claim hangs off.
    pub instance: String,
    /// The pod's namespace and name, when the publish carried them (kubelet sends them
    /// with `podInfoOnMount`). Only for messages: the lock is decided by the UID.
    /// Records written without it still read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodName>,
}

/// A pod's namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PodName {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for PodName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl Holder {
    /// The same pod through the same session. The recorded name is not compared: it is
    /// for messages only, and a record written without it is still this pod's.
    pub fn is_same_pod(&self, other: &Holder) -> bool {
        self.node == other.node && self.pod_uid == other.pod_uid && self.instance == other.instance
    }

    /// The holder pod as people name it: `namespace/name (uid U)`, or the UID alone
    /// when the name was not recorded.
    pub fn pod_words(&self) -> String {
        match &self.pod {
            Some(pod) => format!("{pod} (uid {})", self.pod_uid),
            None => self.pod_uid.clone(),
        }
    }

    pub fn session(&self) -> SessionKey {
        SessionKey {
            node: self.node.clone(),
            instance: self.instance.clone(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClaimState {
    /// The holder may write while its session is live.
    Held,
    /// The holder gave the claim up after unmounting: free at once.
    Released,
    /// The holder's node was fenced (taint or explicit fence): free at once.
    Fenced,
}

/// One volume's claim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRecord {
    pub volume_id: String,
    pub holder: Holder,
    pub state: ClaimState,
    pub epoch: Epoch,
    /// Set by the controller when it judged the holder's session expired (unrenewed for
    /// `D·(1+ε)+margin` on its own clock), so that status and events can say when the
    /// holder self-fenced. For people only: no decision reads it, and it frees nothing —
    /// the claim is taken exactly as it would be without it. Records written without it
    /// still read, and a reader that predates it ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired: Option<ExpiredMark>,
}

/// The controller's note that a held claim's holder session expired.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpiredMark {
    /// The controller's wall-clock estimate (Unix ms) of the moment by which the holder
    /// self-fenced: an estimate for humans, never used for decisions.
    pub at_unix_ms: u64,
    /// Who judged it (the controller replica's identity).
    pub observed_by: String,
    /// The `renewals` counter of the session record judged expired. A session that
    /// renews again after all (its record was never deleted, and it reached the store
    /// again) shows a higher count, and the mark is stale.
    pub session_renewals: u64,
}

/// A node fenced by an admin (out-of-service taint) or a fencing agent: every claim its
/// sessions hold is free, and its plugin must stop all I/O.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFence {
    pub node: String,
    /// Why, for events and logs ("out-of-service taint", "fenced by agent X").
    pub reason: String,
}
