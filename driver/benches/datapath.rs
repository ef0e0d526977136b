//! The FUSE data path against a bind mount of the same backing directory, same run.
//!
//! `cargo bench -p holdfast-driver --bench datapath` (as root). The backing directory is
//! on the real disk (`/var/tmp`, override with `HOLDFAST_BENCH_DIR`); the bind mount and
//! the FUSE mount serve that same directory, and both sides run the identical code.
//! Where the kernel fence loads and the kernel grants FUSE passthrough, a second FUSE
//! mount with passthrough on is measured in the same rounds (a third side); elsewhere
//! the run says so and measures two. On a kernel that cannot run the fence, the VM test
//! runs this benchmark in a VM (`tests/kernel_fence_vm.rs`, `datapath_benchmark_…`).
//!
//! What each row measures (higher is better everywhere):
//! - `seq write total`: MiB/s of create + 256 MiB in 1 MiB `write(2)`s + `fsync` + close.
//! - `  write(2) phase`, `  fsync phase`: the same run split at the `fsync` call, each as
//!   256 MiB divided by that phase's time (where the bytes go, not extra work).
//! - `seq write O_RDWR`: the same write total with the file opened read-write: such an
//!   open is served by the daemon, not by passthrough (see `datapath::passthrough`).
//! - `seq read cold`: MiB/s reading that file back in 1 MiB `read(2)`s after `sync` and
//!   `drop_caches` (every page of both the FUSE and the backing page cache dropped).
//! - `4k random write+fsync`: ops/s of a 4 KiB `pwrite` at a random aligned offset of a
//!   64 MiB file, each followed by `fsync` (a database's commit pattern).
//! - `create/stat/unlink`: ops/s over creating, `stat`ing and removing 2000 empty files
//!   (3 ops each) in a fresh directory, after `drop_caches`.
//! - `stat of a missing name`: ops/s of `stat` on 500 names that do not exist, 10 times
//!   each (the first of each is a real lookup on both sides).
//!
//! Noise control for a small, shared machine: one warm-up round (not recorded), then
//! `HOLDFAST_BENCH_REPS` rounds (default 8). In every round each workload runs on both
//! mounts back to back, the order alternating by round, and `sync` before each timed
//! workload so none inherits another's dirty pages. Each ratio column is the median of
//! the per-round side/bind ratios (runs seconds apart share the machine's load);
//! min–max columns show the spread. Knobs for experiments: `HOLDFAST_BENCH_WRITEBACK=1`,
//! `HOLDFAST_BENCH_WRITE_THROUGH=0|1`, `HOLDFAST_BENCH_PASSTHROUGH=0` (no passthrough
//! side), `HOLDFAST_BENCH_THREADS=n`,
//! `HOLDFAST_BENCH_DIRTY_RATIO=n`, `HOLDFAST_BENCH_ONLY=seq,seqrw,random,meta,miss`.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use holdfast_core::lease::VolumeGate;
use holdfast_driver::datapath::{FenceAction, FuseOptions, FuseVolume};

const SEQ_MIB: usize = 256;
const RANDOM_OPS: usize = 1000;
const RANDOM_FILE: u64 = 64 << 20;
const META_FILES: usize = 2000;
const MISSING_NAMES: usize = 500;
const MISSING_ROUNDS: usize = 10;

const ROWS: [(&str, &str); 8] = [
    ("seq write total (+fsync)", "MiB/s"),
    ("  write(2) phase", "MiB/s"),
    ("  fsync phase", "MiB/s"),
    ("seq read 1 MiB (cold)", "MiB/s"),
    ("seq write O_RDWR (+fsync)", "MiB/s"),
    ("4k random write+fsync", "ops/s"),
    ("create/stat/unlink", "ops/s"),
    ("stat of a missing name", "ops/s"),
];

/// A workload: the key that selects it, and the rows (indexes into `ROWS`) it fills.
type Workload = (&'static str, &'static [usize], fn(&Path) -> Vec<f64>);

const WORKLOADS: [Workload; 5] = [
    ("seq", &[0, 1, 2, 3], seq_write_read),
    ("seqrw", &[4], seq_write_read_write_open),
    ("random", &[5], random_write_fsync),
    ("meta", &[6], metadata),
    ("miss", &[7], missing_lookups),
];

/// One row's figures: per side (bind first), and per FUSE side its per-round ratio to
/// bind.
#[derive(Default)]
struct Samples {
    side: Vec<Vec<f64>>,
    ratio: Vec<Vec<f64>>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n.is_multiple_of(2) {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    } else {
        v[n / 2]
    }
}

fn spread(v: &[f64]) -> (f64, f64) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

