//! The admin verbs `fence`, `unfence` and `claims`: one store call sequence each
//! (through `holdfast_core::lease`), and their output as a table or JSON.
//!
//! They act on the store the node plugins share, so the in-process memory store is
//! refused: a fence written there would reach no one while the admin believed the node
//! fenced.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use holdfast_core::lease::{fence_node, unfence_node, ClaimState, Epoch};
use holdfast_core::lease_config::LeaseArgs;
use holdfast_core::store::{self, LeaseStore, StoreConfig};
use serde::Serialize;

use crate::args::{ClaimsArgs, FenceArgs, OutputFormat, UnfenceArgs};
use crate::RunError;

/// What `fence` did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FenceOutcome {
    pub node: String,
    pub reason: String,
    /// A fence record for the node existed already.
    pub already_fenced: bool,
    /// Claims this call marked fenced, with their new epochs.
    pub fenced_claims: Vec<FencedClaim>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FencedClaim {
    pub volume: String,
    pub epoch: Epoch,
}

/// What `unfence` did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UnfenceOutcome {
    pub node: String,
    /// There was a fence record to remove.
    pub was_fenced: bool,
}

/// One line of `claims`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClaimRow {
    pub volume: String,
    pub pod: String,
    pub node: String,
    pub instance: String,
    pub state: ClaimState,
    pub epoch: Epoch,
    /// The holder's node has a fence record.
    pub node_fenced: bool,
}

/// A node name must name something: an empty one would match no claim and fence nothing.
pub fn check_node(node: &str) -> Result<(), RunError> {
    if node.trim().is_empty() {
        return Err(RunError::EmptyNode);
    }
    Ok(())
}

/// Validates the lease flags and opens the shared store for `command`.
pub async fn open_store(
    lease: &LeaseArgs,
    command: &'static str,
) -> Result<Arc<dyn LeaseStore>, RunError> {
    let config = lease.store_config()?;
    // Timing is not used here, but a command line the controller would refuse to serve
    // with is refused here too.
    lease.params()?;
    if config == StoreConfig::Memory {
        return Err(RunError::MemoryStore { command });
    }
    Ok(store::connect(config).await?)
}

pub async fn fence(store: &dyn LeaseStore, args: &FenceArgs) -> Result<FenceOutcome, RunError> {
    // Only the taint's own fences may be lifted by the taint's removal: an admin's
    // fence must never be mistaken for one.
    if crate::kubernetes::taint_fence::imitates_taint_cause(&args.reason) {
        return Err(RunError::ReservedReason {
            reason: args.reason.clone(),
        });
    }
    fence_with_reason(store, &args.node, &args.reason).await
}

/// The fence itself, shared by `fence` and the out-of-service taint's node watch: a
/// fence record for `node` (kept as it is if one exists), then every claim the node
/// still holds marked fenced at a higher epoch.
pub async fn fence_with_reason(
    store: &dyn LeaseStore,
    node: &str,
    reason: &str,
) -> Result<FenceOutcome, RunError> {
    check_node(node)?;
    let report = fence_node(store, node, reason).await?;
    Ok(FenceOutcome {
        node: node.to_string(),
        reason: reason.to_string(),
        already_fenced: report.already_fenced,
        fenced_claims: report
            .fenced
            .into_iter()
            .map(|(volume, epoch)| FencedClaim { volume, epoch })
            .collect(),
    })
}

pub async fn unfence(
    store: &dyn LeaseStore,
    args: &UnfenceArgs,
) -> Result<UnfenceOutcome, RunError> {
    check_node(&args.node)?;
    let was_fenced = unfence_node(store, &args.node).await?;
    Ok(UnfenceOutcome {
        node: args.node.clone(),
        was_fenced,
    })
}

/// Every claim (of `args.node` only, if given), sorted by volume.
pub async fn claims(store: &dyn LeaseStore, args: &ClaimsArgs) -> Result<Vec<ClaimRow>, RunError> {
    let mut records: Vec<_> = store
        .list_claims()
        .await?
        .into_iter()
        .map(|c| c.value)
        .filter(|c| args.node.as_ref().is_none_or(|n| &c.holder.node == n))
        .collect();
    records.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
    let mut fenced_nodes = BTreeMap::new();
    for record in &records {
        let node = &record.holder.node;
        if !fenced_nodes.contains_key(node) {
            fenced_nodes.insert(node.clone(), store.get_fence(node).await?.is_some());
        }
    }
    Ok(records
        .into_iter()
        .map(|c| ClaimRow {
            node_fenced: fenced_nodes[&c.holder.node],
            volume: c.volume_id,
            pod: c.holder.pod_uid,
            node: c.holder.node,
            instance: c.holder.instance,
            state: c.state,
            epoch: c.epoch,
        })
        .collect())
}

