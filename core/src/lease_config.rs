//! [`LeaseArgs`]: the lease store and lease timing as command-line flags, shared by the
//! node plugin and the controller so that both parse them identically.
//!
//! Both binaries must agree on the store (or they would not see each other's records)
//! and on D, ε and the margin (the controller and every node judge a session's expiry
//! by them). So both flatten this one struct (`#[command(flatten)] lease: LeaseArgs`),
//! and the chart hands both the same environment variables. Validation happens in
//! [`LeaseArgs::store_config`] and [`LeaseArgs::params`], before anything connects, so
//! a bad setting stops the binary at start with a message naming the flag.

use std::path::Path;
use std::time::Duration;

use crate::lease::{InvalidParams, LeaseParams};
use crate::store::etcd::{DEFAULT_PREFIX, DEFAULT_TIMEOUT};
use crate::store::StoreConfig;

/// Where a pod finds its own namespace (the default for `--lease-namespace`).
pub const POD_NAMESPACE_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// `--lease-namespace` when neither the flag nor the pod's namespace file gives one.
pub const FALLBACK_NAMESPACE: &str = "holdfast";

/// Which lease store the flags choose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LeaseStoreKind {
    /// In this process only: for one-process demos and tests. Two processes never share it.
    Memory,
    /// An etcd cluster (--etcd-endpoints, --etcd-prefix).
    Etcd,
    /// coordination.k8s.io/v1 Lease objects in --lease-namespace (the in-cluster default).
    Kubernetes,
}

/// Why the lease flags were refused. Each message names the flag to fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LeaseConfigError {
    #[error(
        "--lease-store=etcd needs --etcd-endpoints (or HOLDFAST_ETCD_ENDPOINTS): \
         a comma-separated list of etcd client URLs"
    )]
    MissingEtcdEndpoints,
    #[error("--etcd-endpoints has an empty entry: {given:?}")]
    EmptyEtcdEndpoint { given: String },
    #[error("--etcd-prefix {0:?} must start and end with '/' (e.g. {DEFAULT_PREFIX})")]
    EtcdPrefix(String),
    #[error("--lease-namespace {namespace:?} is not a Kubernetes namespace name: {reason}")]
    Namespace {
        namespace: String,
        reason: &'static str,
    },
    #[error("--lease-margin ({margin:?}) must be shorter than --lease-duration ({duration:?})")]
    MarginNotBelowDuration {
        margin: Duration,
        duration: Duration,
    },
    #[error("--lease-duration / --lease-margin / --lease-epsilon: {0}")]
    Params(#[from] InvalidParams),
}

/// The lease store and lease timing flags. Flatten into a binary's clap `Args`.
#[derive(clap::Args, Debug, Clone, PartialEq)]
#[command(next_help_heading = "Lease store and timing")]
pub struct LeaseArgs {
    /// Where node sessions, volume claims and node fences are kept. Default: kubernetes
    /// (a binary may choose another default, e.g. memory for a one-process demo).
    #[arg(long, env = "HOLDFAST_LEASE_STORE", value_enum)]
    pub lease_store: Option<LeaseStoreKind>,

    /// etcd client URLs, comma-separated (with --lease-store=etcd).
    #[arg(long, env = "HOLDFAST_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,

    /// Prefix of every key holdfast writes in etcd (with --lease-store=etcd).
    #[arg(long, env = "HOLDFAST_ETCD_PREFIX", default_value = DEFAULT_PREFIX)]
    pub etcd_prefix: String,

    /// Namespace of the Lease objects (with --lease-store=kubernetes). Default: the pod's
    /// own namespace, read from its service account, or "holdfast" outside a pod.
    #[arg(long, env = "HOLDFAST_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// Session lease duration D: a node renews its session every D/3; another node may
    /// take a volume over only after seeing the session unrenewed for D·(1+ε) + margin.
    /// Units: ms, s, m (e.g. 1500ms, 15s); a bare number is seconds.
    #[arg(long, env = "HOLDFAST_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,

    /// Safety margin: a holder stops all I/O once its last proven renewal was sent more
    /// than D − margin ago; acquirers wait D·(1+ε) + margin. Must be below D, and
    /// 2·margin must exceed ε·(1+ε)·D.
    #[arg(long, env = "HOLDFAST_LEASE_MARGIN", default_value = "3s", value_parser = parse_duration)]
    pub lease_margin: Duration,

    /// ε: bound on how far any node's clock rate may stray from real time (0.01 = 1 %).
    /// Only rates matter: wall clocks are never compared across machines.
    #[arg(long, env = "HOLDFAST_LEASE_EPSILON", default_value = "0.01", value_parser = parse_epsilon)]
    pub lease_epsilon: f64,
}