fn drop_caches() {
    rustix::fs::sync();
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

/// Writes `SEQ_MIB` MiB in 1 MiB writes and fsyncs (total, write phase, fsync phase, in
/// MiB/s), then reads the file back cold in 1 MiB reads (MiB/s) and removes it.
fn seq_write_read(dir: &Path) -> Vec<f64> {
    let path = dir.join("seq");
    let buf = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let mut f = File::create(&path).unwrap();
    for _ in 0..SEQ_MIB {
        f.write_all(&buf).unwrap();
    }
    let written = Instant::now();
    f.sync_all().unwrap();
    let synced = Instant::now();
    drop(f);
    let total = start.elapsed().as_secs_f64();
    let mib = SEQ_MIB as f64;
    let write_phase = (written - start).as_secs_f64();
    let fsync_phase = (synced - written).as_secs_f64();

    drop_caches();
    let mut buf = vec![0u8; 1 << 20];
    let start = Instant::now();
    let mut f = File::open(&path).unwrap();
    let mut read = 0usize;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        read += n;
    }
    let read_secs = start.elapsed().as_secs_f64();
    assert_eq!(read, SEQ_MIB << 20);
    fs::remove_file(&path).unwrap();
    vec![
        mib / total,
        mib / write_phase,
        mib / fsync_phase,
        mib / read_secs,
    ]
}

/// Creates (or truncates) `path`, opened read-write.
fn create_read_write(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap()
}

/// MiB/s of the sequential write with the file opened `O_RDWR`.
fn seq_write_read_write_open(dir: &Path) -> Vec<f64> {
    let path = dir.join("seqrw");
    let buf = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let mut f = create_read_write(&path);
    for _ in 0..SEQ_MIB {
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let total = start.elapsed().as_secs_f64();
    fs::remove_file(&path).unwrap();
    vec![SEQ_MIB as f64 / total]
}

/// ops/s of 4 KiB writes at random aligned offsets, each followed by fsync.
fn random_write_fsync(dir: &Path) -> Vec<f64> {
    let path = dir.join("random");
    let f = create_read_write(&path);
    f.set_len(RANDOM_FILE).unwrap();
    f.sync_all().unwrap();
    let buf = vec![0xa5u8; 4096];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let start = Instant::now();
    for _ in 0..RANDOM_OPS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % (RANDOM_FILE / 4096)) * 4096;
        f.write_all_at(&buf, off).unwrap();
        f.sync_all().unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    drop(f);
    fs::remove_file(&path).unwrap();
    vec![RANDOM_OPS as f64 / secs]
}

