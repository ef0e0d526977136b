//! The failover demo (`scripts/demo.sh`, the `holdfast-demo` binary) runs its story,
//! partition variant, and its timeline says what the protocol promises: node2 granted no
//! earlier than the lease bound allows, node1's writes refused with EIO before that, and
//! nothing of node1 in the backing file after the grant. Prints the timeline (run with
//! `--nocapture` to see it).

use holdfast_e2e::demo::{self, Fault};
use holdfast_e2e::errno::EIO;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_story_holds_its_bounds() {
    let timeline = demo::failover(Fault::Partition, demo::timing())
        .await
        .unwrap_or_else(|e| panic!("the demo did not run through: {e}"));
    println!("{timeline}");
    let since_fault = |at: std::time::Instant| at.saturating_duration_since(timeline.fault_at);

    let granted = since_fault(timeline.granted_at);
    assert!(
        granted >= timeline.earliest_grant(),
        "node2 granted {granted:?} after the fault, before node1's session could expire"
    );
    let (errno, refused_at) = timeline
        .node1_first_error
        .expect("node1's writer was never refused");
    assert_eq!(errno, EIO, "node1's first refused write");
    assert!(
        timeline.node1_errors.iter().all(|e| *e == EIO),
        "{:?}",
        timeline.node1_errors
    );
    assert!(
        refused_at < timeline.granted_at,
        "node1's writes were refused only {:?} after the fault, after node2's grant",
        since_fault(refused_at)
    );
    let (_, last_ack) = timeline.node1_last_ack.expect("node1 wrote nothing");
    assert!(last_ack < timeline.granted_at);
    assert!(timeline.node2_first_ack >= timeline.granted_at);
    assert!(timeline.landed.0 > 0 && timeline.landed.1 > 0);
    timeline.check.unwrap();
}
