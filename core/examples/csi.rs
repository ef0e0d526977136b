//! `csi`: a small command-line CSI client for trying holdfast by hand, playing the parts
//! of the external-provisioner, the attacher and kubelet over the driver's unix socket.
//!
//! ```text
//! cargo run -p holdfast-core --example csi -- --endpoint unix://$PWD/.holdfast/csi.sock info
//! ```
//!
//! `publish` does what Kubernetes does for a pod: ControllerPublishVolume to the node,
//! then NodePublishVolume with the volume's context plus the pod UID, which is what the
//! driver claims the volume for. A failed call prints its gRPC code and message and the
//! client exits with status 1.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::{Parser, Subcommand};
use holdfast_core::csi::call_log::code_name;
use holdfast_core::csi::serve::{connect_unix, Endpoint};
use holdfast_core::csi::v1::controller_client::ControllerClient;
use holdfast_core::csi::v1::controller_service_capability::{self as ccap, rpc::Type as CtlRpc};
use holdfast_core::csi::v1::identity_client::IdentityClient;
use holdfast_core::csi::v1::node_client::NodeClient;
use holdfast_core::csi::v1::node_service_capability::{self as ncap, rpc::Type as NodeRpc};
use holdfast_core::csi::v1::plugin_capability::{self as pcap, service::Type as Service};
use holdfast_core::csi::v1::volume_capability::{access_mode::Mode, AccessMode, AccessType};
use holdfast_core::csi::v1::*;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// The key kubelet puts the pod's UID under in NodePublishVolume's volume context.
const POD_UID_KEY: &str = "csi.storage.k8s.io/pod.uid";

/// A CSI client for holdfast (or any CSI v1 driver) on a unix socket.
#[derive(Parser)]
#[command(name = "csi")]
struct Args {
    /// The driver's socket: unix:///absolute/path/csi.sock.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// Deadline of each call in seconds: how long a publish may wait for a held volume.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Plugin name, services, readiness, capabilities and this node's id.
    Info,
    /// CreateVolume with a single-node-writer mount capability.
    Create {
        name: String,
        /// Capacity: bytes, or with a suffix K/M/G/T (x1000) or Ki/Mi/Gi/Ti (x1024).
        #[arg(long, default_value = "1Gi", value_parser = size)]
        size: i64,
        /// A StorageClass parameter, e.g. onConflict=wait (repeatable).
        #[arg(long = "param", value_parser = key_value)]
        params: Vec<(String, String)>,
    },
    /// ListVolumes, every page.
    List,
    /// DeleteVolume.
    Delete { id: String },
    /// ControllerPublishVolume to the node, then NodePublishVolume at TARGET for a pod.
    Publish(Publish),
    /// NodeUnpublishVolume at TARGET, then ControllerUnpublishVolume from the node (what
    /// Kubernetes does once the node's last pod using the volume is gone).
    Unpublish { id: String, target: String },
    /// NodeGetVolumeStats of a published target.
    Stats { id: String, target: String },
}

#[derive(clap::Args)]
struct Publish {
    /// Volume id, as `create` printed it.
    id: String,
    /// Directory to mount the volume on (created; its parent must exist).
    target: String,
    /// UID of the pod the volume is published for: the claim's holder.
    #[arg(long)]
    pod_uid: String,
    /// Mount the volume read-only.
    #[arg(long)]
    readonly: bool,
    /// Node id to attach to; default: the one NodeGetInfo reports.
    #[arg(long)]
    node: Option<String>,
    /// Volume context to add, for drivers without GET_VOLUME to read it from.
    #[arg(long = "param", value_parser = key_value)]
    params: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{0}")]
    Setup(String),
    #[error("{rpc} failed: {}: {}", code_name(.status.code()), .status.message())]
    Rpc { rpc: String, status: Status },
}

