//! Identity service: plugin name and version, advertised plugin capabilities, Probe.

use holdfast_core::csi::v1::{
    plugin_capability, GetPluginCapabilitiesRequest, GetPluginInfoRequest, ProbeRequest,
};

use crate::support::{assert_ok, bounded, PluginService, Sanity};

/// The name Kubernetes' CSIDriver object and every PV carry; changing it orphans volumes.
const DRIVER_NAME: &str = "holdfast.csi.dev";

#[tokio::test]
async fn plugin_info_names_the_driver_and_a_semver_version() {
    bounded(async {
        let s = Sanity::start().await;
        let info = assert_ok(
            "GetPluginInfo",
            s.identity().get_plugin_info(GetPluginInfoRequest {}).await,
        );
        assert_eq!(info.name, DRIVER_NAME);
        // The CSI rule for names: at most 63 characters, starting and ending with a
        // letter, otherwise letters, digits, '-', '.' and '_'.
        assert!(
            is_valid_driver_name(&info.name),
            "{:?} is not a valid CSI driver name",
            info.name
        );
        assert!(
            is_semver(&info.vendor_version),
            "vendor_version {:?} is not semver",
            info.vendor_version
        );
    })
    .await
}

#[tokio::test]
async fn plugin_capabilities_are_known_and_include_the_controller_service() {
    bounded(async {
        let s = Sanity::start().await;
        let caps = assert_ok(
            "GetPluginCapabilities",
            s.identity()
                .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
                .await,
        )
        .capabilities;
        for cap in &caps {
            match &cap.r#type {
                Some(plugin_capability::Type::Service(svc)) => {
                    // csi-sanity fails on any service outside the ones it knows, even
                    // newer ones our proto has (SNAPSHOT_METADATA_SERVICE).
                    let known = PluginService::try_from(svc.r#type).is_ok_and(|t| {
                        matches!(
                            t,
                            PluginService::ControllerService
                                | PluginService::VolumeAccessibilityConstraints
                                | PluginService::GroupControllerService
                        )
                    });
                    assert!(known, "plugin service csi-sanity rejects: {}", svc.r#type);
                }
                Some(plugin_capability::Type::VolumeExpansion(exp)) => {
                    let known = plugin_capability::volume_expansion::Type::try_from(exp.r#type)
                        .is_ok_and(|t| t != plugin_capability::volume_expansion::Type::Unknown);
                    assert!(known, "unknown volume expansion type {}", exp.r#type);
                }
                other => panic!("plugin capability of unknown kind: {other:?}"),
            }
        }
        // Standalone mode serves controller and node on one socket, as csi-sanity needs.
        assert!(
            s.plugin_services()
                .await
                .contains(&PluginService::ControllerService),
            "standalone plugin must advertise CONTROLLER_SERVICE, got {caps:?}"
        );
    })
    .await
}

#[tokio::test]
async fn probe_answers_ok_and_becomes_ready() {
    bounded(async {
        let s = Sanity::start().await;
        // Every Probe answers OK. `ready` is optional and may be false while the plugin
        // starts (its session lease), but a standalone plugin must get there promptly.
        for _ in 0..50 {
            let resp = assert_ok("Probe", s.identity().probe(ProbeRequest {}).await);
            if resp.ready != Some(false) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("standalone plugin still reports not ready 5 s after start");
    })
    .await
}

fn is_valid_driver_name(name: &str) -> bool {
    let b = name.as_bytes();
    let inner_ok = |c: &u8| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_');
    (2..=63).contains(&b.len())
        && b[0].is_ascii_alphabetic()
        && b[b.len() - 1].is_ascii_alphabetic()
        && b.iter().all(inner_ok)
}

/// MAJOR.MINOR.PATCH, numbers without leading zeros, optional `-pre` and `+build`.
fn is_semver(v: &str) -> bool {
    let core = v.split(['-', '+']).next().unwrap_or("");
    let tail_ok = v[core.len()..]
        .split(['-', '+', '.'])
        .skip(1)
        .all(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    let parts: Vec<&str> = core.split('.').collect();
    let number = |p: &&str| {
        !p.is_empty()
            && p.chars().all(|c| c.is_ascii_digit())
            && (p.len() == 1 || !p.starts_with('0'))
    };
    parts.len() == 3 && parts.iter().all(number) && tail_ok
}

#[test]
fn semver_and_name_checks_reject_what_they_should() {
    assert!(is_semver("0.1.0") && is_semver("1.20.3-rc.1+abc"));
    assert!(!is_semver("") && !is_semver("v0.1.0") && !is_semver("0.1") && !is_semver("01.1.0"));
    assert!(is_valid_driver_name(DRIVER_NAME));
    assert!(!is_valid_driver_name("holdfast.csi.dev.") && !is_valid_driver_name("1abc"));
}
