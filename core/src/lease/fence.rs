//! Fencing a whole node: an admin's out-of-service taint, or an explicit fence by a
//! fencing agent after a confirmed power-off. The fence record goes first, so from that
//! moment every claim of the node may be taken ([`crate::lease::decide::decide_acquire`]
//! checks it) and the node's own plugin, if it still runs and can reach the store, stops
//! extending its deadline. Then each held claim of the node is marked fenced with its
//! epoch bumped, so its old holder's epoch is superseded everywhere.

use crate::lease::client::MAX_RACES;
use crate::lease::decide::decide_fence;
use crate::lease::{Epoch, LeaseError, NodeFence};
use crate::store::{LeaseStore, StoreError};

/// What [`fence_node`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FenceReport {
    /// The fence record already existed.
    pub already_fenced: bool,
    /// (volume, new epoch) of every claim marked fenced.
    pub fenced: Vec<(String, Epoch)>,
}

pub async fn fence_node(
    store: &dyn LeaseStore,
    node: &str,
    reason: &str,
) -> Result<FenceReport, LeaseError> {
    if node.is_empty() {
        return Err(LeaseError::InvalidInput("node name is empty".into()));
    }
    let mut report = FenceReport::default();
    let record = NodeFence {
        node: node.to_string(),
        reason: reason.to_string(),
    };
    match store.get_fence(node).await? {
        Some(_) => report.already_fenced = true,
        None => match store.put_fence(&record, None).await {
            Ok(_) => {}
            Err(StoreError::Conflict { .. }) => report.already_fenced = true,
            Err(e) => return Err(e.into()),
        },
    }
    for claim in store.list_claims_of_node(node).await? {
        if claim.value.holder.node != node {
            continue;
        }
        let mut current = Some(claim);
        for attempt in 0.. {
            let Some(c) = current.take() else { break };
            let Some(fenced) = decide_fence(&c.value, node) else {
                break;
            };
            match store.put_claim(&fenced, Some(&c.version)).await {
                Ok(_) => {
                    report.fenced.push((fenced.volume_id, fenced.epoch));
                    break;
                }
                Err(StoreError::Conflict { .. }) if attempt < MAX_RACES => {
                    current = store.get_claim(&c.value.volume_id).await?;
                }
                Err(StoreError::Conflict { .. }) => {
                    return Err(LeaseError::Contended {
                        volume: c.value.volume_id,
                        attempts: MAX_RACES,
                    })
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(report)
}

/// Lifts a node's fence. Returns whether there was one.
pub async fn unfence_node(store: &dyn LeaseStore, node: &str) -> Result<bool, LeaseError> {
    for _ in 0..MAX_RACES {
        let Some(fence) = store.get_fence(node).await? else {
            return Ok(false);
        };
        match store.delete_fence(node, &fence.version).await {
            Ok(()) => return Ok(true),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(LeaseError::Contended {
        volume: format!("fence of {node}"),
        attempts: MAX_RACES,
    })
}
