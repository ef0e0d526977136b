//! Runs a test binary inside a virtual machine booted from a kernel of our choice, for
//! tests that need a kernel feature the host's kernel lacks (BPF LSM, for the kernel
//! fence).
//!
//! The guest is QEMU with TCG (software emulation: it works wherever QEMU is installed,
//! nested virtualisation or not), booted straight into an initramfs that holds only
//! busybox, the binary at the same absolute path it has on the host (tests re-execute
//! themselves through `/proc/self/exe`), the shared libraries `ldd` lists for it, and an
//! `/init` that mounts what the tests expect, runs the binary and powers off. The
//! console is the binary's output; `/init` prints the kernel release, the active LSMs
//! and the binary's exit status on it.
//!
//! Kernels: `HOLDFAST_VM_KERNELS` names a `vmlinuz` file or a directory of them (default
//! `../shared/vm` beside the workspace). A module `fuse-<release>.ko` next to
//! `vmlinuz-<release>` is loaded before the binary runs.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The LSMs the guest boots with: Debian's default list, plus `bpf`.
pub const LSM: &str = "landlock,lockdown,yama,integrity,apparmor,bpf";

/// Console marker lines printed by `/init`.
const KERNEL_MARK: &str = "holdfast-vm: kernel ";
const LSM_MARK: &str = "holdfast-vm: lsm ";
const EXIT_MARK: &str = "holdfast-vm: exit ";

/// A bootable kernel and the modules the guest loads before running the binary.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// What follows `vmlinuz-` in its file name (the release, for Debian's kernels).
    pub name: String,
    pub vmlinuz: PathBuf,
    pub modules: Vec<PathBuf>,
}

/// The outcome of one boot.
#[derive(Debug)]
pub struct VmRun {
    /// Everything the guest printed on its console.
    pub console: String,
    /// `uname -r` in the guest.
    pub release: String,
    /// `/sys/kernel/security/lsm` in the guest.
    pub lsms: String,
    /// The binary's exit status; `None` if the guest never reported one.
    pub status: Option<i32>,
    pub took: Duration,
}

impl VmRun {
    pub fn passed(&self) -> bool {
        self.status == Some(0)
    }
}

/// Where the kernels are: `HOLDFAST_VM_KERNELS`, or `../shared/vm` beside the workspace.
pub fn kernel_source() -> PathBuf {
    std::env::var_os("HOLDFAST_VM_KERNELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/vm"))
}

fn kernel_at(vmlinuz: &Path) -> Option<Kernel> {
    let file = vmlinuz.file_name()?.to_str()?;
    let name = file.strip_prefix("vmlinuz-")?.to_string();
    let module = vmlinuz.with_file_name(format!("fuse-{name}.ko"));
    Some(Kernel {
        modules: module.exists().then_some(module).into_iter().collect(),
        name,
        vmlinuz: vmlinuz.to_path_buf(),
    })
}

/// The kernels at [`kernel_source`], sorted by name, or why there are none.
pub fn kernels() -> Result<Vec<Kernel>, String> {
    let source = kernel_source();
    if source.is_file() {
        return kernel_at(&source)
            .map(|k| vec![k])
            .ok_or_else(|| format!("{}: not named vmlinuz-<release>", source.display()));
    }
    let entries = std::fs::read_dir(&source)
        .map_err(|e| format!("no kernels at {}: {e}", source.display()))?;
    let mut found: Vec<Kernel> = entries
        .flatten()
        .filter_map(|e| kernel_at(&e.path()))
        .collect();
    found.sort_by(|a, b| a.name.cmp(&b.name));
    if found.is_empty() {
        return Err(format!("no vmlinuz-* in {}", source.display()));
    }
    Ok(found)
}

/// Why a VM cannot be started on this host, if it cannot.
pub fn unavailable() -> Option<String> {
    for tool in ["qemu-system-x86_64", "busybox", "cpio", "gzip"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!(
                "{tool} is not installed (scripts/setup.sh installs it)"
            ));
        }
    }
    kernels().err()
}

