//! The controller's command line: clap-derive structs whose every flag has an
//! environment fallback (for Deployment manifests). Without a subcommand the binary
//! serves CSI ([`ServeArgs`]); the `fence`, `unfence` and `claims` subcommands are the
//! admin and fencing-agent verbs, run against the same lease store as the node plugins.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use holdfast_core::lease_config::{
    parse_duration, LeaseArgs, LeaseStoreKind, FALLBACK_NAMESPACE, POD_NAMESPACE_PATH,
};
use holdfast_core::logging::LogFormat;

use crate::kubernetes::leader::{default_identity, LeaderConfig, LeaderConfigError};

/// holdfast controller: serves the CSI Identity and Controller services on a unix
/// socket (the default, or `serve`), and fences nodes and lists volume claims in the
/// lease store (`fence`, `unfence`, `claims`).
#[derive(Parser, Debug, Clone)]
#[command(
    name = "holdfast-controller",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Args {
    #[command(flatten)]
    pub serve: ServeArgs,

    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Args {
    /// What to do: the subcommand given, or serving CSI with the top-level flags.
    pub fn into_command(self) -> Command {
        self.command.unwrap_or(Command::Serve(self.serve))
    }
}

// Parsed once at start and matched at once: boxing the serve flags would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Serve the CSI Identity and Controller services (what the binary does without a
    /// subcommand).
    Serve(ServeArgs),
    Fence(FenceArgs),
    Unfence(UnfenceArgs),
    Claims(ClaimsArgs),
    Status(StatusArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// CSI endpoint to listen on: unix:///path/to/socket. A stale socket file is
    /// replaced at start; the socket is removed at graceful stop (SIGTERM/SIGINT).
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub endpoint: String,

    /// Shared directory holding every volume (the same path the node plugins use).
    // An `Option` only so that a subcommand can lift the requirement at the top level
    // (`subcommand_negates_reqs`); clap still requires it whenever serving.
    #[arg(long, env = "HOLDFAST_BACKEND_ROOT", required = true)]
    pub backend_root: Option<PathBuf>,

    /// Log filter: a level (info, debug…) or an EnvFilter directive list.
    #[arg(long, env = "HOLDFAST_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log line format.
    #[arg(long, env = "HOLDFAST_LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,

    /// The store the node plugins share, read by the attach gate, and the lease timing
    /// by which it judges their sessions (both checked at start).
    #[command(flatten)]
    pub lease: LeaseArgs,

    #[command(flatten)]
    pub leader: LeaderArgs,

    /// Watch Nodes and fence those that carry the node.kubernetes.io/out-of-service
    /// taint. Default: on with --lease-store=kubernetes or inside a pod.
    #[arg(long, env = "HOLDFAST_WATCH_NODES", num_args = 0..=1, default_missing_value = "true")]
    pub watch_nodes: Option<bool>,

    /// How long each Node watch request lasts before the API server ends it and the
    /// watch resumes from where it was (no re-list).
    #[arg(long, env = "HOLDFAST_NODE_WATCH_TIMEOUT", default_value = "290s", value_parser = parse_duration)]
    pub node_watch_timeout: Duration,

    /// Publish Events (events.k8s.io/v1) on the pods and PVCs whose attach the gate
    /// refuses, that take a volume over, or whose volume an out-of-service taint frees;
    /// watches VolumeAttachments, Pods and PersistentVolumes while leading. Default: on
    /// with --lease-store=kubernetes or inside a pod.
    #[arg(long, env = "HOLDFAST_EVENTS", num_args = 0..=1, default_missing_value = "true")]
    pub events: Option<bool>,

    /// How long each VolumeAttachment, Pod and PersistentVolume watch request lasts
    /// before the API server ends it and the watch resumes from where it was.
    #[arg(long, env = "HOLDFAST_EVENTS_WATCH_TIMEOUT", default_value = "290s", value_parser = parse_duration)]
    pub events_watch_timeout: Duration,

    /// Serve Prometheus metrics on http://<address>/metrics: `:9809` (every interface),
    /// `host:port`, or empty / `0` for off.
    #[arg(long, env = "HOLDFAST_METRICS_ADDRESS", default_value = ":9809")]
    pub metrics_address: String,

    /// How often the leader looks for claims whose holder's lease expired, to mark them
    /// (for `status` and events). Default: the sessions' renewal interval D/3. `0`
    /// turns the sweep off. With --lease-store=etcd every sweep lists every claim; with
    /// kubernetes the sessions come from a watch of their Lease objects and a sweep
    /// reads only the claims of nodes whose session went silent (see
    /// --expiry-full-every).
    #[arg(long, env = "HOLDFAST_EXPIRY_INTERVAL", value_parser = parse_zero_or_duration)]
    pub expiry_interval: Option<Duration>,

    /// With --lease-store=kubernetes: every how many sweeps one reads every claim
    /// anyway (and updates the claims gauge, which only such sweeps can count).
    #[arg(long, env = "HOLDFAST_EXPIRY_FULL_EVERY", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub expiry_full_every: u32,
}

impl ServeArgs {
    /// Whether the Kubernetes API is where this controller runs: the lease store is
    /// kubernetes, or it runs in a pod (`KUBERNETES_SERVICE_HOST` is set).
    pub fn kubernetes_by_default(&self) -> bool {
        self.lease
            .lease_store
            .is_none_or(|s| s == LeaseStoreKind::Kubernetes)
            || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
    }

    /// `--leader-elect`, defaulted.
    pub fn leader_elect(&self) -> bool {
        self.leader
            .leader_elect
            .unwrap_or_else(|| self.kubernetes_by_default())
    }

    /// `--watch-nodes`, defaulted.
    pub fn watch_nodes(&self) -> bool {
        self.watch_nodes
            .unwrap_or_else(|| self.kubernetes_by_default())
    }

    /// `--events`, defaulted.
    pub fn events(&self) -> bool {
        self.events.unwrap_or_else(|| self.kubernetes_by_default())
    }
}

/// Leader election among controller replicas: only the leader acts (fences nodes for
/// their taint); every replica serves CSI. See `leader.rs` for the rules.
#[derive(clap::Args, Debug, Clone, PartialEq)]
#[command(next_help_heading = "Leader election")]
pub struct LeaderArgs {
    /// Elect a leader on a coordination.k8s.io/v1 Lease. Default: on with
    /// --lease-store=kubernetes or inside a pod.
    #[arg(long, env = "HOLDFAST_LEADER_ELECT", num_args = 0..=1, default_missing_value = "true")]
    pub leader_elect: Option<bool>,

    /// Namespace of the leader Lease. Default: $POD_NAMESPACE, the pod's own namespace,
    /// or "holdfast" outside a pod.
    #[arg(long, env = "HOLDFAST_LEADER_ELECT_NAMESPACE")]
    pub leader_elect_namespace: Option<String>,

    /// Name of the leader Lease.
    #[arg(long, env = "HOLDFAST_LEADER_ELECT_LEASE", default_value = crate::kubernetes::leader::DEFAULT_LEASE_NAME)]
    pub leader_elect_lease: String,

    /// This replica's holder identity. Default: $POD_NAME or the host name, with a
    /// random suffix.
    #[arg(long, env = "HOLDFAST_LEADER_ELECT_IDENTITY")]
    pub leader_elect_identity: Option<String>,

    /// How long the Lease must stay unrenewed before another replica takes over.
    #[arg(long, env = "HOLDFAST_LEADER_ELECT_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub leader_elect_lease_duration: Duration,

    /// How long a leader keeps acting after it sent its last successful renewal; below
    /// the lease duration.
    #[arg(long, env = "HOLDFAST_LEADER_ELECT_RENEW_DEADLINE", default_value = "10s", value_parser = parse_duration)]
    pub leader_elect_renew_deadline: Duration,

    /// How often to try to acquire or renew; below the renew deadline.
    #[arg(long, env = "HOLDFAST_LEADER_ELECT_RETRY_PERIOD", default_value = "2s", value_parser = parse_duration)]
    pub leader_elect_retry_period: Duration,
}

impl LeaderArgs {
    /// The election's settings, checked.
    pub fn config(&self) -> Result<LeaderConfig, LeaderConfigError> {
        let namespace = self
            .leader_elect_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .or_else(|| {
                std::fs::read_to_string(POD_NAMESPACE_PATH)
                    .ok()
                    .map(|n| n.trim().to_string())
                    .filter(|n| !n.is_empty())
            })
            .unwrap_or_else(|| FALLBACK_NAMESPACE.to_string());
        let config = LeaderConfig {
            namespace,
            name: self.leader_elect_lease.clone(),
            identity: self
                .leader_elect_identity
                .clone()
                .unwrap_or_else(default_identity),
            lease_duration: self.leader_elect_lease_duration,
            renew_deadline: self.leader_elect_renew_deadline,
            retry_period: self.leader_elect_retry_period,
        };
        config.validate()?;
        Ok(config)
    }
}

/// Fence a node known to be down: free its volume claims at once (see SAFETY in --help).
///
/// Writes a fence record for the node, then marks each claim the node holds as fenced
/// with a new, higher epoch, and prints the claims it freed with their new epochs. From
/// that moment pods on other nodes may take those volumes without waiting for the
/// node's session to expire. Fencing an already fenced node is not an error: it fences
/// any claim still held and reports the node as already fenced.
///
/// SAFETY: this command stops nothing on the fenced node. Use it after the node is
/// confirmed powered off (the job of a fencing agent), or is otherwise known to have
/// stopped all I/O on its volumes. Fencing a node that is still running is safe only
/// because that node's plugin stops all I/O on its volumes when it sees the fence in
/// the lease store, or a higher epoch on the volume's storage, within one renewal
/// interval (D/3). A running node that can reach neither the store nor the storage
/// does not see the fence: it may keep writing until its own lease deadline, while a
/// new holder already writes the same volume. Do not fence a node that may be running
/// but cut off; power it off first, or wait for its lease to expire on its own.
#[derive(clap::Args, Debug, Clone)]
#[command(verbatim_doc_comment)]
pub struct FenceArgs {
    /// The node's name as the CO knows it (the node plugin's --node-id).
    #[arg(long)]
    pub node: String,

    /// Why, recorded in the fence record for events and logs.
    #[arg(long, default_value = "fenced with holdfast-controller fence")]
    pub reason: String,

    /// How to print the result on stdout.
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: OutputFormat,

    #[command(flatten)]
    pub lease: LeaseArgs,
}

/// Lift a node's fence, so that its plugin may take volumes again.
///
/// Claims fenced earlier stay fenced (their holders have lost them); the node's plugin
/// resumes renewing its session and may acquire volumes anew. Unfencing a node that is
/// not fenced is not an error.
#[derive(clap::Args, Debug, Clone)]
pub struct UnfenceArgs {
    /// The node's name as the CO knows it.
    #[arg(long)]
    pub node: String,

    /// How to print the result on stdout.
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: OutputFormat,

    #[command(flatten)]
    pub lease: LeaseArgs,
}

/// List volume claims: volume, holder (pod, node, session instance), state, epoch, and
/// whether the holder's node is fenced.
#[derive(clap::Args, Debug, Clone)]
pub struct ClaimsArgs {
    /// Only claims whose holder runs on this node.
    #[arg(long)]
    pub node: Option<String>,

    /// How to print the result on stdout.
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: OutputFormat,

    #[command(flatten)]
    pub lease: LeaseArgs,
}

/// Show every volume claim: holder pod (namespace/name and UID), node, state, epoch,
/// the holder's session as this command sees it, the expired marks the controller
/// wrote, and the fences of the nodes named.
///
/// This command trusts no other machine's clock and has timed no session before it
/// started, so it reports only what it sees itself:
///
///   SESSION  live: the session record changed (was renewed) during --observe;
///            unknown: not seen renewed (always so with --observe=0: watch for at
///            least D/3, the renewal interval, to tell a live holder from a silent
///            one); expired: seen unchanged for W = D(1+e)+margin, the acquire rule;
///            gone: no session record, its owner can no longer write.
///   AGE      renewals x D/3: an estimate of how long the session has renewed.
///   EXPIRES  an upper bound on the time to expiry: if the holder is not renewed
///            again, its lease has certainly expired (it has self-fenced and any
///            node that has watched as long may take the volume) W = D(1+e)+margin
///            after this command first saw its last renewal. Node plugins and the
///            controller time it on their own clocks, from their own first sighting.
///   NOTE     "self-fenced by T": the controller judged the holder's lease expired
///            and estimates T on its wall clock (an estimate for people, not a
///            decision); "stale" when the session renewed after all.
///
/// With -o json the output is one document of schema "holdfast.status/v1"
/// (see the README).
#[derive(clap::Args, Debug, Clone)]
#[command(verbatim_doc_comment)]
pub struct StatusArgs {
    /// Watch the held claims' sessions this long before reporting (e.g. 5s; 0: read
    /// once).
    #[arg(long, default_value = "0s", value_parser = parse_zero_or_duration)]
    pub observe: Duration,

    /// Only claims whose holder runs on this node.
    #[arg(long)]
    pub node: Option<String>,

    /// How to print the result on stdout.
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: OutputFormat,

    #[command(flatten)]
    pub lease: LeaseArgs,
}

/// A duration, or zero (`0`, `0s`, `0ms`: none, off), which `parse_duration`, made for
/// lease timing, refuses.
fn parse_zero_or_duration(text: &str) -> Result<Duration, String> {
    match text
        .trim()
        .trim_end_matches(['s', 'm'])
        .trim_end_matches('m')
    {
        "0" => Ok(Duration::ZERO),
        _ => parse_duration(text),
    }
}

/// How the admin subcommands print their result on stdout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for people.
    Table,
    /// One JSON document, for scripts and fencing agents.
    Json,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<Command, clap::Error> {
        let mut all = vec!["holdfast-controller"];
        all.extend_from_slice(argv);
        Args::try_parse_from(all).map(Args::into_command)
    }

    #[test]
    fn serving_is_the_default_and_serve_an_alias() {
        let Command::Serve(args) = parse(&["--backend-root", "/srv/holdfast"]).unwrap() else {
            panic!("no subcommand means serve");
        };
        assert_eq!(args.endpoint, "unix:///csi/csi.sock");
        assert_eq!(args.backend_root, Some(PathBuf::from("/srv/holdfast")));
        assert_eq!(args.log_level, "info");
        assert_eq!(args.log_format, LogFormat::Json);
        assert_eq!(args.metrics_address, ":9809");
        assert_eq!(args.leader.leader_elect, None);
        let leader = args.leader.config().unwrap();
        assert_eq!(leader.name, "holdfast-controller-leader");
        assert_eq!(
            (
                leader.lease_duration,
                leader.renew_deadline,
                leader.retry_period
            ),
            (
                Duration::from_secs(15),
                Duration::from_secs(10),
                Duration::from_secs(2)
            )
        );
        let Command::Serve(args) = parse(&[
            "serve",
            "--backend-root=/b",
            "--endpoint=unix:///tmp/c.sock",
            "--log-format=text",
            "--log-level=debug",
        ])
        .unwrap() else {
            panic!("serve subcommand");
        };
        assert_eq!(args.log_format, LogFormat::Text);
        assert_eq!(args.endpoint, "unix:///tmp/c.sock");
        assert!(parse(&["--backend-root=/b", "--log-format=xml"]).is_err());
        assert!(parse(&[]).is_err(), "--backend-root is required to serve");
        assert!(
            parse(&["serve"]).is_err(),
            "--backend-root is required to serve"
        );
    }

    #[test]
    fn leader_election_defaults_follow_the_store() {
        let serve = |argv: &[&str]| match parse(argv).unwrap() {
            Command::Serve(args) => args,
            other => panic!("{other:?}"),
        };
        let in_pod = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
        let kubernetes = serve(&["--backend-root=/b"]);
        assert!(kubernetes.leader_elect() && kubernetes.watch_nodes() && kubernetes.events());
        let etcd = serve(&["--backend-root=/b", "--lease-store=etcd"]);
        assert_eq!(etcd.leader_elect(), in_pod);
        let on = serve(&["--backend-root=/b", "--lease-store=etcd", "--leader-elect"]);
        assert!(on.leader_elect());
        let off = serve(&[
            "--backend-root=/b",
            "--leader-elect=false",
            "--watch-nodes=false",
            "--events=false",
        ]);
        assert!(!off.leader_elect() && !off.watch_nodes() && !off.events());
        let bad = serve(&["--backend-root=/b", "--leader-elect-renew-deadline=20s"]);
        assert!(matches!(
            bad.leader.config(),
            Err(LeaderConfigError::DeadlineNotBelowDuration { .. })
        ));
    }

    #[test]
    fn admin_subcommands() {
        let Command::Fence(args) = parse(&["fence", "--node", "n1"]).unwrap() else {
            panic!("fence");
        };
        assert_eq!(args.node, "n1");
        assert_eq!(args.output, OutputFormat::Table);
        assert!(args.reason.contains("holdfast-controller fence"));
        let Command::Claims(args) = parse(&["claims", "-o", "json"]).unwrap() else {
            panic!("claims");
        };
        assert_eq!(args.node, None);
        assert_eq!(args.output, OutputFormat::Json);
        assert!(matches!(
            parse(&["unfence", "--node", "n1"]),
            Ok(Command::Unfence(_))
        ));
        assert!(parse(&["fence"]).is_err(), "--node is required");
        // Serve flags belong to serving; they are not accepted with a subcommand.
        assert!(parse(&["--backend-root=/b", "fence", "--node", "n1"]).is_err());
    }

    #[test]
    fn status_observes_nothing_unless_asked_and_explains_expiry() {
        let Command::Status(args) = parse(&["status"]).unwrap() else {
            panic!("status");
        };
        assert_eq!(
            (args.observe, args.output),
            (Duration::ZERO, OutputFormat::Table)
        );
        let Command::Status(args) = parse(&["status", "--observe=5s", "-o", "json"]).unwrap()
        else {
            panic!("status");
        };
        assert_eq!(
            (args.observe, args.output),
            (Duration::from_secs(5), OutputFormat::Json)
        );
        assert!(parse(&["status", "--observe=soon"]).is_err());
        let serve = |argv: &[&str]| match parse(argv).unwrap() {
            Command::Serve(args) => args.expiry_interval,
            other => panic!("{other:?}"),
        };
        assert_eq!(serve(&["--backend-root=/b"]), None);
        assert_eq!(
            serve(&["--backend-root=/b", "--expiry-interval=0"]),
            Some(Duration::ZERO)
        );
        assert_eq!(
            serve(&["--backend-root=/b", "--expiry-interval=30s"]),
            Some(Duration::from_secs(30))
        );
        use clap::CommandFactory;
        let mut command = Args::command();
        let help = command
            .find_subcommand_mut("status")
            .unwrap()
            .render_long_help()
            .to_string();
        for needle in ["upper bound", "W = D(1+e)+margin", "holdfast.status/v1"] {
            assert!(help.contains(needle), "{needle:?} missing from:\n{help}");
        }
    }

    #[test]
    fn fence_help_states_the_safety_contract() {
        use clap::CommandFactory;
        let mut command = Args::command();
        let fence = command.find_subcommand_mut("fence").unwrap();
        let help = fence.render_long_help().to_string();
        for needle in [
            "SAFETY",
            "confirmed powered off",
            "stops all I/O",
            "higher epoch on the volume's storage",
            "within one renewal",
            "interval (D/3)",
        ] {
            assert!(help.contains(needle), "{needle:?} missing from:\n{help}");
        }
    }
}
