//! Failover time: from the holder's end to the other node's successful
//! NodePublishVolume, when the holder's end is certain versus when it must be waited
//! out. Real plugins in network namespaces, real etcd, D = 3 s, margin 600 ms.
//!
//! Scenarios, each repeated [`ROUNDS`] times on a fresh volume:
//! - `clean unpublish`: the holder unpublishes (a pod deleted normally);
//! - `crash + restart`: the holder's plugin is SIGKILLed and restarted on its node; the
//!   successor takes the node-local flock, proving its predecessor dead, and releases
//!   its claims;
//! - `crash, node down` (the baseline): SIGKILL and no restart; the other node must see
//!   the session unrenewed for D·(1+ε) + margin.
//!
//! The other node retries every 50 ms (as kubelet would, faster), so figures carry up to
//! 50 ms of polling. Needs root. Run: `cargo bench -p holdfast-e2e --bench failover`.

use std::time::{Duration, Instant};

use holdfast_e2e::Cluster;

const ROUNDS: usize = 3;

#[derive(Clone, Copy)]
enum Scenario {
    CleanUnpublish,
    CrashRestart,
    CrashNodeDown,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::CleanUnpublish => "clean unpublish",
            Scenario::CrashRestart => "crash + restart (flock)",
            Scenario::CrashNodeDown => "crash, node down (lease)",
        }
    }
}

async fn failover(cluster: &mut Cluster, scenario: Scenario, round: usize) -> Duration {
    let name = format!("{}-{round}", scenario.name().split(' ').next().unwrap());
    let volume = cluster.create_volume(&name, &[]).await;
    let target = cluster
        .publish(1, &volume, &format!("a-{name}"))
        .await
        .expect("node1 publish");
    let started = Instant::now();
    match scenario {
        Scenario::CleanUnpublish => cluster
            .unpublish(1, &volume, &target)
            .await
            .expect("unpublish"),
        Scenario::CrashRestart => {
            cluster.kill(1);
            cluster.restart(1).await;
        }
        Scenario::CrashNodeDown => cluster.kill(1),
    }
    let within = cluster.timing.takeover_after() * 3;
    cluster
        .publish_until_ok(2, &volume, &format!("b-{name}"), within)
        .await
        .unwrap_or_else(|e| panic!("{}: node2 never took over: {e}", scenario.name()));
    let took = started.elapsed();
    if matches!(scenario, Scenario::CrashNodeDown) {
        cluster.restart(1).await;
    }
    took
}

#[tokio::main]
async fn main() {
    let mut cluster = Cluster::start(2).await;
    let baseline = Scenario::CrashNodeDown;
    let scenarios = [Scenario::CleanUnpublish, Scenario::CrashRestart, baseline];
    let mut medians = Vec::new();
    for scenario in scenarios {
        let mut times = Vec::new();
        for round in 0..ROUNDS {
            times.push(failover(&mut cluster, scenario, round).await);
        }
        times.sort();
        medians.push((scenario, times[ROUNDS / 2], times[0], times[ROUNDS - 1]));
    }
    let lease = medians.last().expect("baseline measured").1;
    println!(
        "\nfailover to another node, D = {:?}, margin {:?}, ε = {} (lease bound D(1+ε)+margin = {:?}), {ROUNDS} rounds",
        cluster.timing.duration,
        cluster.timing.margin,
        cluster.timing.epsilon,
        cluster.timing.takeover_after()
    );
    println!(
        "{:<26} {:>10} {:>10} {:>10} {:>18}",
        "scenario", "median", "min", "max", "lease wait / this"
    );
    for (scenario, median, min, max) in medians {
        println!(
            "{:<26} {:>8.0}ms {:>8.0}ms {:>8.0}ms {:>17.1}x",
            scenario.name(),
            median.as_secs_f64() * 1e3,
            min.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3,
            lease.as_secs_f64() / median.as_secs_f64()
        );
    }
}