/// One unary call with the deadline set: `call!(self, Node.node_get_info(request))`.
macro_rules! call {
    ($c:ident, $client:ident . $method:ident ($msg:expr)) => {{
        let mut request = Request::new($msg);
        request.set_timeout($c.timeout);
        let reply = $client::new($c.channel.clone()).$method(request).await;
        let rpc = || rpc_name(stringify!($method));
        reply
            .map(|r| r.into_inner())
            .map_err(|status| CliError::Rpc { rpc: rpc(), status })
    }};
}

/// The spec's name of an RPC from its client method's: create_volume -> CreateVolume.
fn rpc_name(method: &str) -> String {
    let words = method.split('_').map(|w| w[..1].to_uppercase() + &w[1..]);
    words.collect()
}

fn size(s: &str) -> Result<i64, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let units = ["", "K", "Ki", "M", "Mi", "G", "Gi", "T", "Ti"];
    let Some(i) = units.iter().position(|u| *u == unit) else {
        return Err(format!(
            "{s:?}: expected bytes, or a suffix K, Ki, M, Mi, G, Gi, T, Ti"
        ));
    };
    let (base, power) = (
        if i % 2 == 1 { 1000i64 } else { 1024 },
        (i as u32).div_ceil(2),
    );
    let n: i64 = n.parse().map_err(|_| format!("{s:?}: expected e.g. 1Gi"))?;
    n.checked_mul(base.pow(power))
        .ok_or(format!("{s:?}: too large"))
}

fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.into(), v.into())),
        _ => Err(format!("{s:?}: expected key=value")),
    }
}

fn capability() -> Option<VolumeCapability> {
    let mode = Mode::SingleNodeWriter as i32;
    let (access_mode, mount) = (
        Some(AccessMode { mode }),
        AccessType::Mount(Default::default()),
    );
    Some(VolumeCapability {
        access_mode,
        access_type: Some(mount),
    })
}

/// One labelled line of output.
fn row(label: &str, value: impl std::fmt::Display) {
    println!("{label:<12} {value}");
}

/// "A, B, C", or "none".
fn names<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<_> = names.collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

fn bytes(n: i64) -> String {
    format!("{n} bytes ({:.2} GiB)", n as f64 / (1u64 << 30) as f64)
}

type Identity = IdentityClient<Channel>;
type Controller = ControllerClient<Channel>;
type Node = NodeClient<Channel>;

struct Client {
    channel: Channel,
    timeout: Duration,
}

impl Client {
    async fn connect(args: &Args) -> Result<Client, CliError> {
        // With the root cause: "transport error" alone does not say the socket is missing.
        let setup = |e: &dyn std::error::Error| {
            let root = std::iter::successors(Some(e), |e| e.source()).last();
            let (outer, root) = (e.to_string(), root.map(|r| r.to_string()));
            match root.filter(|r| !outer.contains(r.as_str())) {
                Some(root) => CliError::Setup(format!("{outer}: {root}")),
                None => CliError::Setup(outer),
            }
        };
        let endpoint = Endpoint::parse(&args.endpoint).map_err(|e| setup(&e))?;
        let channel = connect_unix(endpoint.path()).await.map_err(|e| setup(&e))?;
        let timeout = Duration::from_secs(args.timeout);
        Ok(Client { channel, timeout })
    }

