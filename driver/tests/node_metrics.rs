//! The node plugin's `/metrics`: two real `holdfast-driver` processes (nodes `node-a`
//! and `node-b`) on one real etcd and one backend root, each serving metrics on a port
//! of its own. Refused publishes are counted by reason, once per NodePublishVolume
//! (a waiting publish's retries are not refusals), and the claim and session gauges
//! follow the plugin's state.

mod common;

use std::time::{Duration, Instant};

use common::{create_volume_in, publish_for, Plugin, PluginOptions};
use holdfast_core::csi::v1::node_client::NodeClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tonic::{Code, Request};

/// A node plugin serving metrics on a free port of 127.0.0.1.
async fn plugin_with_metrics(
    node: &str,
    etcd: &str,
    root: Option<std::path::PathBuf>,
) -> (Plugin, NodeClient<Channel>, String) {
    let mut options = PluginOptions::node_on_etcd(node, etcd, root);
    options
        .extra_args
        .extend(["--metrics-address".to_string(), "127.0.0.1:0".to_string()]);
    let plugin = Plugin::start_with(options).await;
    let address = metrics_address(&plugin).await;
    let client = NodeClient::new(plugin.channel().await);
    (plugin, client, address)
}

/// The address the plugin logged it serves metrics on (it bound port 0).
async fn metrics_address(plugin: &Plugin) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let logs = plugin.logs();
        let logged = logs
            .lines()
            .filter(|l| l.contains("serving metrics"))
            .find_map(|l| l.split_once("127.0.0.1:"));
        if let Some((_, rest)) = logged {
            let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
            return format!("127.0.0.1:{port}");
        }
        assert!(
            Instant::now() < deadline,
            "no metrics address logged:\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET /metrics` over plain HTTP: the body.
async fn scrape(address: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect to the metrics port");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: holdfast\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    body.to_string()
}

/// The value of the sample `series` (name and labels exactly as rendered), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.trim().parse().expect("a number"))
}

fn refused(text: &str, reason: &str) -> f64 {
    sample(
        text,
        &format!("holdfast_node_publishes_refused_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn refused_publishes_are_counted_by_reason_and_claims_by_state() {
    let etcd = holdfast_core::testkit::etcd::EtcdServer::start();
    let url = etcd.client_url();
    let (a, mut node_a, metrics_a) = plugin_with_metrics("node-a", &url, None).await;
    let (b, mut node_b, metrics_b) =
        plugin_with_metrics("node-b", &url, Some(a.root.clone())).await;

    let text = scrape(&metrics_a).await;
    assert_eq!(
        sample(&text, "holdfast_node_session_live"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "holdfast_node_publishes_total"),
        Some(0.0),
        "{text}"
    );

    let id = create_volume_in(&a.root, "pv-metrics", &[("dataPath", "fuse")]);
    node_a
        .node_publish_volume(publish_for(&id, &a.target(), "pod-1"))
        .await
        .expect("first pod takes the volume");
    // A second pod on the other node, then a third on the holder's own node.
    let err = node_b
        .node_publish_volume(publish_for(&id, &b.target(), "pod-2"))
        .await
        .expect_err("held elsewhere");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = node_a
        .node_publish_volume(publish_for(&id, &a.target(), "pod-3"))
        .await
        .expect_err("held on this node");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // An onConflict=wait publish on node-b asks again every 250 ms until its deadline,
    // and is refused once.
    let waiting = create_volume_in(
        &a.root,
        "pv-metrics-wait",
        &[("dataPath", "fuse"), ("onConflict", "wait")],
    );
    node_a
        .node_publish_volume(publish_for(&waiting, &a.target(), "pod-4"))
        .await
        .expect("pod-4 takes the waiting volume");
    let mut request = Request::new(publish_for(&waiting, &b.target(), "pod-5"));
    request.set_timeout(Duration::from_secs(2));
    let err = node_b
        .node_publish_volume(request)
        .await
        .expect_err("still held when the wait ends");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    let text_a = scrape(&metrics_a).await;
    let text_b = scrape(&metrics_b).await;
    assert_eq!(refused(&text_a, "held_on_this_node"), 1.0, "{text_a}");
    assert_eq!(refused(&text_a, "held_elsewhere"), 0.0, "{text_a}");
    assert_eq!(
        sample(&text_a, "holdfast_node_publishes_total"),
        Some(3.0),
        "{text_a}"
    );
    assert_eq!(
        sample(&text_a, "holdfast_node_claims{state=\"held\"}"),
        Some(2.0),
        "{text_a}"
    );
    assert_eq!(
        sample(&text_a, "holdfast_node_claims{state=\"fenced\"}"),
        Some(0.0),
        "{text_a}"
    );
    assert_eq!(
        sample(&text_a, "holdfast_node_session_live"),
        Some(1.0),
        "{text_a}"
    );
    // node-b: the plain refusal and the waiting one, each once.
    assert_eq!(refused(&text_b, "held_elsewhere"), 2.0, "{text_b}");
    assert_eq!(refused(&text_b, "held_on_this_node"), 0.0, "{text_b}");
    assert_eq!(
        sample(&text_b, "holdfast_node_publishes_total"),
        Some(2.0),
        "{text_b}"
    );
    assert_eq!(
        sample(&text_b, "holdfast_node_claims{state=\"held\"}"),
        Some(0.0),
        "{text_b}"
    );
    drop((a, b, etcd));
}
