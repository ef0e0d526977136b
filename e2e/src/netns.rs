//! [`NetNs`]: one node's network namespace, linked to the host by a veth pair, and
//! the partition / heal faults on that link.
//!
//! Names: namespace `hf-e2e-<pid>-<cluster>-<k>`, veths `hf<pid>c<cluster>h<k>` (host
//! end) and `…n<k>` (node end), all under 15 characters. Addresses: a free /30 from
//! 169.254.64.0/18 (link-local, so nothing on a real network is shadowed): host end
//! `.1`, node end `.2`, default route of the namespace via the host end.
//!
//! A partition takes the host end of the veth down: packets in both directions are
//! dropped (no RST), as when a cable is cut, so open TCP connections to etcd stall
//! rather than fail fast. The backend root is a local directory and stays reachable,
//! like shared storage on a separate network.
//!
//! Processes enter the namespace with `nsenter --net=` only: `ip netns exec` would also
//! give them a private mount namespace, hiding their FUSE mounts from the host.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

/// Serializes address allocation within this process.
static ALLOCATE: Mutex<()> = Mutex::new(());
const NS_PREFIX: &str = "hf-e2e-";

pub struct NetNs {
    pub name: String,
    pub host_veth: String,
    pub node_veth: String,
    pub host_ip: Ipv4Addr,
    pub node_ip: Ipv4Addr,
}

/// Runs `ip <args>`; panics with its stderr on failure (setup must not half-succeed).
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip_quiet(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn ip_output(args: &[&str]) -> String {
    Command::new("ip")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

impl NetNs {
    /// Creates namespace `k` of cluster `cluster` with its veth link up.
    pub fn create(cluster: u32, k: usize) -> NetNs {
        let pid = std::process::id();
        let name = format!("{NS_PREFIX}{pid}-{cluster}-{k}");
        let host_veth = format!("hf{pid}c{cluster}h{k}");
        let node_veth = format!("hf{pid}c{cluster}n{k}");
        let _guard = ALLOCATE.lock().unwrap_or_else(|e| e.into_inner());
        let (host_ip, node_ip) = free_subnet();
        ip(&["netns", "add", &name]);
        let ns = NetNs {
            name,
            host_veth,
            node_veth,
            host_ip,
            node_ip,
        };
        ip(&[
            "link",
            "add",
            &ns.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            &ns.node_veth,
        ]);
        ip(&["link", "set", &ns.node_veth, "netns", &ns.name]);
        ip(&[
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &ns.host_veth,
        ]);
        ip(&["link", "set", &ns.host_veth, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns.name, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        inside(&["link", "set", "lo", "up"]);
        inside(&[
            "addr",
            "add",
            &format!("{node_ip}/30"),
            "dev",
            &ns.node_veth,
        ]);
        inside(&["link", "set", &ns.node_veth, "up"]);
        inside(&["route", "add", "default", "via", &host_ip.to_string()]);
        ns
    }

    /// The file `nsenter --net=` takes.
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// Cuts the link (host end down).
    pub fn partition(&self) {
        ip(&["link", "set", &self.host_veth, "down"]);
    }

    /// Restores the link.
    pub fn heal(&self) {
        ip(&["link", "set", &self.host_veth, "up"]);
    }

    /// Whether a TCP connection from inside this namespace to `addr` opens within
    /// `timeout`. Runs on a fresh thread moved into the namespace (a network namespace
    /// is per thread), so nothing else in the test process changes namespace.
    pub fn can_connect(&self, addr: SocketAddr, timeout: Duration) -> bool {
        let path = self.path();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open netns file");
            // SAFETY: setns on a valid namespace fd affects only this thread.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            TcpStream::connect_timeout(&addr, timeout).is_ok()
        })
        .join()
        .expect("connect probe thread")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace destroys the node end and with it the pair.
        ip_quiet(&["link", "del", &self.host_veth]);
        ip_quiet(&["netns", "del", &self.name]);
    }
}

/// The first /30 in 169.254.64.0/18 with no address on any host interface.
fn free_subnet() -> (Ipv4Addr, Ipv4Addr) {
    let used = ip_output(&["-o", "-4", "addr", "show"]);
    for x in 64u8..128 {
        for y in (0u8..=252).step_by(4) {
            let host = Ipv4Addr::new(169, 254, x, y + 1);
            let node = Ipv4Addr::new(169, 254, x, y + 2);
            let taken = |a: Ipv4Addr| used.contains(&format!("inet {a}/"));
            if !taken(host) && !taken(node) {
                return (host, node);
            }
        }
    }
    panic!("no free /30 in 169.254.64.0/18");
}

/// Removes namespaces and host veths left by earlier runs whose process is gone.
pub fn remove_stale() {
    let alive = |pid: &str| std::path::Path::new(&format!("/proc/{pid}")).exists();
    for line in ip_output(&["netns", "list"]).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if let Some(rest) = name.strip_prefix(NS_PREFIX) {
            let pid = rest.split('-').next().unwrap_or_default();
            if !alive(pid) {
                ip_quiet(&["netns", "del", name]);
            }
        }
    }
    for line in ip_output(&["-o", "link", "show"]).lines() {
        // `<index>: <name>@<peer>: …`
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or_default();
        if let Some(rest) = name.strip_prefix("hf") {
            let pid: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            if !pid.is_empty() && rest[pid.len()..].starts_with('c') && !alive(&pid) {
                ip_quiet(&["link", "del", name]);
            }
        }
    }
}