impl LeaseArgs {
    /// The chosen store, `default` when `--lease-store` was not given.
    pub fn store_kind_or(&self, default: LeaseStoreKind) -> LeaseStoreKind {
        self.lease_store.unwrap_or(default)
    }

    /// The store to connect to; kubernetes unless `--lease-store` says otherwise.
    pub fn store_config(&self) -> Result<StoreConfig, LeaseConfigError> {
        self.store_config_or(LeaseStoreKind::Kubernetes)
    }

    /// The store to connect to, `default` when `--lease-store` was not given.
    pub fn store_config_or(
        &self,
        default: LeaseStoreKind,
    ) -> Result<StoreConfig, LeaseConfigError> {
        self.store_config_with(default, Path::new(POD_NAMESPACE_PATH))
    }

    /// [`LeaseArgs::store_config_or`], reading the pod namespace from `pod_namespace_file`.
    pub fn store_config_with(
        &self,
        default: LeaseStoreKind,
        pod_namespace_file: &Path,
    ) -> Result<StoreConfig, LeaseConfigError> {
        match self.store_kind_or(default) {
            LeaseStoreKind::Memory => Ok(StoreConfig::Memory),
            LeaseStoreKind::Etcd => {
                let endpoints = self.endpoints()?;
                let prefix = &self.etcd_prefix;
                // A prefix without the trailing '/' would also match a neighbour's keys
                // ("/holdfast" lists "/holdfast-test/..."), so it is refused.
                if prefix.len() < 2 || !prefix.starts_with('/') || !prefix.ends_with('/') {
                    return Err(LeaseConfigError::EtcdPrefix(prefix.clone()));
                }
                Ok(StoreConfig::Etcd {
                    endpoints,
                    prefix: prefix.clone(),
                    timeout: DEFAULT_TIMEOUT,
                })
            }
            LeaseStoreKind::Kubernetes => {
                let namespace = match &self.lease_namespace {
                    Some(ns) => ns.trim().to_string(),
                    None => pod_namespace(pod_namespace_file),
                };
                check_namespace(&namespace)?;
                Ok(StoreConfig::Kubernetes { namespace })
            }
        }
    }

    /// D, ε and margin, validated by [`LeaseParams::new`].
    pub fn params(&self) -> Result<LeaseParams, LeaseConfigError> {
        if self.lease_margin >= self.lease_duration {
            return Err(LeaseConfigError::MarginNotBelowDuration {
                margin: self.lease_margin,
                duration: self.lease_duration,
            });
        }
        Ok(LeaseParams::new(
            self.lease_duration,
            self.lease_epsilon,
            self.lease_margin,
        )?)
    }

    fn endpoints(&self) -> Result<Vec<String>, LeaseConfigError> {
        if self.etcd_endpoints.is_empty() {
            return Err(LeaseConfigError::MissingEtcdEndpoints);
        }
        let trimmed: Vec<String> = self
            .etcd_endpoints
            .iter()
            .map(|e| e.trim().to_string())
            .collect();
        if trimmed.iter().any(String::is_empty) {
            return Err(LeaseConfigError::EmptyEtcdEndpoint {
                given: self.etcd_endpoints.join(","),
            });
        }
        Ok(trimmed)
    }
}

fn pod_namespace(file: &Path) -> String {
    match std::fs::read_to_string(file) {
        Ok(text) if !text.trim().is_empty() => text.trim().to_string(),
        _ => FALLBACK_NAMESPACE.to_string(),
    }
}

/// A namespace name is a DNS-1123 label.
fn check_namespace(namespace: &str) -> Result<(), LeaseConfigError> {
    let bad = |reason| {
        Err(LeaseConfigError::Namespace {
            namespace: namespace.to_string(),
            reason,
        })
    };
    if namespace.is_empty() || namespace.len() > 63 {
        return bad("it must be 1 to 63 characters long");
    }
    if !namespace
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("only lowercase letters, digits and '-' are allowed");
    }
    if namespace.starts_with('-') || namespace.ends_with('-') {
        return bad("it must start and end with a letter or digit");
    }
    Ok(())
}

/// `1500ms`, `15s`, `2m`; a bare number is seconds. Zero and negative are refused.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a number followed by ms, s or m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (use ms, s or m)")),
    };
    if !seconds.is_finite() || seconds <= 0.0 || seconds > 1e9 {
        return Err(format!("{text:?}: must be a positive duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// A plain decimal such as `0.01`; the range is checked by [`LeaseParams::validate`].
pub fn parse_epsilon(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?}: expected a decimal number such as 0.01"))?;
    if !value.is_finite() {
        return Err(format!("{text:?}: must be a finite number"));
    }
    Ok(value)
}

#[cfg(test)]
#[path = "lease_config_tests.rs"]
mod tests;
