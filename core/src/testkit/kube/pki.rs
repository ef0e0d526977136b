//! The certificates and keys a test control plane needs, made fresh for each one: a
//! cluster CA and the API server's serving certificate, a front-proxy CA and its client
//! certificate (the aggregation layer: without it the controller-manager and scheduler
//! log authentication errors in a loop), and the service-account signing key pair.
//!
//! ECDSA P-256 throughout: kube-apiserver v1.20 accepts it for every role here, and it
//! is generated in microseconds where RSA takes seconds on a loaded machine.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// Paths of the files [`write`] made.
#[derive(Clone, Debug)]
pub struct Pki {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    pub front_proxy_ca_cert: PathBuf,
    pub front_proxy_client_cert: PathBuf,
    pub front_proxy_client_key: PathBuf,
    pub service_account_public: PathBuf,
    pub service_account_private: PathBuf,
}

/// Writes a new PKI into `dir`. The serving certificate covers loopback, the service
/// network's first address, the names in-cluster clients use, and `extra_ips` (the
/// addresses processes in other network namespaces dial).
pub fn write(dir: &Path, extra_ips: &[IpAddr]) -> Result<Pki, rcgen::Error> {
    let file = |name: &str| dir.join(name);
    let pki = Pki {
        ca_cert: file("ca.crt"),
        ca_key: file("ca.key"),
        serving_cert: file("apiserver.crt"),
        serving_key: file("apiserver.key"),
        front_proxy_ca_cert: file("front-proxy-ca.crt"),
        front_proxy_client_cert: file("front-proxy-client.crt"),
        front_proxy_client_key: file("front-proxy-client.key"),
        service_account_public: file("sa.pub"),
        service_account_private: file("sa.key"),
    };

    let ca_key = KeyPair::generate()?;
    save(&pki.ca_key, &ca_key.serialize_pem());
    let ca = CertifiedIssuer::self_signed(ca_params("holdfast-test-ca"), ca_key)?;
    save(&pki.ca_cert, &ca.pem());

    let mut serving = leaf_params("kube-apiserver", ExtendedKeyUsagePurpose::ServerAuth);
    serving.subject_alt_names = vec![
        SanType::IpAddress("127.0.0.1".parse().expect("an IP")),
        SanType::IpAddress("10.0.0.1".parse().expect("an IP")),
        SanType::DnsName("localhost".try_into()?),
        SanType::DnsName("kubernetes.default.svc".try_into()?),
    ];
    serving
        .subject_alt_names
        .extend(extra_ips.iter().map(|ip| SanType::IpAddress(*ip)));
    let serving_key = KeyPair::generate()?;
    save(&pki.serving_key, &serving_key.serialize_pem());
    save(
        &pki.serving_cert,
        &serving.signed_by(&serving_key, &ca)?.pem(),
    );

    let front_key = KeyPair::generate()?;
    let front_ca =
        CertifiedIssuer::self_signed(ca_params("holdfast-test-front-proxy-ca"), front_key)?;
    save(&pki.front_proxy_ca_cert, &front_ca.pem());
    let client = leaf_params("front-proxy-client", ExtendedKeyUsagePurpose::ClientAuth);
    let client_key = KeyPair::generate()?;
    save(&pki.front_proxy_client_key, &client_key.serialize_pem());
    save(
        &pki.front_proxy_client_cert,
        &client.signed_by(&client_key, &front_ca)?.pem(),
    );

    let sa = KeyPair::generate()?;
    save(&pki.service_account_private, &sa.serialize_pem());
    save(&pki.service_account_public, &sa.public_key_pem());
    Ok(pki)
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn leaf_params(name: &str, usage: ExtendedKeyUsagePurpose) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![usage];
    params
}

fn save(path: &Path, pem: &str) {
    std::fs::write(path, pem).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}
