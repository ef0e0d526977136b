//! The simulated lease store: the same compare-and-swap semantics as every backend
//! (versions from one counter, never reused; a write naming a stale version, or a
//! create of an existing record, is a conflict), applied instantly when a request
//! arrives. Delays, loss and outages are the world's business, not the store's.

use std::collections::BTreeMap;

use crate::clock::Mono;
use crate::lease::decide::decide_fence;
use crate::lease::flow::{StoreOp, StoreReply};
use crate::lease::{ClaimRecord, NodeFence, SessionKey, SessionRecord};
use crate::store::{StoreError, Version, Versioned};

/// A request as it travels to the store.
#[derive(Clone, Debug)]
pub enum SimOp {
    /// The operations of an acquire attempt (also used by release and status checks).
    Flow(StoreOp),
    /// A session create (`None`) or renewal; `sent` is the sender's clock reading, kept
    /// only so a deliberately weakened protocol can (wrongly) trust it.
    PutSession(SessionRecord, Option<Version>, Mono),
    ListSessions(String),
    ListClaims,
}

#[derive(Debug)]
pub enum SimReply {
    Flow(StoreReply),
    Sessions(Vec<Versioned<SessionRecord>>),
    Claims(Vec<Versioned<ClaimRecord>>),
}

#[derive(Debug, Default)]
pub struct SimStore {
    last: u64,
    pub sessions: BTreeMap<SessionKey, (SessionRecord, u64)>,
    pub claims: BTreeMap<String, (ClaimRecord, u64)>,
    pub fences: BTreeMap<String, (NodeFence, u64)>,
    /// The sender's clock reading for each session version written (weakness only).
    pub renew_stamps: BTreeMap<(SessionKey, u64), Mono>,
}

fn ver(v: u64) -> Version {
    Version(v.to_string())
}

fn conflict() -> StoreError {
    StoreError::Conflict { key: "sim".into() }
}

fn cas<K: Ord + Clone, T: Clone>(
    last: &mut u64,
    map: &mut BTreeMap<K, (T, u64)>,
    key: K,
    value: T,
    expected: Option<&Version>,
) -> Result<u64, StoreError> {
    let current = map.get(&key).map(|e| e.1);
    let ok = match (expected, current) {
        (None, None) => true,
        (Some(e), Some(c)) => *e == ver(c),
        _ => false,
    };
    if !ok {
        return Err(conflict());
    }
    *last += 1;
    map.insert(key, (value, *last));
    Ok(*last)
}

fn get<K: Ord, T: Clone>(map: &BTreeMap<K, (T, u64)>, key: &K) -> Option<Versioned<T>> {
    map.get(key).map(|(value, v)| Versioned {
        value: value.clone(),
        version: ver(*v),
    })
}

impl SimStore {
    pub fn apply(&mut self, op: &SimOp) -> SimReply {
        let reply = match op {
            SimOp::Flow(op) => self.apply_flow(op),
            SimOp::PutSession(rec, expected, sent) => {
                match cas(
                    &mut self.last,
                    &mut self.sessions,
                    rec.key(),
                    rec.clone(),
                    expected.as_ref(),
                ) {
                    Ok(v) => {
                        self.renew_stamps.insert((rec.key(), v), *sent);
                        StoreReply::Put(ver(v))
                    }
                    Err(e) => StoreReply::Failed(e),
                }
            }
            SimOp::ListSessions(node) => {
                let all = self.sessions.iter().filter(|(k, _)| &k.node == node);
                return SimReply::Sessions(
                    all.map(|(k, _)| get(&self.sessions, k).unwrap()).collect(),
                );
            }
            SimOp::ListClaims => {
                return SimReply::Claims(
                    self.claims
                        .keys()
                        .map(|k| get(&self.claims, k).unwrap())
                        .collect(),
                );
            }
        };
        SimReply::Flow(reply)
    }

    fn apply_flow(&mut self, op: &StoreOp) -> StoreReply {
        match op {
            StoreOp::GetFence(node) => StoreReply::Fence(get(&self.fences, node)),
            StoreOp::GetClaim(volume) => StoreReply::Claim(get(&self.claims, volume)),
            StoreOp::GetSession(key) => StoreReply::Session(get(&self.sessions, key)),
            StoreOp::DeleteSession(key, version) => match self.sessions.get(key) {
                Some((_, v)) if ver(*v) == *version => {
                    self.sessions.remove(key);
                    StoreReply::Deleted
                }
                _ => StoreReply::Failed(conflict()),
            },
            StoreOp::PutClaim(claim, expected) => {
                match cas(
                    &mut self.last,
                    &mut self.claims,
                    claim.volume_id.clone(),
                    claim.clone(),
                    expected.as_ref(),
                ) {
                    Ok(v) => StoreReply::Put(ver(v)),
                    Err(e) => StoreReply::Failed(e),
                }
            }
        }
    }

    /// An admin's fence, applied at one instant: the fence record, then every held
    /// claim of the node fenced with its epoch bumped (as `fence_node` does).
    pub fn fence_node(&mut self, node: &str) {
        let fence = NodeFence {
            node: node.to_string(),
            reason: "simulated out-of-service taint".into(),
        };
        let _ = cas(
            &mut self.last,
            &mut self.fences,
            node.to_string(),
            fence,
            None,
        );
        let volumes: Vec<String> = self.claims.keys().cloned().collect();
        for volume in volumes {
            let (claim, v) = self.claims[&volume].clone();
            if let Some(fenced) = decide_fence(&claim, node) {
                let _ = cas(
                    &mut self.last,
                    &mut self.claims,
                    volume,
                    fenced,
                    Some(&ver(v)),
                );
            }
        }
    }

    pub fn unfence_node(&mut self, node: &str) {
        self.fences.remove(node);
    }

    /// The sender's clock reading for a session version (weakened protocol only).
    pub fn renew_stamp(&self, key: &SessionKey, version: &Version) -> Option<Mono> {
        let v: u64 = version.0.parse().ok()?;
        self.renew_stamps.get(&(key.clone(), v)).copied()
    }
}