    /// The Controller RPCs offered; none where no Controller is served (the node
    /// plugin of a cluster).
    async fn controller_rpcs(&self) -> Result<Vec<CtlRpc>, CliError> {
        let request = ControllerGetCapabilitiesRequest {};
        let reply = match call!(self, Controller.controller_get_capabilities(request)) {
            Err(CliError::Rpc { status, .. }) if status.code() == Code::Unimplemented => {
                return Ok(vec![])
            }
            reply => reply?,
        };
        let caps = reply.capabilities.into_iter().filter_map(|c| c.r#type);
        let rpc = |ccap::Type::Rpc(r)| CtlRpc::try_from(r.r#type).ok();
        Ok(caps.filter_map(rpc).collect())
    }

    async fn node_id(&self, given: Option<String>) -> Result<String, CliError> {
        match given {
            Some(node) => Ok(node),
            None => Ok(call!(self, Node.node_get_info(NodeGetInfoRequest {}))?.node_id),
        }
    }

    async fn info(&self) -> Result<(), CliError> {
        let info = call!(self, Identity.get_plugin_info(GetPluginInfoRequest {}))?;
        row("plugin:", format!("{} {}", info.name, info.vendor_version));
        let request = GetPluginCapabilitiesRequest {};
        let caps = call!(self, Identity.get_plugin_capabilities(request))?.capabilities;
        let services = caps.into_iter().filter_map(|c| match c.r#type {
            Some(pcap::Type::Service(s)) => Service::try_from(s.r#type).ok(),
            _ => None,
        });
        row("services:", names(services.map(|s| s.as_str_name())));
        let ready = call!(self, Identity.probe(ProbeRequest {}))?.ready;
        row("ready:", ready.map_or("unknown".into(), |r| r.to_string()));
        let rpcs = self.controller_rpcs().await?;
        row("controller:", names(rpcs.iter().map(|r| r.as_str_name())));
        let node = call!(self, Node.node_get_info(NodeGetInfoRequest {}))?;
        let max = Some(node.max_volumes_per_node).filter(|n| *n > 0);
        let max = max.map_or("no limit".into(), |n| n.to_string());
        row("node id:", format!("{} (max volumes: {max})", node.node_id));
        let request = NodeGetCapabilitiesRequest {};
        let caps = call!(self, Node.node_get_capabilities(request))?.capabilities;
        let rpcs = caps.into_iter().filter_map(|c| c.r#type);
        let rpcs = rpcs.filter_map(|ncap::Type::Rpc(r)| NodeRpc::try_from(r.r#type).ok());
        row("node:", names(rpcs.map(|r| r.as_str_name())));
        Ok(())
    }

    async fn publish(&self, args: Publish) -> Result<(), CliError> {
        let (id, rpcs) = (args.id, self.controller_rpcs().await?);
        let mut publish_context = Default::default();
        if rpcs.contains(&CtlRpc::PublishUnpublishVolume) {
            let node_id = self.node_id(args.node).await?;
            let request = ControllerPublishVolumeRequest {
                volume_id: id.clone(),
                node_id: node_id.clone(),
                volume_capability: capability(),
                readonly: args.readonly,
                ..Default::default()
            };
            let reply = call!(self, Controller.controller_publish_volume(request))?;
            publish_context = reply.publish_context;
            println!("attached {id} to node {node_id}");
        }
        // Kubernetes passes the context CreateVolume returned; read it back.
        let mut volume_context = Default::default();
        if rpcs.contains(&CtlRpc::GetVolume) {
            let volume_id = id.clone();
            let request = ControllerGetVolumeRequest { volume_id };
            let volume = call!(self, Controller.controller_get_volume(request))?.volume;
            volume_context = volume.unwrap_or_default().volume_context;
        }
        volume_context.extend(args.params);
        volume_context.insert(POD_UID_KEY.into(), args.pod_uid.clone());
        let request = NodePublishVolumeRequest {
            volume_id: id.clone(),
            publish_context,
            target_path: args.target.clone(),
            volume_capability: capability(),
            readonly: args.readonly,
            volume_context,
            ..Default::default()
        };
        call!(self, Node.node_publish_volume(request))?;
        println!("published {id} at {} for pod {}", args.target, args.pod_uid);
        Ok(())
    }

    async fn unpublish(&self, volume_id: String, target_path: String) -> Result<(), CliError> {
        let (id, target) = (volume_id.clone(), target_path.clone());
        let request = NodeUnpublishVolumeRequest {
            volume_id,
            target_path,
        };
        call!(self, Node.node_unpublish_volume(request))?;
        println!("unpublished {id} from {target}");
        // Detaches as the last pod on a node going away does in Kubernetes.
        if self
            .controller_rpcs()
            .await?
            .contains(&CtlRpc::PublishUnpublishVolume)
        {
            let node_id = self.node_id(None).await?;
            let (volume_id, node) = (id.clone(), node_id.clone());
            let request = ControllerUnpublishVolumeRequest {
                volume_id,
                node_id,
                ..Default::default()
            };
            call!(self, Controller.controller_unpublish_volume(request))?;
            println!("detached {id} from node {node}");
        }
        Ok(())
    }

    async fn create(
        &self,
        name: String,
        size: i64,
        params: Vec<(String, String)>,
    ) -> Result<(), CliError> {
        let request = CreateVolumeRequest {
            name,
            capacity_range: Some(CapacityRange {
                required_bytes: size,
                limit_bytes: 0,
            }),
            volume_capabilities: capability().into_iter().collect(),
            parameters: params.into_iter().collect(),
            ..Default::default()
        };
        let volume = call!(self, Controller.create_volume(request))?.volume;
        let volume = volume.unwrap_or_default();
        row("volume id:", &volume.volume_id);
        row("capacity:", bytes(volume.capacity_bytes));
        for (k, v) in BTreeMap::from_iter(volume.volume_context) {
            row("context:", format!("{k}={v}"));
        }
        Ok(())
    }

    async fn list(&self) -> Result<(), CliError> {
        let (mut starting_token, mut seen) = (String::new(), 0);
        loop {
            let request = ListVolumesRequest {
                max_entries: 0,
                starting_token,
            };
            let page = call!(self, Controller.list_volumes(request))?;
            seen += page.entries.len();
            for entry in page.entries {
                let volume = entry.volume.unwrap_or_default();
                let nodes = entry.status.map(|s| s.published_node_ids.join(","));
                let nodes = nodes.filter(|n| !n.is_empty()).unwrap_or("-".into());
                let (id, size) = (&volume.volume_id, bytes(volume.capacity_bytes));
                let context = BTreeMap::from_iter(volume.volume_context);
                let context = context.iter().map(|(k, v)| format!("{k}={v}"));
                let context = context.collect::<Vec<_>>().join(" ");
                println!("{id}  {size}  attached to: {nodes}  {context}");
            }
            if page.next_token.is_empty() {
                if seen == 0 {
                    println!("no volumes");
                }
                return Ok(());
            }
            starting_token = page.next_token;
        }
    }

    async fn stats(&self, volume_id: String, volume_path: String) -> Result<(), CliError> {
        let request = NodeGetVolumeStatsRequest {
            volume_id,
            volume_path,
            ..Default::default()
        };
        let reply = call!(self, Node.node_get_volume_stats(request))?;
        for u in reply.usage {
            let unit = volume_usage::Unit::try_from(u.unit).map_or("?", |u| u.as_str_name());
            let (total, used, available) = (u.total, u.used, u.available);
            row(
                &format!("{unit}:"),
                format!("total={total} used={used} available={available}"),
            );
        }
        if let Some(c) = reply.volume_condition {
            let state = if c.abnormal { "ABNORMAL" } else { "normal" };
            row("condition:", format!("{state} {}", c.message));
        }
        Ok(())
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let client = Client::connect(&args).await;
    let result = match (client, args.verb) {
        (Err(e), _) => Err(e),
        (Ok(c), Verb::Info) => c.info().await,
        (Ok(c), Verb::Create { name, size, params }) => c.create(name, size, params).await,
        (Ok(c), Verb::List) => c.list().await,
        (Ok(c), Verb::Delete { id }) => {
            let request = DeleteVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            };
            call!(c, Controller.delete_volume(request)).map(|_| println!("deleted {id}"))
        }
        (Ok(c), Verb::Publish(args)) => c.publish(args).await,
        (Ok(c), Verb::Unpublish { id, target }) => c.unpublish(id, target).await,
        (Ok(c), Verb::Stats { id, target }) => c.stats(id, target).await,
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}
