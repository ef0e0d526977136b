//! [`ControlPlane`]: a real Kubernetes control plane for tests, in the spirit of
//! controller-runtime's envtest: a real etcd ([`EtcdServer`]) and a real
//! `kube-apiserver` on free ports, optionally `kube-controller-manager` and
//! `kube-scheduler`, all killed and cleaned up on drop.
//!
//! Each control plane gets its own PKI ([`pki`]), and identities that authenticate by
//! static token: an admin (group `system:masters`) and the ServiceAccounts named in
//! [`ControlPlaneOptions::service_accounts`] (by default the chart's `holdfast-node`
//! and `holdfast-controller` in namespace `holdfast`), so tests can call the API as the
//! node plugin or the controller would, under the chart's RBAC and nothing more.
//! Authorization is `Node,RBAC` as in a real cluster.
//!
//! Faults: [`ControlPlane::restart_apiserver`] kills and restarts the API server on the
//! same port and etcd; `control_plane.etcd.pause()` hangs every call that reaches
//! storage. With [`ControlPlaneOptions::audit`] the API server writes an audit log
//! ([`ControlPlane::audit_log`]): which identity made which call, for least-privilege
//! tests.
//!
//! Binaries: see [`bins`] (`HOLDFAST_KUBE_BIN`, `KUBEBUILDER_ASSETS`, `../shared/k8s`).

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::testkit::etcd::{free_port, log_tail, EtcdOptions, EtcdServer};

pub mod audit;
pub mod bins;
pub mod node;
pub mod pki;

pub use audit::AuditEntry;
pub use bins::{find_or_skip, KubeBinaries};
pub use node::{KubeletNode, NodeOptions};

const START_ATTEMPTS: usize = 3;
/// About 5 s on an idle machine; a loaded 2-core one needs more.
const READY_WITHIN: Duration = Duration::from_secs(90);

/// Who a client is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// `holdfast-test-admin`, in `system:masters`: everything is allowed.
    Admin,
    /// `system:serviceaccount:<namespace>:<name>`, with the groups a ServiceAccount
    /// token carries. Must be listed in [`ControlPlaneOptions::service_accounts`].
    ServiceAccount { namespace: String, name: String },
}