/// ops/s over create + stat + unlink of `META_FILES` files (3 ops each).
fn metadata(dir: &Path) -> Vec<f64> {
    // The same machine state for both sides. On this kind of VM, ext4's create/unlink
    // rate falls from about 40 000 to 4 000 ops/s after a few seconds of churn, and comes
    // back once the page cache is dropped (measured with a plain script, no FUSE). Without
    // this the row measured the VM's memory state, not the data path.
    drop_caches();
    let sub = dir.join("meta");
    fs::create_dir(&sub).unwrap();
    let names: Vec<PathBuf> = (0..META_FILES)
        .map(|i| sub.join(format!("f{i:05}")))
        .collect();
    let start = Instant::now();
    for n in &names {
        File::create(n).unwrap();
    }
    for n in &names {
        fs::metadata(n).unwrap();
    }
    for n in &names {
        fs::remove_file(n).unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    fs::remove_dir(&sub).unwrap();
    vec![(3 * META_FILES) as f64 / secs]
}

/// ops/s of `stat` on names that do not exist: `MISSING_NAMES` names, each asked
/// `MISSING_ROUNDS` times (a search path, a lock-file probe).
fn missing_lookups(dir: &Path) -> Vec<f64> {
    let names: Vec<PathBuf> = (0..MISSING_NAMES)
        .map(|i| dir.join(format!("absent{i:04}")))
        .collect();
    let start = Instant::now();
    for _ in 0..MISSING_ROUNDS {
        for n in &names {
            assert!(fs::metadata(n).is_err());
        }
    }
    let secs = start.elapsed().as_secs_f64();
    vec![(MISSING_NAMES * MISSING_ROUNDS) as f64 / secs]
}

fn env_flag(name: &str) -> Option<bool> {
    std::env::var(name).ok().map(|v| v == "1" || v == "true")
}

fn options_from_env() -> FuseOptions {
    let mut opts = FuseOptions::new(FenceAction::Error);
    if let Some(wb) = env_flag("HOLDFAST_BENCH_WRITEBACK") {
        opts.writeback_cache = wb;
    }
    if let Some(wt) = env_flag("HOLDFAST_BENCH_WRITE_THROUGH") {
        opts.write_through = Some(wt);
    }
    if let Ok(n) = std::env::var("HOLDFAST_BENCH_THREADS") {
        opts.threads = n.parse().unwrap();
    }
    opts
}

/// Prints the FUSE mount's BDI settings (and applies the dirty-ratio knob).
fn show_bdi(target: &Path) {
    let st = rustix::fs::stat(target).unwrap();
    let (maj, min) = (rustix::fs::major(st.st_dev), rustix::fs::minor(st.st_dev));
    let bdi = format!("/sys/class/bdi/{maj}:{min}");
    if let Ok(r) = std::env::var("HOLDFAST_BENCH_DIRTY_RATIO") {
        fs::write(format!("{bdi}/max_ratio"), r).unwrap();
    }
    for knob in ["read_ahead_kb", "max_ratio", "strict_limit"] {
        let v = fs::read_to_string(format!("{bdi}/{knob}")).unwrap_or_default();
        println!("fuse bdi {knob} = {}", v.trim());
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let reps: usize = std::env::var("HOLDFAST_BENCH_REPS")
        .map(|v| v.parse().unwrap())
        .unwrap_or(8);
    let only = std::env::var("HOLDFAST_BENCH_ONLY").unwrap_or_default();
    let want = |key: &str| only.is_empty() || only.split(',').any(|k| k == key);

    let base = std::env::var("HOLDFAST_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let backing = tempfile::tempdir_in(&base).unwrap();
    let bind_target = tempfile::tempdir_in(&base).unwrap();
    rustix::mount::mount_bind(backing.path(), bind_target.path()).expect("bind mount (root?)");

    let opts = options_from_env();
    println!(
        "fuse options: writeback_cache={} write_through={:?} threads={} max_write={} readahead_kb={}",
        opts.writeback_cache, opts.write_through, opts.threads, opts.max_write, opts.readahead_kb
    );
    let mount = |passthrough: bool| {
        let target = tempfile::tempdir_in(&base).unwrap();
        let opts = FuseOptions {
            passthrough,
            ..opts.clone()
        };
        let volume =
            FuseVolume::mount(backing.path(), target.path(), VolumeGate::unclaimed(), opts)
                .expect("FUSE mount");
        (target, volume)
    };
    // Both FUSE variants serve the same backing directory as the bind mount, in the same
    // rounds; the passthrough one only where the kernel fence loads and the kernel grants
    // passthrough (HOLDFAST_BENCH_PASSTHROUGH=0 leaves it out).
    let mut fuse_sides = vec![("fuse", mount(false))];
    if env_flag("HOLDFAST_BENCH_PASSTHROUGH") != Some(false) {
        let (target, volume) = mount(true);
        if volume.uses_passthrough() {
            fuse_sides.push(("passthrough", (target, volume)));
        } else {
            println!("fuse passthrough: unavailable here (no kernel fence, or no FUSE passthrough); not measured");
            volume.unmount().expect("unmount FUSE");
        }
    }
    for (_, (target, _)) in &fuse_sides {
        show_bdi(target.path());
    }
    let sides: Vec<(&str, &Path)> = std::iter::once(("bind", bind_target.path()))
        .chain(fuse_sides.iter().map(|(l, (t, _))| (*l, t.path())))
        .collect();

    let mut samples: Vec<Samples> = ROWS.iter().map(|_| Samples::default()).collect();
    let started = Instant::now();
    // Round 0 warms up (allocator, page cache, the daemon's buffers) and is not recorded.
    for round in 0..=reps {
        for (key, rows, work) in WORKLOADS {
            if !want(key) {
                continue;
            }
            let mut order: Vec<usize> = (0..sides.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            let mut got: Vec<Vec<f64>> = vec![Vec::new(); sides.len()];
            for i in order {
                let (label, mount) = sides[i];
                let dir = mount.join(format!("{label}-{round}-{key}"));
                fs::create_dir(&dir).unwrap();
                rustix::fs::sync();
                got[i] = work(&dir);
                fs::remove_dir(&dir).unwrap();
            }
            if round == 0 {
                continue;
            }
            for (i, &row) in rows.iter().enumerate() {
                let s = &mut samples[row];
                s.side.resize(sides.len(), Vec::new());
                s.ratio.resize(sides.len() - 1, Vec::new());
                for (side, figures) in got.iter().enumerate() {
                    s.side[side].push(figures[i]);
                    if side > 0 {
                        s.ratio[side - 1].push(figures[i] / got[0][i]);
                    }
                }
            }
        }
    }

    println!("\n{reps} rounds: median (min–max); ratio = median of per-round side/bind");
    let mut header = format!("{:<26} | {:>24}", "op", "bind");
    let mut rule = format!("{:-<26}-+-{:-<24}", "", "");
    for (label, _) in &sides[1..] {
        header += &format!(" | {label:>24} | {:>17}", format!("{label}/bind"));
        rule += &format!("-+-{:-<24}-+-{:-<17}", "", "");
    }
    println!("{header}\n{rule}");
    for ((name, unit), s) in ROWS.iter().zip(&samples) {
        if s.ratio.is_empty() {
            continue;
        }
        let cell = |v: &[f64]| {
            let (lo, hi) = spread(v);
            format!("{:>6.0} ({:>5.0}–{:<5.0}) {unit}", median(v), lo, hi)
        };
        let mut line = format!("{name:<26} | {:>24}", cell(&s.side[0]));
        for (side, ratio) in s.side[1..].iter().zip(&s.ratio) {
            let (lo, hi) = spread(ratio);
            line += &format!(
                " | {:>24} | {:>5.2} ({:.2}–{:.2})",
                cell(side),
                median(ratio),
                lo,
                hi
            );
        }
        println!("{line}");
    }
    println!("\ntotal {:.1?}", started.elapsed());

    for (_, (_, volume)) in fuse_sides {
        volume.unmount().expect("unmount FUSE");
    }
    rustix::mount::unmount(bind_target.path(), rustix::mount::UnmountFlags::empty())
        .expect("unmount bind");
}