pub fn print_fence(
    out: &mut dyn Write,
    format: OutputFormat,
    outcome: &FenceOutcome,
) -> Result<(), RunError> {
    if format == OutputFormat::Json {
        return print_json(out, outcome);
    }
    let already = if outcome.already_fenced {
        " (it was already fenced)"
    } else {
        ""
    };
    writeln!(
        out,
        "fenced node {}{already}: {} claim(s) freed",
        outcome.node,
        outcome.fenced_claims.len()
    )?;
    if !outcome.fenced_claims.is_empty() {
        let rows = outcome
            .fenced_claims
            .iter()
            .map(|c| vec![c.volume.clone(), c.epoch.to_string()])
            .collect();
        print_table(out, &["VOLUME", "NEW EPOCH"], rows)?;
    }
    Ok(())
}

pub fn print_unfence(
    out: &mut dyn Write,
    format: OutputFormat,
    outcome: &UnfenceOutcome,
) -> Result<(), RunError> {
    match format {
        OutputFormat::Json => print_json(out, outcome),
        OutputFormat::Table if outcome.was_fenced => {
            Ok(writeln!(out, "unfenced node {}", outcome.node)?)
        }
        OutputFormat::Table => Ok(writeln!(out, "node {} was not fenced", outcome.node)?),
    }
}

pub fn print_claims(
    out: &mut dyn Write,
    format: OutputFormat,
    rows: &[ClaimRow],
) -> Result<(), RunError> {
    if format == OutputFormat::Json {
        return print_json(out, &rows);
    }
    let cells = rows
        .iter()
        .map(|r| {
            vec![
                r.volume.clone(),
                r.pod.clone(),
                r.node.clone(),
                r.instance.clone(),
                state_name(r.state).to_string(),
                r.epoch.to_string(),
                if r.node_fenced { "yes" } else { "no" }.to_string(),
            ]
        })
        .collect();
    let header = [
        "VOLUME",
        "POD",
        "NODE",
        "INSTANCE",
        "STATE",
        "EPOCH",
        "NODE FENCED",
    ];
    print_table(out, &header, cells)
}

pub(crate) fn state_name(state: ClaimState) -> &'static str {
    match state {
        ClaimState::Held => "held",
        ClaimState::Released => "released",
        ClaimState::Fenced => "fenced",
    }
}

pub(crate) fn print_json<T: Serialize + ?Sized>(
    out: &mut dyn Write,
    value: &T,
) -> Result<(), RunError> {
    serde_json::to_writer_pretty(&mut *out, value).map_err(RunError::Json)?;
    Ok(writeln!(out)?)
}

/// Left-aligned columns separated by two spaces.
pub(crate) fn print_table(
    out: &mut dyn Write,
    header: &[&str],
    rows: Vec<Vec<String>>,
) -> Result<(), RunError> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        padded.join("  ").trim_end().to_string()
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for row in &rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(volume: &str, state: ClaimState, epoch: Epoch, node_fenced: bool) -> ClaimRow {
        ClaimRow {
            volume: volume.into(),
            pod: "pod-uid-1".into(),
            node: "n1".into(),
            instance: "i1".into(),
            state,
            epoch,
            node_fenced,
        }
    }

    fn text(f: impl FnOnce(&mut dyn Write) -> Result<(), RunError>) -> String {
        let mut out = Vec::new();
        f(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn claims_table_aligns_columns() {
        let rows = [
            row("hf-a", ClaimState::Held, 1, false),
            row("hf-longer-id", ClaimState::Fenced, 12, true),
        ];
        let table = text(|out| print_claims(out, OutputFormat::Table, &rows));
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "VOLUME        POD        NODE  INSTANCE  STATE   EPOCH  NODE FENCED"
        );
        assert_eq!(
            lines[2],
            "hf-longer-id  pod-uid-1  n1    i1        fenced  12     yes"
        );
        assert_eq!(lines.len(), 3);
    }

    #[test]
    fn claims_json_is_an_array_of_objects() {
        let rows = [row("hf-a", ClaimState::Released, 3, false)];
        let json = text(|out| print_claims(out, OutputFormat::Json, &rows));
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value[0]["volume"], "hf-a");
        assert_eq!(value[0]["state"], "released");
        assert_eq!(value[0]["epoch"], 3);
        assert_eq!(value[0]["node_fenced"], false);
    }

    #[test]
    fn fence_output_names_each_freed_claim() {
        let outcome = FenceOutcome {
            node: "n1".into(),
            reason: "powered off".into(),
            already_fenced: false,
            fenced_claims: vec![FencedClaim {
                volume: "hf-a".into(),
                epoch: 4,
            }],
        };
        let table = text(|out| print_fence(out, OutputFormat::Table, &outcome));
        assert!(
            table.starts_with("fenced node n1: 1 claim(s) freed\n"),
            "{table}"
        );
        assert!(table.contains("hf-a    4"), "{table}");
        let json = text(|out| print_fence(out, OutputFormat::Json, &outcome));
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["fenced_claims"][0]["epoch"], 4);
        assert_eq!(value["already_fenced"], false);
    }
}