impl Identity {
    pub fn service_account(namespace: &str, name: &str) -> Self {
        Identity::ServiceAccount {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    /// The chart's node plugin ServiceAccount (release `holdfast`, namespace `holdfast`).
    pub fn node_plugin() -> Self {
        Self::service_account("holdfast", "holdfast-node")
    }

    /// The chart's controller ServiceAccount (release `holdfast`, namespace `holdfast`).
    pub fn controller() -> Self {
        Self::service_account("holdfast", "holdfast-controller")
    }

    /// The user name the API server sees (and audit logs record).
    pub fn user(&self) -> String {
        match self {
            Identity::Admin => "holdfast-test-admin".to_string(),
            Identity::ServiceAccount { namespace, name } => {
                format!("system:serviceaccount:{namespace}:{name}")
            }
        }
    }

    fn groups(&self) -> String {
        match self {
            Identity::Admin => "system:masters".to_string(),
            Identity::ServiceAccount { namespace, .. } => {
                format!("system:serviceaccounts,system:serviceaccounts:{namespace}")
            }
        }
    }

    /// A file-name-safe tag.
    fn tag(&self) -> String {
        self.user().replace(':', "-")
    }
}

/// How to start a [`ControlPlane`].
#[derive(Clone, Debug)]
pub struct ControlPlaneOptions {
    /// Where the API server listens: loopback, or `0.0.0.0` for clients in other network
    /// namespaces (give them [`ControlPlane::kubeconfig_at`]).
    pub listen_ip: IpAddr,
    /// Addresses clients dial besides loopback; they go into the serving certificate.
    pub extra_ips: Vec<IpAddr>,
    /// Also run kube-controller-manager and kube-scheduler.
    pub controllers: bool,
    /// Write an audit log of every request (metadata level).
    pub audit: bool,
    /// ServiceAccount identities (namespace, name) besides the admin.
    pub service_accounts: Vec<(String, String)>,
    /// Extra kube-apiserver flags, e.g. `--max-requests-inflight=1`.
    pub apiserver_args: Vec<String>,
    /// etcd fsyncs every commit, as in production (benchmarks); tests leave it off.
    pub durable_etcd: bool,
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        Self {
            listen_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            extra_ips: Vec::new(),
            controllers: false,
            audit: false,
            service_accounts: vec![
                ("holdfast".to_string(), "holdfast-node".to_string()),
                ("holdfast".to_string(), "holdfast-controller".to_string()),
            ],
            apiserver_args: Vec::new(),
            durable_etcd: false,
        }
    }
}

/// A running control plane; every process is killed when it is dropped.
pub struct ControlPlane {
    pub etcd: EtcdServer,
    bins: KubeBinaries,
    options: ControlPlaneOptions,
    dir: tempfile::TempDir,
    pki: pki::Pki,
    port: u16,
    apiserver: Option<Child>,
    controllers: Vec<Child>,
}

impl ControlPlane {
    /// Starts etcd and the API server (and the controllers, if asked), or returns `None`
    /// after printing why `test` skips (no binaries; under `HOLDFAST_REQUIRE_KUBE=1` that
    /// panics instead). Panics if the binaries are there but do not start.
    pub async fn start_or_skip(test: &str, options: ControlPlaneOptions) -> Option<Self> {
        let mut names = vec!["kube-apiserver"];
        if options.controllers {
            names.extend(["kube-controller-manager", "kube-scheduler"]);
        }
        let bins = find_or_skip(test, &names)?;
        Some(Self::start(bins, options).await)
    }

    /// Starts a control plane from `bins`. Panics if it does not become ready.
    pub async fn start(bins: KubeBinaries, options: ControlPlaneOptions) -> Self {
        let etcd = EtcdServer::start_with(EtcdOptions {
            durable: options.durable_etcd,
            ..EtcdOptions::default()
        });
        let dir = tempfile::Builder::new()
            .prefix("hf-kube-")
            .tempdir()
            .expect("temp dir for the control plane");
        let pki = pki::write(dir.path(), &options.extra_ips).expect("test PKI");
        let mut plane = ControlPlane {
            etcd,
            bins,
            options,
            dir,
            pki,
            port: 0,
            apiserver: None,
            controllers: Vec::new(),
        };
        plane.write_static_files();
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            plane.port = free_port(plane.options.listen_ip);
            match plane.spawn_apiserver().await {
                Ok(()) => break,
                Err(e) => last_error = e,
            }
        }
        assert!(
            plane.apiserver.is_some(),
            "kube-apiserver did not start after {START_ATTEMPTS} attempts: {last_error}"
        );
        if plane.options.controllers {
            plane.spawn_controllers().await;
        }
        plane
    }