/// `s` as one word for the guest's shell.
fn quoted(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The absolute paths of the shared libraries `binary` loads, its loader included.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, String> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| format!("ldd: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // Lines are `name => /path (addr)`, `/path (addr)`, or `linux-vdso.so.1 (addr)`.
    Ok(text
        .lines()
        .filter_map(|l| {
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Copies `from` to the same absolute path under `root` (following symlinks: the guest
/// needs the file, not the host's layout of links).
fn copy_into(root: &Path, from: &Path) -> Result<(), String> {
    let to = root.join(from.strip_prefix("/").map_err(|_| "relative path")?);
    std::fs::create_dir_all(to.parent().expect("has a parent"))
        .and_then(|()| std::fs::copy(from, &to).map(|_| ()))
        .map_err(|e| format!("copy {} into the initramfs: {e}", from.display()))
}

fn init_script(kernel: &Kernel, binary: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let modules: String = kernel
        .modules
        .iter()
        .map(|m| {
            format!(
                "insmod /modules/{}\n",
                m.file_name().unwrap().to_string_lossy()
            )
        })
        .collect();
    let env: Vec<String> = env
        .iter()
        .map(|(k, v)| quoted(&format!("{k}={v}")))
        .collect();
    let command: Vec<String> = std::iter::once(binary.to_string_lossy().into_owned())
        .chain(args.iter().map(|a| a.to_string()))
        .map(|a| quoted(&a))
        .collect();
    format!(
        r#"#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t securityfs securityfs /sys/kernel/security
mount -t bpf bpf /sys/fs/bpf
{modules}mount -t fusectl fusectl /sys/fs/fuse/connections
# A tmpfs over /tmp, /var/tmp or /run would hide the test binary when the workspace
# lives there (a CI clone under /tmp): move it aside and put it back on the new mount.
bin={bin}
mv "$bin" /.test-binary
for d in /tmp /var/tmp /run; do mount -t tmpfs tmpfs $d; done
mkdir -p "${{bin%/*}}" && mv /.test-binary "$bin"
echo "{KERNEL_MARK}$(uname -r)"
echo "{LSM_MARK}$(cat /sys/kernel/security/lsm)"
# The kernel's default of 1024 open files is for init alone; a FUSE daemon holds one
# per inode it knows, as it may on a host.
ulimit -n 1048576
cd /tmp
env {env} RUST_BACKTRACE=1 {command}
echo "{EXIT_MARK}$?"
poweroff -f
"#,
        env = env.join(" "),
        command = command.join(" "),
        bin = quoted(&binary.to_string_lossy()),
    )
}

/// Builds the gzip'd newc initramfs for one run into `dir`, returning its path.
fn initramfs(
    dir: &Path,
    kernel: &Kernel,
    binary: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<PathBuf, String> {
    let root = dir.join("root");
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "var/tmp", "run",
        "root", "modules",
    ] {
        std::fs::create_dir_all(root.join(d)).map_err(|e| format!("create {d}: {e}"))?;
    }
    let busybox = Command::new("sh")
        .args(["-c", "command -v busybox"])
        .output()
        .map_err(|e| format!("find busybox: {e}"))?;
    let busybox = String::from_utf8_lossy(&busybox.stdout).trim().to_string();
    std::fs::copy(&busybox, root.join("bin/busybox"))
        .map_err(|e| format!("copy {busybox}: {e}"))?;
    // One link per applet, so that the binary finds `sh`, `mount` and the like on PATH.
    let applets = Command::new(&busybox)
        .arg("--list-full")
        .output()
        .map_err(|e| format!("busybox --list-full: {e}"))?;
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        let link = root.join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("/bin/busybox", &link)
                .map_err(|e| format!("link {applet}: {e}"))?;
        }
    }
    let binary = binary
        .canonicalize()
        .map_err(|e| format!("{}: {e}", binary.display()))?;
    copy_into(&root, &binary)?;
    // Debug info is nine tenths of a test binary and the guest unpacks every byte in
    // emulation; symbols (for backtraces) stay. Without `strip` the full copy is used.
    let _ = Command::new("strip")
        .arg("--strip-debug")
        .arg(
            root.join(
                binary
                    .strip_prefix("/")
                    .expect("canonical path is absolute"),
            ),
        )
        .stderr(Stdio::null())
        .status();
    for lib in shared_libraries(&binary)? {
        copy_into(&root, &lib)?;
    }
    for m in &kernel.modules {
        std::fs::copy(m, root.join("modules").join(m.file_name().unwrap()))
            .map_err(|e| format!("copy {}: {e}", m.display()))?;
    }
    let init = root.join("init");
    std::fs::write(&init, init_script(kernel, &binary, args, env))
        .map_err(|e| format!("write /init: {e}"))?;
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(|e| format!("chmod /init: {e}"))?;

    let image = dir.join("initrd.gz");
    // Fastest gzip level: the image is used once and the guest unpacks it in emulation.
    let status = Command::new("sh")
        .arg("-c")
        .arg(r#"cd "$1" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1 > "$2""#)
        .args(["sh"])
        .arg(&root)
        .arg(&image)
        .status()
        .map_err(|e| format!("cpio: {e}"))?;
    if !status.success() {
        return Err(format!("building the initramfs failed: {status}"));
    }
    Ok(image)
}

fn marked<'a>(console: &'a str, mark: &str) -> Option<&'a str> {
    console
        .lines()
        .find_map(|l| l.trim_end_matches('\r').split_once(mark))
        .map(|(_, v)| v.trim())
}

/// Boots `kernel` with BPF LSM enabled, runs `binary args…` as root in the guest with
/// `env` added, and returns the console once the guest powered off (or `timeout`
/// passed: the guest is then killed and `status` is `None`). `Err` only when the VM
/// could not be started at all.
pub fn run(
    kernel: &Kernel,
    binary: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<VmRun, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
    let image = initramfs(dir.path(), kernel, binary, args, env)?;
    let started = Instant::now();
    let append = format!("console=ttyS0 lsm={LSM} panic=-1 loglevel=4 rdinit=/init");
    let mut qemu = Command::new("qemu-system-x86_64")
        // KVM cannot be relied on (absent, or unable to boot a guest under nested
        // virtualisation); TCG runs anywhere.
        .args(["-accel", "tcg", "-cpu", "max", "-m", "2G", "-smp", "2"])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .args(["-monitor", "none", "-kernel"])
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(&image)
        .args(["-append", &append])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("start qemu-system-x86_64: {e}"))?;
    let mut stdout = qemu.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        out
    });
    let mut timed_out = false;
    let exit = loop {
        match qemu.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > timeout => {
                timed_out = true;
                let _ = qemu.kill();
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(format!("wait for qemu: {e}")),
        }
    };
    let console = String::from_utf8_lossy(&reader.join().unwrap_or_default()).into_owned();
    let mut stderr = String::new();
    if let Some(mut e) = qemu.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let release = marked(&console, KERNEL_MARK).map(str::to_string);
    if release.is_none() && !timed_out {
        return Err(format!(
            "the guest never ran /init (qemu {exit}): {}\n{console}",
            stderr.trim()
        ));
    }
    Ok(VmRun {
        release: release.unwrap_or_default(),
        lsms: marked(&console, LSM_MARK).unwrap_or_default().to_string(),
        status: marked(&console, EXIT_MARK).and_then(|s| s.parse().ok()),
        took: started.elapsed(),
        console,
    })
}
