//! The node plugin's command line: one clap-derive [`Args`] struct (every flag has an
//! environment fallback, for DaemonSet manifests) and [`Args::resolve`], which checks the
//! combination and fills in mode-dependent defaults, producing the [`Config`] the
//! plugin runs with.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use holdfast_core::csi::serve::{Endpoint, EndpointError};
use holdfast_core::lease::LeaseParams;
use holdfast_core::lease_config::{parse_duration, LeaseArgs, LeaseConfigError, LeaseStoreKind};
pub use holdfast_core::logging::LogFormat;
use holdfast_core::store::StoreConfig;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ArgsError {
    #[error("--endpoint: {0}")]
    Endpoint(#[from] EndpointError),
    #[error("--node-id (or HOLDFAST_NODE_ID / KUBE_NODE_NAME) is required unless --standalone")]
    MissingNodeId,
    #[error("--node-id must not be empty")]
    EmptyNodeId,
    #[error("--backend-root {0:?} must be an absolute path")]
    BackendRoot(PathBuf),
    #[error("--state-dir {0:?} must be an absolute path")]
    StateDir(PathBuf),
    #[error(transparent)]
    Lease(#[from] LeaseConfigError),
    #[error("--metrics-address: {0}")]
    MetricsAddress(String),
    #[error("the hostname could not be read for the default --node-id: {0}")]
    Hostname(String),
}

/// holdfast node plugin: serves the CSI Identity and Node services on a unix socket and
/// keeps every published volume usable by exactly one pod at a time.
#[derive(Parser, Debug, Clone)]
#[command(name = "holdfast-driver", version)]
pub struct Args {
    /// CSI endpoint to listen on: unix:///path/to/socket. The socket file is replaced at
    /// start and removed at graceful stop.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub endpoint: String,

    /// This node's name as the CO knows it (Kubernetes: the Node object's name). Falls
    /// back to KUBE_NODE_NAME. Required unless --standalone, where it defaults to the
    /// hostname.
    #[arg(long, env = "HOLDFAST_NODE_ID")]
    pub node_id: Option<String>,

    /// Shared directory holding every volume (same path on every node: NFS, CephFS, or a
    /// local directory for one-machine setups). Volumes live in <root>/volumes/<id>.
    #[arg(long, env = "HOLDFAST_BACKEND_ROOT")]
    pub backend_root: PathBuf,

    /// Node-local directory for the plugin's own state and lock files.
    #[arg(long, env = "HOLDFAST_STATE_DIR", default_value = "/var/lib/holdfast")]
    pub state_dir: PathBuf,

    /// The lease store and lease timing, shared with the controller. The store defaults
    /// to memory with --standalone and to kubernetes otherwise.
    #[command(flatten)]
    pub lease: LeaseArgs,

    /// Log filter (tracing EnvFilter syntax: "info", "holdfast_driver=debug,info").
    #[arg(long, env = "HOLDFAST_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log line format.
    #[arg(long, env = "HOLDFAST_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// One-process mode for demos and tests: serves Identity, Controller and Node on the
    /// one socket, with an in-memory lease store unless --lease-store says otherwise.
    #[arg(long, env = "HOLDFAST_STANDALONE")]
    pub standalone: bool,

    /// Serve read-only and write-only opens of FUSE volumes by kernel passthrough (near
    /// bind-mount speed), fenced by BPF LSM programs the plugin pins on /sys/fs/bpf.
    /// Needs `bpf` in the kernel's active LSMs and a kernel that lets BPF LSM programs
    /// attach; where the programs cannot be loaded, volumes are served without
    /// passthrough. Off by default: see "Kernel passthrough" in the README.
    #[arg(long, env = "HOLDFAST_FUSE_PASSTHROUGH")]
    pub fuse_passthrough: bool,

    /// When this plugin starts after a predecessor died, the FUSE volumes that predecessor
    /// served are dead (every operation fails with ENOTCONN). Each such pod gets a Warning
    /// Event (reason VolumeDataPathLost); with this flag on, a pod that has a controller
    /// (StatefulSet, ReplicaSet, Job...) is also deleted, only if its UID is still the one
    /// that published (Event PodRestartedForDataPath), so that its controller recreates
    /// it and it mounts the volume again through the live plugin. A bare pod is only
    /// told. Needs a Kubernetes API (in-cluster or KUBECONFIG); without one, nothing is
    /// reported.
    #[arg(
        long,
        env = "HOLDFAST_RESTART_PODS_ON_DATA_PATH_LOSS",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_name = "BOOL"
    )]
    pub restart_pods_on_data_path_loss: bool,

    /// When a pod holding a volume on this node is gone (its object deleted, re-created
    /// with another UID, or its phase Succeeded/Failed) and NodeUnpublishVolume has not
    /// come this long after the plugin saw it gone (kubelet stopped while the plugin
    /// lives), the plugin checks that no process on the node still uses the volume's
    /// mounts (open files, cwd, a container's mount namespace showing it); if none
    /// does, it unmounts them, releases the claim, and posts a Normal Event
    /// (VolumeReleasedForGonePod) on the pod if it still exists. While one does, the
    /// claim stays. Watches this node's pods (needs a Kubernetes API and pods
    /// list/watch/get); 0 turns it off. Units: ms, s, m; a bare number is seconds.
    #[arg(
        long,
        env = "HOLDFAST_RELEASE_GONE_PODS_AFTER",
        default_value = "30s",
        value_parser = parse_bound,
        value_name = "DURATION"
    )]
    pub release_gone_pods_after: Duration,

    /// Where to serve Prometheus metrics on `/metrics`: `:PORT` (every interface),
    /// `host:port`, or `0` for off. Defaults to `:9810` (the DaemonSet's sidecars use
    /// 9808 and 9809 on the host network), and to off with --standalone.
    #[arg(long, env = "HOLDFAST_METRICS_ADDRESS", value_name = "ADDRESS")]
    pub metrics_address: Option<String>,
}

