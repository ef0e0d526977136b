use std::path::PathBuf;

use clap::Parser;

use super::*;

#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    lease: LeaseArgs,
}

fn parse(args: &[&str]) -> LeaseArgs {
    let mut argv = vec!["test"];
    argv.extend_from_slice(args);
    Cli::try_parse_from(argv).unwrap().lease
}

fn no_pod_file() -> PathBuf {
    PathBuf::from("/nonexistent/holdfast/namespace")
}

#[test]
fn defaults_match_the_chart() {
    let lease = parse(&[]);
    assert_eq!(lease.lease_store, None);
    assert_eq!(lease.lease_duration, Duration::from_secs(15));
    assert_eq!(lease.lease_margin, Duration::from_secs(3));
    assert_eq!(lease.lease_epsilon, 0.01);
    assert_eq!(lease.etcd_prefix, "/holdfast/");
    let params = lease.params().unwrap();
    assert_eq!(params.duration, Duration::from_secs(15));
    assert_eq!(params.margin, Duration::from_secs(3));
    assert_eq!(
        lease
            .store_config_with(LeaseStoreKind::Kubernetes, &no_pod_file())
            .unwrap(),
        StoreConfig::Kubernetes {
            namespace: FALLBACK_NAMESPACE.into()
        }
    );
    assert_eq!(
        lease.store_config_or(LeaseStoreKind::Memory).unwrap(),
        StoreConfig::Memory
    );
}

#[test]
fn namespace_comes_from_flag_then_pod_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("namespace");
    std::fs::write(&file, "storage-system\n").unwrap();
    let lease = parse(&["--lease-store", "kubernetes"]);
    assert_eq!(
        lease.store_config_with(LeaseStoreKind::Memory, &file),
        Ok(StoreConfig::Kubernetes {
            namespace: "storage-system".into()
        })
    );
    let lease = parse(&["--lease-store", "kubernetes", "--lease-namespace", "ops"]);
    assert_eq!(
        lease.store_config_with(LeaseStoreKind::Memory, &file),
        Ok(StoreConfig::Kubernetes {
            namespace: "ops".into()
        })
    );
    for bad in ["Ops", "-ops", "ops-", "", "a_b", &"x".repeat(64)] {
        let lease = parse(&[&format!("--lease-namespace={bad}")]);
        let err = lease.store_config().unwrap_err();
        assert!(matches!(err, LeaseConfigError::Namespace { .. }), "{bad}");
        assert!(err.to_string().contains("--lease-namespace"), "{err}");
    }
}

#[test]
fn etcd_needs_endpoints_and_a_slash_delimited_prefix() {
    let lease = parse(&["--lease-store", "etcd"]);
    let err = lease.store_config().unwrap_err();
    assert_eq!(err, LeaseConfigError::MissingEtcdEndpoints);
    assert!(err.to_string().contains("--etcd-endpoints"), "{err}");

    let lease = parse(&[
        "--lease-store=etcd",
        "--etcd-endpoints",
        "http://a:2379, http://b:2379",
    ]);
    assert_eq!(
        lease.store_config(),
        Ok(StoreConfig::Etcd {
            endpoints: vec!["http://a:2379".into(), "http://b:2379".into()],
            prefix: "/holdfast/".into(),
            timeout: DEFAULT_TIMEOUT,
        })
    );
    let lease = parse(&["--lease-store=etcd", "--etcd-endpoints=http://a:2379,,"]);
    assert!(matches!(
        lease.store_config(),
        Err(LeaseConfigError::EmptyEtcdEndpoint { .. })
    ));
    for bad in ["holdfast/", "/holdfast", "/", ""] {
        let lease = parse(&[
            "--lease-store=etcd",
            "--etcd-endpoints=http://a:2379",
            &format!("--etcd-prefix={bad}"),
        ]);
        assert_eq!(
            lease.store_config(),
            Err(LeaseConfigError::EtcdPrefix(bad.into())),
            "{bad}"
        );
    }
    // Endpoints are ignored by the other stores (the chart sets only what applies).
    let lease = parse(&["--lease-store=memory", "--etcd-endpoints=http://a:2379"]);
    assert_eq!(lease.store_config(), Ok(StoreConfig::Memory));
}

#[test]
fn timing_is_validated_with_the_flag_names() {
    let lease = parse(&["--lease-duration=3s", "--lease-margin=5s"]);
    let err = lease.params().unwrap_err();
    assert!(matches!(
        err,
        LeaseConfigError::MarginNotBelowDuration { .. }
    ));
    assert!(err.to_string().contains("--lease-margin"), "{err}");
    // Margin below D but too small for ε: the windows would overlap.
    let lease = parse(&[
        "--lease-duration=10s",
        "--lease-margin=500ms",
        "--lease-epsilon=0.1",
    ]);
    let err = lease.params().unwrap_err();
    assert!(err.to_string().contains("windows overlap"), "{err}");
    let lease = parse(&[
        "--lease-duration=1500ms",
        "--lease-margin=300ms",
        "--lease-epsilon=0",
    ]);
    let params = lease.params().unwrap();
    assert_eq!(params.duration, Duration::from_millis(1500));
    assert_eq!(params.renew_interval(), Duration::from_millis(500));
}

#[test]
fn bad_values_fail_to_parse() {
    let fails = |args: &[&str]| {
        let mut argv = vec!["test"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap_err().to_string()
    };
    assert!(fails(&["--lease-store", "zookeeper"]).contains("zookeeper"));
    assert!(fails(&["--lease-duration", "15h"]).contains("unknown unit"));
    assert!(fails(&["--lease-duration", "0s"]).contains("positive"));
    assert!(fails(&["--lease-epsilon", "one"]).contains("decimal"));
    assert!(fails(&["--lease-epsilon", "NaN"]).contains("finite"));
}

#[test]
fn durations() {
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
    assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
    assert_eq!(parse_duration("0.5s"), Ok(Duration::from_millis(500)));
    assert!(parse_duration("0s").is_err());
    assert!(parse_duration("-1s").is_err());
    assert!(parse_duration("s").is_err());
    assert!(parse_duration("1e99").is_err());
}
