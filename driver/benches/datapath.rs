//! The FUSE data path against a bind mount of the same backing directory, same run.
//!
//! `cargo bench -p holdfast-driver --bench datapath` (as root). The backing directory is
//! on the real disk (`/var/tmp`, override with `HOLDFAST_BENCH_DIR`). Each workload runs
//! `REPS` times alternating bind and FUSE; the table shows medians and fuse/bind.
//! Sequential reads start cold: `sync` and `echo 3 > /proc/sys/vm/drop_caches` before
//! each read pass (for both mounts). Environment knobs for experiments:
//! `HOLDFAST_BENCH_WRITEBACK=1`, `HOLDFAST_BENCH_WRITE_THROUGH=1`, `HOLDFAST_BENCH_THREADS=n`,
//! `HOLDFAST_BENCH_DIRTY_RATIO=n`, `HOLDFAST_BENCH_ONLY=seq,random,meta`.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use holdfast_core::lease::VolumeGate;
use holdfast_driver::datapath::{FenceAction, FuseOptions, FuseVolume};

const REPS: usize = 4;
const SEQ_MIB: usize = 256;
const RANDOM_OPS: usize = 1000;
const RANDOM_FILE: u64 = 64 << 20;
const META_FILES: usize = 2000;

struct Row {
    name: &'static str,
    unit: &'static str,
    bind: Vec<f64>,
    fuse: Vec<f64>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n.is_multiple_of(2) {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    } else {
        v[n / 2]
    }
}