/// `--metrics-address` outside --standalone, unless given.
pub const DEFAULT_METRICS_ADDRESS: &str = ":9810";

/// A duration as `--lease-duration` takes it, or zero (`0`, `0s`): off.
fn parse_bound(text: &str) -> Result<Duration, String> {
    let number = text
        .trim()
        .trim_end_matches(|c: char| c.is_ascii_alphabetic());
    if number.parse::<f64>() == Ok(0.0) {
        return Ok(Duration::ZERO);
    }
    parse_duration(text)
}

/// The checked configuration the plugin runs with.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub endpoint: Endpoint,
    pub node_id: String,
    pub backend_root: PathBuf,
    pub state_dir: PathBuf,
    pub store: StoreConfig,
    pub lease_params: LeaseParams,
    pub log_level: String,
    pub log_format: LogFormat,
    pub standalone: bool,
    pub fuse_passthrough: bool,
    pub restart_pods_on_data_path_loss: bool,
    /// Zero: off.
    pub release_gone_pods_after: Duration,
    /// `None`: no metrics endpoint.
    pub metrics_address: Option<SocketAddr>,
}

impl Args {
    /// Checks the flags and fills in defaults. `kube_node_name` is the KUBE_NODE_NAME
    /// fallback and `hostname` the standalone default (passed in so this stays pure).
    pub fn resolve(
        self,
        kube_node_name: Option<String>,
        hostname: impl FnOnce() -> Result<String, String>,
    ) -> Result<Config, ArgsError> {
        let endpoint = Endpoint::parse(&self.endpoint)?;
        let node_id = match (self.node_id.or(kube_node_name), self.standalone) {
            (Some(id), _) => id,
            (None, true) => hostname().map_err(ArgsError::Hostname)?,
            (None, false) => return Err(ArgsError::MissingNodeId),
        };
        if node_id.trim().is_empty() {
            return Err(ArgsError::EmptyNodeId);
        }
        if !self.backend_root.is_absolute() {
            return Err(ArgsError::BackendRoot(self.backend_root));
        }
        if !self.state_dir.is_absolute() {
            return Err(ArgsError::StateDir(self.state_dir));
        }
        let metrics_address = match (&self.metrics_address, self.standalone) {
            (Some(text), _) => text.as_str(),
            (None, true) => "0",
            (None, false) => DEFAULT_METRICS_ADDRESS,
        };
        let metrics_address = holdfast_core::metrics_http::parse_address(metrics_address)
            .map_err(ArgsError::MetricsAddress)?;
        let default_store = if self.standalone {
            LeaseStoreKind::Memory
        } else {
            LeaseStoreKind::Kubernetes
        };
        Ok(Config {
            endpoint,
            node_id,
            backend_root: self.backend_root,
            state_dir: self.state_dir,
            store: self.lease.store_config_or(default_store)?,
            lease_params: self.lease.params()?,
            log_level: self.log_level,
            log_format: self.log_format,
            standalone: self.standalone,
            fuse_passthrough: self.fuse_passthrough,
            restart_pods_on_data_path_loss: self.restart_pods_on_data_path_loss,
            release_gone_pods_after: self.release_gone_pods_after,
            metrics_address,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["holdfast-driver", "--backend-root", "/srv/holdfast"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    fn no_host() -> Result<String, String> {
        Err("no hostname".into())
    }

    #[test]
    fn defaults_for_a_cluster_node() {
        let config = args(&["--node-id", "n1"]).resolve(None, no_host).unwrap();
        assert_eq!(
            config.endpoint.path(),
            std::path::Path::new("/csi/csi.sock")
        );
        assert_eq!(config.state_dir, PathBuf::from("/var/lib/holdfast"));
        assert!(matches!(config.store, StoreConfig::Kubernetes { .. }));
        assert_eq!(
            config.lease_params.duration,
            std::time::Duration::from_secs(15)
        );
        assert!(!config.standalone);
        assert!(config.restart_pods_on_data_path_loss);
        assert_eq!(config.release_gone_pods_after, Duration::from_secs(30));
        assert_eq!(
            config.metrics_address,
            Some("0.0.0.0:9810".parse().unwrap())
        );
    }

    #[test]
    fn metrics_are_served_by_default_except_standalone() {
        let standalone = args(&["--standalone"]).resolve(None, || Ok("box".into()));
        assert_eq!(standalone.unwrap().metrics_address, None);
        let config = args(&["--standalone", "--metrics-address", "127.0.0.1:1234"])
            .resolve(None, || Ok("box".into()))
            .unwrap();
        assert_eq!(
            config.metrics_address,
            Some("127.0.0.1:1234".parse().unwrap())
        );
        let off = args(&["--node-id", "n", "--metrics-address", "0"]).resolve(None, no_host);
        assert_eq!(off.unwrap().metrics_address, None);
        let bad = args(&["--node-id", "n", "--metrics-address", "nowhere"]).resolve(None, no_host);
        assert!(matches!(bad, Err(ArgsError::MetricsAddress(_))), "{bad:?}");
    }

    #[test]
    fn releasing_gone_pods_takes_a_bound_or_zero() {
        let bound = |flag: &str| {
            Args::try_parse_from([
                "holdfast-driver",
                "--backend-root",
                "/r",
                "--release-gone-pods-after",
                flag,
            ])
            .map(|a| a.release_gone_pods_after)
        };
        assert_eq!(bound("1500ms").unwrap(), Duration::from_millis(1500));
        assert_eq!(bound("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(bound("0").unwrap(), Duration::ZERO);
        assert_eq!(bound("0s").unwrap(), Duration::ZERO);
        assert!(bound("soon").is_err());
        assert!(bound("-1s").is_err());
    }

    #[test]
    fn restarting_pods_on_data_path_loss_can_be_turned_off() {
        let off = args(&["--node-id", "n", "--restart-pods-on-data-path-loss=false"]);
        assert!(
            !off.resolve(None, no_host)
                .unwrap()
                .restart_pods_on_data_path_loss
        );
        let on = args(&["--node-id", "n", "--restart-pods-on-data-path-loss", "true"]);
        assert!(
            on.resolve(None, no_host)
                .unwrap()
                .restart_pods_on_data_path_loss
        );
    }

    #[test]
    fn node_id_is_required_outside_standalone() {
        assert_eq!(
            args(&[]).resolve(None, no_host).unwrap_err(),
            ArgsError::MissingNodeId
        );
        let config = args(&[]).resolve(Some("kube-n".into()), no_host).unwrap();
        assert_eq!(config.node_id, "kube-n");
        // The explicit flag wins over KUBE_NODE_NAME.
        let config = args(&["--node-id", "n1"])
            .resolve(Some("kube-n".into()), no_host)
            .unwrap();
        assert_eq!(config.node_id, "n1");
    }

    #[test]
    fn standalone_defaults_to_hostname_and_memory_store() {
        let config = args(&["--standalone"])
            .resolve(None, || Ok("box".into()))
            .unwrap();
        assert_eq!(config.node_id, "box");
        assert_eq!(config.store, StoreConfig::Memory);
        // Standalone may share a real store with other processes.
        let config = args(&[
            "--standalone",
            "--lease-store",
            "etcd",
            "--etcd-endpoints",
            "http://127.0.0.1:2379",
        ])
        .resolve(None, || Ok("box".into()))
        .unwrap();
        assert!(matches!(config.store, StoreConfig::Etcd { .. }));
    }

    #[test]
    fn rejects_bad_values() {
        let err = args(&["--node-id", "n", "--endpoint", "tcp://x:1"])
            .resolve(None, no_host)
            .unwrap_err();
        assert!(matches!(err, ArgsError::Endpoint(_)));
        let err = args(&[
            "--node-id",
            "n",
            "--lease-duration",
            "5s",
            "--lease-margin",
            "5s",
        ])
        .resolve(None, no_host)
        .unwrap_err();
        assert!(matches!(err, ArgsError::Lease(_)), "{err:?}");
        let err = args(&["--node-id", "n", "--lease-store", "etcd"])
            .resolve(None, no_host)
            .unwrap_err();
        assert!(matches!(err, ArgsError::Lease(_)), "{err:?}");
        assert!(Args::try_parse_from(["holdfast-driver", "--node-id", "n"]).is_err());
        assert!(Args::try_parse_from([
            "holdfast-driver",
            "--backend-root",
            "/r",
            "--lease-store",
            "zookeeper"
        ])
        .is_err());
        assert_eq!(
            args(&["--node-id", " "])
                .resolve(None, no_host)
                .unwrap_err(),
            ArgsError::EmptyNodeId
        );
    }
}
