//! The invariant under a randomized schedule: three nodes contend for one volume for
//! ~20 s while plugins are killed (and restarted), paused and partitioned at random.
//! Whenever a node is granted the volume it starts a new writer; a writer that fails is
//! abandoned and its target unpublished, as kubelet would after the pod died.
//!
//! At the end the backing file must show: every record intact; every acknowledged
//! record present; and each writer's records in one contiguous run — once another
//! writer's record landed after them, never one of theirs again, which is what "never
//! two live holders at once" leaves on the storage.
//!
//! The schedule is seeded from the clock and printed; `HOLDFAST_E2E_SEED=<n>` replays it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use holdfast_e2e::{Cluster, Landed, Volume, Writer};

const NODES: usize = 3;
const RUN_FOR: Duration = Duration::from_secs(20);
const STEP: Duration = Duration::from_millis(200);
const FILE: &str = "log";

/// xorshift64*: a tiny, replayable generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from))
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    Up,
    Paused(Instant),
    Partitioned(Instant),
    Dead(Instant),
}

struct Holding {
    writer: Writer,
    target: PathBuf,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant_under_random_faults() {
    let seed = std::env::var("HOLDFAST_E2E_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("random faults: seed {seed}");
    let mut rng = Rng(seed);
    let mut cluster = Cluster::start(NODES).await;
    let volume = cluster.create_volume("contended", &[]).await;
    let mut states = [State::Up; NODES];
    let mut holding: Vec<Option<Holding>> = (0..NODES).map(|_| None).collect();
    let mut abandoned: Vec<Writer> = Vec::new();
    let mut generation = 0;
    let (mut kills, mut pauses, mut partitions, mut grants) = (0, 0, 0, 0);
    let start = Instant::now();

    while start.elapsed() < RUN_FOR {
        let now = Instant::now();
        // End faults that are due.
        for k in 1..=NODES {
            match states[k - 1] {
                State::Paused(until) if now >= until => cluster.resume(k),
                State::Partitioned(until) if now >= until => cluster.heal(k),
                State::Dead(until) if now >= until => {
                    let t = Instant::now();
                    cluster.restart(k).await;
                    println!("  node{k} restarted, serving after {:?}", t.elapsed());
                }
                _ => continue,
            }
            states[k - 1] = State::Up;
        }
        // Maybe start one, keeping at least one node up.
        let up: Vec<usize> = (1..=NODES).filter(|k| states[k - 1] == State::Up).collect();
        if up.len() > 1 && rng.below(100) < 20 {
            // Half the time hit the holder, if there is one.
            let holder = up.iter().copied().find(|k| holding[k - 1].is_some());
            let k = match holder {
                Some(h) if rng.below(2) == 0 => h,
                _ => up[rng.below(up.len() as u64) as usize],
            };
            let until = now + rng.millis(300, 5000);
            states[k - 1] = match rng.below(3) {
                0 => {
                    kills += 1;
                    cluster.kill(k);
                    State::Dead(now + rng.millis(200, 2500))
                }
                1 => {
                    pauses += 1;
                    cluster.pause(k);
                    State::Paused(until)
                }
                _ => {
                    partitions += 1;
                    cluster.partition(k);
                    State::Partitioned(until)
                }
            };
        }
        // Abandon failed writers (the pod died): unpublish, best effort.
        for k in 1..=NODES {
            let failed = holding[k - 1]
                .as_ref()
                .is_some_and(|h| h.writer.first_error().is_some());
            if failed && states[k - 1] == State::Up {
                let h = holding[k - 1].take().unwrap();
                let _ = tokio::time::timeout(
                    Duration::from_secs(3),
                    cluster.unpublish(k, &volume, &h.target),
                )
                .await;
                abandoned.push(h.writer);
            }
        }
        // Nodes without a writer try to take the volume for a new pod, in random order
        // so that no node is favoured.
        let first = rng.below(NODES as u64) as usize;
        for k in (0..NODES).map(|i| (first + i) % NODES + 1) {
            if states[k - 1] != State::Up || holding[k - 1].is_some() {
                continue;
            }
            let pod = format!("p{k}-{generation}");
            if try_publish(&cluster, k, &volume, &pod).await.is_some() {
                let target = cluster.target(k, &pod);
                let id = format!("w{k}g{generation}");
                let writer = Writer::start(&target.join(FILE), &id, Duration::from_millis(20), 10);
                holding[k - 1] = Some(Holding { writer, target });
                generation += 1;
                grants += 1;
            }
        }
        tokio::time::sleep(STEP).await;
    }

    for k in 1..=NODES {
        match states[k - 1] {
            State::Paused(_) => cluster.resume(k),
            State::Partitioned(_) => cluster.heal(k),
            _ => {}
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut writers: Vec<Writer> = abandoned;
    writers.extend(holding.into_iter().flatten().map(|h| h.writer));
    for w in &mut writers {
        w.stop();
    }
    let landed = Landed::read(&cluster.data_dir(&volume.id).join(FILE))
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    println!(
        "random faults: {kills} kills, {pauses} pauses, {partitions} partitions; {grants} grants; \
         {} records landed from {} writers",
        landed.records.len(),
        writers.len()
    );
    for w in &writers {
        println!(
            "  {}: {} acked, errors {:?}",
            w.id,
            w.acked().len(),
            w.errors().iter().take(3).collect::<Vec<_>>()
        );
        landed
            .acknowledged_present(&w.id, &w.acked())
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }
    contiguous_runs(&landed).unwrap_or_else(|e| panic!("seed {seed}: {e}\n{}", cluster.logs()));
    assert!(
        grants >= 2,
        "seed {seed}: only {grants} grant(s): the volume never changed hands"
    );
}

async fn try_publish(cluster: &Cluster, k: usize, volume: &Volume, pod: &str) -> Option<()> {
    let target = cluster.target(k, pod);
    let call = cluster.publish_at(k, volume, pod, &target, Some(Duration::from_secs(1)));
    call.await.ok()
}

/// Each writer's records form one run in file order.
fn contiguous_runs(landed: &Landed) -> Result<(), String> {
    let mut finished: Vec<&str> = Vec::new();
    let mut current: Option<&str> = None;
    for r in &landed.records {
        if current == Some(r.writer.as_str()) {
            continue;
        }
        if finished.contains(&r.writer.as_str()) {
            return Err(format!(
                "{} wrote again at offset {} after {:?} had taken over (runs so far {finished:?})",
                r.writer, r.offset, current
            ));
        }
        if let Some(previous) = current {
            finished.push(previous);
        }
        current = Some(r.writer.as_str());
    }
    Ok(())
}