fn drop_caches() {
    rustix::fs::sync();
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

/// MiB/s writing `SEQ_MIB` MiB in 1 MiB writes, then fsync.
fn seq_write(dir: &Path) -> f64 {
    let path = dir.join("seq");
    let buf = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let mut f = File::create(&path).unwrap();
    for _ in 0..SEQ_MIB {
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let secs = start.elapsed().as_secs_f64();
    SEQ_MIB as f64 / secs
}

/// MiB/s reading the file `seq_write` left, cold, in 1 MiB reads.
fn seq_read(dir: &Path) -> f64 {
    let path = dir.join("seq");
    drop_caches();
    let mut buf = vec![0u8; 1 << 20];
    let start = Instant::now();
    let mut f = File::open(&path).unwrap();
    let mut total = 0usize;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n;
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(total, SEQ_MIB << 20);
    fs::remove_file(&path).unwrap();
    SEQ_MIB as f64 / secs
}

/// ops/s of 4 KiB writes at random aligned offsets, each followed by fsync.
fn random_write_fsync(dir: &Path) -> f64 {
    let path = dir.join("random");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
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
    RANDOM_OPS as f64 / secs
}

/// ops/s over create + stat + unlink of `META_FILES` files (3 ops each).
fn metadata(dir: &Path) -> f64 {
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
    (3 * META_FILES) as f64 / secs
}

fn env_flag(name: &str) -> Option<bool> {
    std::env::var(name).ok().map(|v| v == "1" || v == "true")
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let base = std::env::var("HOLDFAST_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let backing = tempfile::tempdir_in(&base).unwrap();
    let bind_target = tempfile::tempdir_in(&base).unwrap();
    let fuse_target = tempfile::tempdir_in(&base).unwrap();
    rustix::mount::mount_bind(backing.path(), bind_target.path()).expect("bind mount (root?)");

    let mut opts = FuseOptions::new(FenceAction::Error);
    if let Some(wb) = env_flag("HOLDFAST_BENCH_WRITEBACK") {
        opts.writeback_cache = wb;
    }
    if let Some(wt) = env_flag("HOLDFAST_BENCH_WRITE_THROUGH") {
        opts.write_through = wt;
    }
    if let Ok(n) = std::env::var("HOLDFAST_BENCH_THREADS") {
        opts.threads = n.parse().unwrap();
    }
    println!(
        "fuse options: writeback_cache={} write_through={} threads={} max_write={} readahead_kb={}",
        opts.writeback_cache, opts.write_through, opts.threads, opts.max_write, opts.readahead_kb
    );
    let volume = FuseVolume::mount(
        backing.path(),
        fuse_target.path(),
        VolumeGate::unclaimed(),
        opts,
    )
    .expect("FUSE mount");

    let st = rustix::fs::stat(fuse_target.path()).unwrap();
    let bdi = format!(
        "/sys/class/bdi/{}:{}",
        rustix::fs::major(st.st_dev),
        rustix::fs::minor(st.st_dev)
    );
    for knob in ["read_ahead_kb", "max_ratio", "strict_limit"] {
        let v = fs::read_to_string(format!("{bdi}/{knob}")).unwrap_or_default();
        println!("fuse bdi {knob} = {}", v.trim());
    }
    if let Ok(r) = std::env::var("HOLDFAST_BENCH_DIRTY_RATIO") {
        fs::write(format!("{bdi}/max_ratio"), r).unwrap();
    }

    let mut rows = vec![
        Row {
            name: "seq write 1 MiB (+fsync)",
            unit: "MiB/s",
            bind: vec![],
            fuse: vec![],
        },
        Row {
            name: "seq read 1 MiB (cold)",
            unit: "MiB/s",
            bind: vec![],
            fuse: vec![],
        },
        Row {
            name: "4 KiB random write+fsync",
            unit: "ops/s",
            bind: vec![],
            fuse: vec![],
        },
        Row {
            name: "create/stat/unlink",
            unit: "ops/s",
            bind: vec![],
            fuse: vec![],
        },
    ];
    let started = Instant::now();
    for rep in 0..REPS {
        // Alternate which mount goes first, so that neither always inherits the other's
        // leftovers (freed extents, journal state).
        let mut order = [("bind", bind_target.path()), ("fuse", fuse_target.path())];
        if rep % 2 == 1 {
            order.reverse();
        }
        for (label, mount) in order {
            let dir = mount.join(format!("{label}-{rep}"));
            fs::create_dir(&dir).unwrap();
            // Each timed workload starts with nothing dirty from the one before.
            let settled = |f: fn(&Path) -> f64| {
                rustix::fs::sync();
                f(&dir)
            };
            let only = std::env::var("HOLDFAST_BENCH_ONLY").unwrap_or_default();
            let want = |key: &str| only.is_empty() || only.split(',').any(|k| k == key);
            let results = [
                if want("seq") {
                    settled(seq_write)
                } else {
                    f64::NAN
                },
                if want("seq") {
                    seq_read(&dir)
                } else {
                    f64::NAN
                },
                if want("random") {
                    settled(random_write_fsync)
                } else {
                    f64::NAN
                },
                if want("meta") {
                    settled(metadata)
                } else {
                    f64::NAN
                },
            ];
            fs::remove_dir(&dir).unwrap();
            for (row, r) in rows.iter_mut().zip(results) {
                if label == "bind" {
                    row.bind.push(r)
                } else {
                    row.fuse.push(r)
                }
            }
        }
    }

    println!(
        "\n{:<28} | {:>12} | {:>12} | {:>6}",
        "op (median of 4)", "bind", "fuse", "ratio"
    );
    println!("{:-<28}-+-{:-<12}-+-{:-<12}-+-{:-<6}", "", "", "", "");
    for row in &mut rows {
        let (b, f) = (median(&mut row.bind), median(&mut row.fuse));
        println!(
            "{:<28} | {:>6.0} {:<5} | {:>6.0} {:<5} | {:>6.2}",
            row.name,
            b,
            row.unit,
            f,
            row.unit,
            f / b
        );
    }
    println!("\ntotal {:.1?}", started.elapsed().max(Duration::ZERO));

    volume.unmount().expect("unmount FUSE");
    rustix::mount::unmount(bind_target.path(), rustix::mount::UnmountFlags::empty())
        .expect("unmount bind");
}