    /// `https://127.0.0.1:<port>` (or the listen address when it is not a wildcard).
    pub fn url(&self) -> String {
        let ip = if self.options.listen_ip.is_unspecified() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            self.options.listen_ip
        };
        self.url_at(ip)
    }

    /// The API server's URL as reached through `ip`.
    pub fn url_at(&self, ip: IpAddr) -> String {
        format!("https://{}", SocketAddr::new(ip, self.port))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster CA's certificate (PEM file).
    pub fn ca_cert(&self) -> &Path {
        &self.pki.ca_cert
    }

    /// The control plane's working directory (certificates, kubeconfigs, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A kubeconfig file for `identity`, reaching the API server at [`Self::url`].
    pub fn kubeconfig(&self, identity: &Identity) -> PathBuf {
        self.kubeconfig_for(identity, &self.url())
    }

    /// A kubeconfig file for `identity`, reaching the API server through `ip`.
    pub fn kubeconfig_at(&self, identity: &Identity, ip: IpAddr) -> PathBuf {
        self.kubeconfig_for(identity, &self.url_at(ip))
    }

    fn kubeconfig_for(&self, identity: &Identity, server: &str) -> PathBuf {
        let token = self.token(identity);
        let host = server
            .trim_start_matches("https://")
            .replace([':', '.'], "_");
        let path = self
            .dir
            .path()
            .join(format!("kubeconfig-{}-{host}", identity.tag()));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: {user}\ncurrent-context: test\n",
            ca = self.pki.ca_cert.display(),
            user = identity.tag(),
        );
        // Other processes (kubectl, sidecars, the binaries under test) read this file
        // while tests ask for it again: it is never rewritten in place (a reader could
        // see it truncated), only replaced whole by a rename, and only when it changes.
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let pid = std::process::id();
            let tmp = self.dir.path().join(format!(".kubeconfig-{pid}-{n}.tmp"));
            std::fs::write(&tmp, &text).expect("writing a kubeconfig");
            std::fs::rename(&tmp, &path).expect("replacing a kubeconfig");
        }
        path
    }

    /// A client acting as `identity`.
    pub async fn client(&self, identity: &Identity) -> kube::Client {
        client_from(&self.kubeconfig(identity)).await
    }

    /// A client acting as the admin.
    pub async fn admin(&self) -> kube::Client {
        self.client(&Identity::Admin).await
    }

    /// Creates `namespace` unless it exists.
    pub async fn ensure_namespace(&self, namespace: &str) {
        use k8s_openapi::api::core::v1::Namespace;
        let api: kube::Api<Namespace> = kube::Api::all(self.admin().await);
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": namespace}
        }))
        .expect("a namespace");
        match api.create(&Default::default(), &ns).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(e) => panic!("creating namespace {namespace}: {e}"),
        }
    }

    /// Applies every object of a multi-document YAML file as the admin (server-side
    /// apply, so a second apply of the same file is a no-op).
    pub async fn apply_yaml(&self, yaml: &str) {
        let client = self.admin().await;
        for doc in yaml.split("\n---") {
            let value: serde_json::Value = match serde_yaml_ng::from_str(doc) {
                Ok(serde_json::Value::Null) => continue,
                Ok(v) => v,
                Err(e) => panic!("parsing a YAML document: {e}\n{doc}"),
            };
            apply_object(&client, value).await;
        }
    }

    /// Every audit entry written so far ([`ControlPlaneOptions::audit`] must be on).
    pub fn audit_log(&self) -> Vec<AuditEntry> {
        assert!(
            self.options.audit,
            "the control plane was started without audit"
        );
        audit::read(&self.dir.path().join("audit.log"))
    }

    /// The last lines a component logged: `kube-apiserver`, `kube-controller-manager`,
    /// `kube-scheduler`.
    pub fn log_tail(&self, component: &str) -> String {
        log_tail(&self.dir.path().join(format!("{component}.log")))
    }

    /// Kills the API server and starts it again on the same port and etcd; returns once
    /// it is ready. What was stored survives.
    pub async fn restart_apiserver(&mut self) {
        self.kill_apiserver();
        if let Err(e) = self.spawn_apiserver().await {
            panic!("kube-apiserver did not restart: {e}");
        }
    }

    /// SIGKILLs the API server (idempotent); clients get connection errors until
    /// [`Self::restart_apiserver`].
    pub fn kill_apiserver(&mut self) {
        if let Some(mut child) = self.apiserver.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn token(&self, identity: &Identity) -> String {
        format!("hf-test-token-{}", identity.tag())
    }

    fn write_static_files(&self) {
        let mut tokens = String::new();
        let mut identities = vec![Identity::Admin];
        identities.extend(
            self.options
                .service_accounts
                .iter()
                .map(|(ns, name)| Identity::service_account(ns, name)),
        );
        for identity in identities {
            tokens.push_str(&format!(
                "{},{},{},\"{}\"\n",
                self.token(&identity),
                identity.user(),
                identity.tag(),
                identity.groups()
            ));
        }
        std::fs::write(self.dir.path().join("tokens.csv"), tokens).expect("token file");
        std::fs::write(
            self.dir.path().join("audit-policy.yaml"),
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n",
        )
        .expect("audit policy");
    }

    async fn spawn_apiserver(&mut self) -> Result<(), String> {
        let d = self.dir.path();
        let p = &self.pki;
        let mut args = vec![
            format!("--bind-address={}", self.options.listen_ip),
            "--advertise-address=127.0.0.1".to_string(),
            format!("--secure-port={}", self.port),
            "--insecure-port=0".to_string(),
            format!("--etcd-servers={}", self.etcd.client_url()),
            format!("--tls-cert-file={}", p.serving_cert.display()),
            format!("--tls-private-key-file={}", p.serving_key.display()),
            format!("--client-ca-file={}", p.ca_cert.display()),
            format!("--token-auth-file={}", d.join("tokens.csv").display()),
            "--authorization-mode=Node,RBAC".to_string(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_string(),
            format!(
                "--service-account-key-file={}",
                p.service_account_public.display()
            ),
            format!(
                "--service-account-signing-key-file={}",
                p.service_account_private.display()
            ),
            "--service-cluster-ip-range=10.0.0.0/24".to_string(),
            // The API server refuses a loopback address in the `kubernetes` Endpoints.
            "--endpoint-reconciler-type=none".to_string(),
            "--allow-privileged=true".to_string(),
            "--kubelet-preferred-address-types=InternalIP".to_string(),
            format!(
                "--requestheader-client-ca-file={}",
                p.front_proxy_ca_cert.display()
            ),
            "--requestheader-allowed-names=front-proxy-client".to_string(),
            "--requestheader-username-headers=X-Remote-User".to_string(),
            "--requestheader-group-headers=X-Remote-Group".to_string(),
            "--requestheader-extra-headers-prefix=X-Remote-Extra-".to_string(),
            format!(
                "--proxy-client-cert-file={}",
                p.front_proxy_client_cert.display()
            ),
            format!(
                "--proxy-client-key-file={}",
                p.front_proxy_client_key.display()
            ),
        ];
        if self.options.audit {
            args.push(format!(
                "--audit-policy-file={}",
                d.join("audit-policy.yaml").display()
            ));
            args.push(format!(
                "--audit-log-path={}",
                d.join("audit.log").display()
            ));
            // Written before the response is sent, so a test reads every call it made.
            args.push("--audit-log-mode=blocking".to_string());
        }
        args.extend(self.options.apiserver_args.iter().cloned());
        let child = spawn(
            &self.bins.require("kube-apiserver"),
            &args,
            &d.join("kube-apiserver.log"),
        )?;
        self.apiserver = Some(child);
        let client = client_from(&self.kubeconfig(&Identity::Admin)).await;
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Some(status) = self
                .apiserver
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.apiserver = None;
                return Err(format!(
                    "kube-apiserver exited with {status}: {}",
                    self.log_tail("kube-apiserver")
                ));
            }
            if ready(&client).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill_apiserver();
                return Err(format!(
                    "kube-apiserver not ready within {READY_WITHIN:?}: {}",
                    self.log_tail("kube-apiserver")
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn spawn_controllers(&mut self) {
        let d = self.dir.path().to_path_buf();
        let kubeconfig = self.kubeconfig(&Identity::Admin);
        let common = [
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--authentication-kubeconfig={}", kubeconfig.display()),
            format!("--authorization-kubeconfig={}", kubeconfig.display()),
            "--bind-address=127.0.0.1".to_string(),
            "--port=0".to_string(),
            "--leader-elect=false".to_string(),
        ];
        let mut kcm: Vec<String> = common.to_vec();
        kcm.extend([
            format!(
                "--secure-port={}",
                free_port(IpAddr::V4(Ipv4Addr::LOCALHOST))
            ),
            "--controllers=*".to_string(),
            format!(
                "--service-account-private-key-file={}",
                self.pki.service_account_private.display()
            ),
            format!("--root-ca-file={}", self.pki.ca_cert.display()),
            format!("--cluster-signing-cert-file={}", self.pki.ca_cert.display()),
            format!("--cluster-signing-key-file={}", self.pki.ca_key.display()),
            "--service-cluster-ip-range=10.0.0.0/24".to_string(),
            "--use-service-account-credentials=false".to_string(),
        ]);
        let mut scheduler: Vec<String> = common.to_vec();
        scheduler.push(format!(
            "--secure-port={}",
            free_port(IpAddr::V4(Ipv4Addr::LOCALHOST))
        ));
        for (name, args) in [
            ("kube-controller-manager", kcm),
            ("kube-scheduler", scheduler),
        ] {
            let child = spawn(
                &self.bins.require(name),
                &args,
                &d.join(format!("{name}.log")),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            self.controllers.push(child);
        }
        // The controller-manager is working once it has made the `default`
        // ServiceAccount of `default` (pods cannot be created before).
        use k8s_openapi::api::core::v1::ServiceAccount;
        let api: kube::Api<ServiceAccount> = kube::Api::namespaced(self.admin().await, "default");
        let deadline = Instant::now() + READY_WITHIN;
        while !matches!(api.get_opt("default").await, Ok(Some(_))) {
            assert!(
                Instant::now() < deadline,
                "kube-controller-manager made no default ServiceAccount in time: {}",
                self.log_tail("kube-controller-manager")
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for mut child in self.controllers.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.kill_apiserver();
    }
}

/// A client from a kubeconfig file.
pub async fn client_from(kubeconfig: &Path) -> kube::Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("reading a test kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("a test kubeconfig");
    kube::Client::try_from(config).expect("a kube client")
}

async fn ready(client: &kube::Client) -> bool {
    let request = http::Request::get("/readyz")
        .body(Vec::new())
        .expect("a request");
    let call = client.request_text(request);
    matches!(
        tokio::time::timeout(Duration::from_secs(2), call).await,
        Ok(Ok(body)) if body.trim() == "ok"
    )
}

fn spawn(bin: &Path, args: &[String], log: &Path) -> Result<Child, String> {
    let log_file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let err_file = log_file.try_clone().map_err(|e| e.to_string())?;
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(err_file)
        .spawn()
        .map_err(|e| format!("spawning {}: {e}", bin.display()))
}

/// Server-side apply of one object given as JSON, as the admin.
async fn apply_object(client: &kube::Client, value: serde_json::Value) {
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
    let api_version = value["apiVersion"]
        .as_str()
        .expect("apiVersion")
        .to_string();
    let kind = value["kind"].as_str().expect("kind").to_string();
    let (group, version) = match api_version.split_once('/') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (String::new(), api_version.clone()),
    };
    let gvk = GroupVersionKind::gvk(&group, &version, &kind);
    let resource = ApiResource::from_gvk(&gvk);
    let name = value["metadata"]["name"]
        .as_str()
        .expect("metadata.name")
        .to_string();
    let api: kube::Api<DynamicObject> = match value["metadata"]["namespace"].as_str() {
        Some(ns) => kube::Api::namespaced_with(client.clone(), ns, &resource),
        None => kube::Api::all_with(client.clone(), &resource),
    };
    let params = PatchParams::apply("holdfast-test").force();
    api.patch(&name, &params, &Patch::Apply(&value))
        .await
        .unwrap_or_else(|e| panic!("applying {kind} {name}: {e}"));
}
