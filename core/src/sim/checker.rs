//! The invariant, checked after every simulated event.

use std::collections::BTreeMap;

use crate::lease::{Epoch, Holder};

use super::world::World;

/// Two holders (pods) both able to write one volume: each holds a grant it has not
/// given up, and its process's deadline, read on its own clock, has not passed. (One pod
/// reached through two overlapping plugin instances is one holder.)
pub(super) fn check(world: &World) -> Option<String> {
    let mut writers: BTreeMap<&str, BTreeMap<(usize, &str), String>> = BTreeMap::new();
    for p in world.procs.values().filter(|p| p.alive) {
        let node = &world.nodes[p.node];
        if !node.up || node.clock.local(world.now) >= p.deadline {
            continue;
        }
        for (volume, (pod, epoch)) in &p.holds {
            let who = format!("{}/{} pod {pod} epoch {epoch}", node.name, p.instance);
            writers
                .entry(volume)
                .or_default()
                .insert((p.node, pod), who);
        }
    }
    writers
        .into_iter()
        .find(|(_, w)| w.len() > 1)
        .map(|(volume, w)| {
            let w: Vec<String> = w.into_values().collect();
            format!("volume {volume} writable by {}", w.join(" and "))
        })
}

/// Records a grant; an epoch granted before to a different holder is a violation.
pub(super) fn record_grant(world: &mut World, volume: &str, epoch: Epoch, holder: &Holder) {
    world.outcome.grants += 1;
    let key = (volume.to_string(), epoch);
    match world.granted.get(&key) {
        Some(earlier) if earlier != holder => {
            world.outcome.violation = Some(format!(
                "epoch {epoch} of volume {volume} granted to {earlier:?} and to {holder:?}"
            ));
        }
        Some(_) => {}
        None => {
            world.granted.insert(key, holder.clone());
        }
    }
}
