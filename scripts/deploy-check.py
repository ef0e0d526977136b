#!/usr/bin/env python3
"""Checks the Helm chart and the plain manifests, offline.

- every YAML file that is not a template parses; every value in values.yaml has a comment;
- `helm lint --strict` finds nothing worse than a recommendation;
- the chart renders (Helm's own template engine, through the helm-python-sdk wheel) with
  its defaults and with each alternative setting, every rendered object validates against
  the Kubernetes OpenAPI schemas of the oldest and newest supported versions, and values
  the chart must refuse make rendering fail;
- the rendered objects keep the properties the driver's safety depends on (attach
  required, pod info on mount, privileged node plugin with bidirectional propagation,
  one backend path and one lease timing in controller and node plugin);
- manifests/deploy/ is exactly the chart rendered with its defaults, and the examples
  agree with the chart's StorageClass.

Usage: deploy-check.py                  check, exit 1 on any failure
       deploy-check.py --write          regenerate manifests/deploy/ from the chart, then check
       deploy-check.py --binaries DIR   also start DIR/holdfast-driver and
                                        DIR/holdfast-controller with the flags and
                                        environment the chart gives them, and fail if
                                        either rejects its command line
Needs: pip install helm-python-sdk kubernetes-validate pyyaml (scripts/test.sh does it).
"""

import os
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "holdfast"
MANIFESTS = ROOT / "manifests"
DEPLOY = MANIFESTS / "deploy"
RELEASE = "holdfast"
NAMESPACE = "holdfast"
# Schemas validated against: the examples ask ReadWriteOncePod, GA from 1.29, and the
# newest. The chart itself installs from 1.20 (Chart.yaml kubeVersion), which the install
# test on a real v1.20.2 node checks (core/tests/kube_chart_install.rs).
KUBE_VERSIONS = ["1.29.0", "1.37.0"]

# manifests/deploy/<file> <- the chart templates it mirrors, in apply order.
DEPLOY_FILES = {
    "10-csidriver.yaml": ["csidriver.yaml"],
    "20-rbac.yaml": ["serviceaccounts.yaml", "rbac-controller.yaml", "rbac-node.yaml"],
    "30-controller.yaml": ["controller.yaml"],
    "40-node.yaml": ["node.yaml"],
}
NAMESPACE_FILE = "00-namespace.yaml"
HEADER = """\
# Generated from charts/holdfast by scripts/deploy-check.py --write: these objects mirror
# the chart's default values (release "holdfast", namespace "holdfast"). Do not edit by
# hand; change the chart and regenerate. Apply with: kubectl apply -f manifests/deploy/
"""
# Labels that only make sense for a Helm release.
HELM_ONLY_LABEL = re.compile(r"^\s*(helm\.sh/chart|app\.kubernetes\.io/managed-by):")


class Failure(Exception):
    pass


def check(condition, message):
    if not condition:
        raise Failure(message)


def render(values=None):
    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
    prefix = f"{CHART.name}/templates/"
    return {path[len(prefix):]: text for path, text in rendered.items()}


def objects(rendered):
    """Every Kubernetes object rendered, as dicts, NOTES.txt excluded."""
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def find(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    check(len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}")
    return found[0]


def validate_schema(docs, where):
    for doc in docs:
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                raise Failure(f"{where}: {doc['kind']}/{doc['metadata'].get('name')} is "
                              f"invalid for Kubernetes {version}: {e.message} at "
                              f"/{'/'.join(str(p) for p in e.absolute_path)}")
            except kubernetes_validate.SchemaNotFoundError:
                raise Failure(f"{where}: {doc['apiVersion']} {doc['kind']} is unknown to "
                              f"Kubernetes {version}")


def container(pod_spec, name):
    found = [c for c in pod_spec["containers"] if c["name"] == name]
    check(len(found) == 1, f"container {name} missing")
    return found[0]


def flag(args, name):
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    check(len(values) == 1, f"flag --{name} must be given exactly once in {args}")
    return values[0]


def deploy_file_text(rendered, templates):
    parts = []
    for template in templates:
        lines = [l for l in rendered[template].strip("\n").splitlines() if not HELM_ONLY_LABEL.match(l)]
        parts.append("\n".join(lines))
    return HEADER + "---\n" + "\n---\n".join(parts) + "\n"


def namespace_file_text():
    return HEADER + f"""---
apiVersion: v1
kind: Namespace
metadata:
  name: {NAMESPACE}
  labels:
    app.kubernetes.io/name: holdfast
    app.kubernetes.io/part-of: holdfast
    # The node plugin runs privileged (mounts, FUSE, killing holders of fenced volumes).
    pod-security.kubernetes.io/enforce: privileged
"""


def expected_deploy_files():
    rendered = render()
    files = {NAMESPACE_FILE: namespace_file_text()}
    for name, templates in DEPLOY_FILES.items():
        files[name] = deploy_file_text(rendered, templates)
    return files


# ---------------------------------------------------------------- checks


def check_plain_yaml_parses():
    paths = [CHART / "Chart.yaml", CHART / "values.yaml"] + sorted(MANIFESTS.rglob("*.yaml"))
    for path in paths:
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as e:
            raise Failure(f"{path.relative_to(ROOT)} does not parse: {e}")
        check(docs, f"{path.relative_to(ROOT)} holds no YAML document")


def check_every_value_documented():
    """Each key in values.yaml has a comment on the line(s) above it or at its end."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        key = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9_]*):", line)
        if not key:
            continue
        previous = lines[i - 1].strip() if i > 0 else ""
        if not previous.startswith("#") and "#" not in line:
            undocumented.append(f"line {i + 1}: {key.group(2)}")
    check(not undocumented, "values without a comment: " + ", ".join(undocumented))


def check_lint():
    report = helm.lint(str(CHART), strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    check(not problems, f"helm lint: {problems}")


VARIANTS = {
    "defaults": {},
    "etcd lease store": {"leaseStore": {"type": "etcd", "etcd": {"endpoints": ["http://etcd-0:2379", "http://etcd-1:2379"]}},
                         "controller": {"expiry": {"interval": "30s", "fullEvery": 5}}},
    "lease namespace elsewhere": {"leaseStore": {"namespace": "holdfast-leases"}},
    "nfs backend": {"backend": {"type": "nfs", "nfs": {"server": "nfs.example.internal", "path": "/exports/holdfast"}}},
    "pvc backend": {"backend": {"type": "pvc", "pvc": {"claimName": "holdfast-backend"}}},
    "fuse passthrough": {"node": {"fusePassthrough": True}},
    "no storage class, default class, OnDelete": {
        "storageClass": {"create": False, "isDefault": True},
        "node": {"updateStrategy": {"type": "OnDelete", "rollingUpdate": None}},
    },
    "custom kubelet dir, pull secrets, affinity": {
        "kubeletDir": "/var/lib/k0s/kubelet",
        "imagePullSecrets": [{"name": "regcred"}],
        "controller": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "role", "operator": "In", "values": ["storage"]}]}]}}}},
    },
}


def check_variants_render_valid():
    for name, values in VARIANTS.items():
        docs = objects(render(values))
        validate_schema(docs, f"chart ({name})")
        check_safety_properties(docs, values, name)


def check_safety_properties(docs, values, variant):
    where = f"chart ({variant})"
    driver = find(docs, "CSIDriver", "holdfast.csi.dev")["spec"]
    check(driver["attachRequired"] is True, f"{where}: attachRequired must be true (ControllerPublish refuses a second node)")
    check(driver["podInfoOnMount"] is True, f"{where}: podInfoOnMount must be true (claims record the pod UID)")
    check(driver["volumeLifecycleModes"] == ["Persistent"], f"{where}: only Persistent volumes")
    check(driver["fsGroupPolicy"] == "File", f"{where}: fsGroupPolicy must be File")

    node = find(docs, "DaemonSet")["spec"]["template"]["spec"]
    ctrl = find(docs, "Deployment")["spec"]["template"]["spec"]
    plugin = container(node, "holdfast-driver")
    controller = container(ctrl, "holdfast-controller")
    check(node.get("hostPID") is True, f"{where}: node plugin needs hostPID (bind mode kills holders on fence)")
    check(plugin["securityContext"].get("privileged") is True, f"{where}: node plugin must be privileged")
    kubelet_dir = (values.get("kubeletDir") or "/var/lib/kubelet")
    propagated = [m for m in plugin["volumeMounts"] if m.get("mountPropagation") == "Bidirectional"]
    check([m["mountPath"] for m in propagated] == [kubelet_dir],
          f"{where}: kubelet dir {kubelet_dir} must be the one Bidirectional mount")
    check(any(m["mountPath"] == "/dev/fuse" for m in plugin["volumeMounts"]), f"{where}: /dev/fuse not mounted")
    # The kernel fence is pinned on bpffs; only the host's instance outlives the plugin pod.
    bpf = [v for v in node["volumes"] if v["name"] == "bpf-fs"]
    check(len(bpf) == 1 and bpf[0]["hostPath"]["path"] == "/sys/fs/bpf", f"{where}: host bpffs volume")
    check(any(m["mountPath"] == "/sys/fs/bpf" for m in plugin["volumeMounts"]), f"{where}: bpffs not mounted")
    passthrough = values.get("node", {}).get("fusePassthrough", False)
    check(("--fuse-passthrough" in plugin["args"]) == passthrough, f"{where}: --fuse-passthrough follows the value")
    check(flag(plugin["args"], "node-id") == "$(KUBE_NODE_NAME)", f"{where}: node id must come from spec.nodeName")
    env = {e["name"]: e for e in plugin["env"]}
    check(env["KUBE_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName", f"{where}: KUBE_NODE_NAME")
    registrar = container(node, "node-driver-registrar")
    check(flag(registrar["args"], "kubelet-registration-path") == f"{kubelet_dir}/plugins/holdfast.csi.dev/csi.sock",
          f"{where}: registration path must be under the kubelet dir")

    # Controller and node plugin must agree on the backend path and on lease timing:
    # disagreeing timings would let one side count a session expired the other thinks live.
    backend_path = flag(plugin["args"], "backend-root")
    check(flag(controller["args"], "backend-root") == backend_path, f"{where}: backend root differs")
    for pod, c in ((node, plugin), (ctrl, controller)):
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        check(mounts.get("backend") == backend_path, f"{where}: {c['name']} mounts the backend elsewhere")
        check(sum(v["name"] == "backend" for v in pod["volumes"]) == 1, f"{where}: one backend volume")
    log_flags = lambda c: sorted(a for a in c["args"] if a.startswith(("--lease-", "--etcd-", "--log-")))
    check(log_flags(plugin) == log_flags(controller), f"{where}: logging flags differ")
    check(not [a for a in log_flags(plugin) if not a.startswith("--log-")],
          f"{where}: lease settings belong in the shared environment block, not in flags")
    lease_env = lambda c: sorted((e["name"], e["value"]) for e in c["env"] if e["name"].startswith("HOLDFAST_"))
    check(lease_env(plugin) == lease_env(controller), f"{where}: lease settings differ between controller and node")
    store = values.get("leaseStore", {}).get("type", "kubernetes")
    names = {name for name, _ in lease_env(plugin)}
    wanted = {"HOLDFAST_LEASE_STORE", "HOLDFAST_LEASE_DURATION", "HOLDFAST_LEASE_MARGIN", "HOLDFAST_LEASE_EPSILON",
              {"kubernetes": "HOLDFAST_LEASE_NAMESPACE", "etcd": "HOLDFAST_ETCD_ENDPOINTS"}[store]}
    check(wanted <= names, f"{where}: lease settings missing: {sorted(wanted - names)}")
    for sidecar in ("csi-provisioner", "csi-attacher", "csi-resizer"):
        check("--leader-election" in container(ctrl, sidecar)["args"], f"{where}: {sidecar} without leader election")

    classes = [d for d in docs if d["kind"] == "StorageClass"]
    wants_class = values.get("storageClass", {}).get("create", True)
    check(len(classes) == (1 if wants_class else 0), f"{where}: StorageClass count")


REFUSED = {
    "unknown backend type": {"backend": {"type": "local"}},
    "nfs without server": {"backend": {"type": "nfs"}},
    "pvc without claim": {"backend": {"type": "pvc"}},
    "etcd without endpoints": {"leaseStore": {"type": "etcd"}},
    "unknown lease store": {"leaseStore": {"type": "memory"}},
}


def check_bad_values_refused():
    for name, values in REFUSED.items():
        try:
            render(values)
        except helm.HelmError:
            continue
        raise Failure(f"chart rendered despite {name}")


def check_deploy_mirrors_chart():
    expected = expected_deploy_files()
    present = {p.name for p in DEPLOY.glob("*.yaml")}
    check(present == set(expected), f"manifests/deploy holds {sorted(present)}, expected {sorted(expected)}")
    stale = [name for name, text in expected.items() if (DEPLOY / name).read_text() != text]
    check(not stale, f"manifests/deploy is stale ({stale}): run scripts/deploy-check.py --write")
    docs = []
    for name in sorted(expected):
        docs += [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]
    validate_schema(docs, "manifests/deploy")


def check_examples_match_chart():
    examples = {}
    for path in sorted((MANIFESTS / "examples").glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        validate_schema(docs, str(path.relative_to(ROOT)))
        examples[path.name] = docs
    chart_class = find(objects(render()), "StorageClass")
    example_class = find(examples["storageclass.yaml"], "StorageClass")
    for field in ("provisioner", "parameters", "reclaimPolicy", "allowVolumeExpansion", "volumeBindingMode"):
        check(example_class.get(field) == chart_class.get(field),
              f"examples/storageclass.yaml {field} differs from the chart's StorageClass")
    check(example_class["metadata"]["name"] == chart_class["metadata"]["name"], "StorageClass name differs")
    check(example_class["parameters"]["exclusive"] == "true", "example StorageClass must be exclusive")
    class_name = chart_class["metadata"]["name"]
    pvc = find(examples["pvc.yaml"], "PersistentVolumeClaim")
    check(pvc["spec"]["storageClassName"] == class_name, "pvc.yaml uses another class")
    check(pvc["spec"]["accessModes"] == ["ReadWriteOncePod"], "pvc.yaml must ask for ReadWriteOncePod")
    sts = find(examples["statefulset.yaml"], "StatefulSet", "db")
    templates = sts["spec"]["volumeClaimTemplates"]
    check(all(t["spec"]["storageClassName"] == class_name for t in templates), "statefulset uses another class")
    check(all(t["spec"]["accessModes"] == ["ReadWriteOncePod"] for t in templates), "statefulset claims must be ReadWriteOncePod")
    check(sts["spec"]["replicas"] == 1, "the db example runs one replica")


def check_parameter_comments():
    """The values the comments offer for a StorageClass parameter are values the driver
    accepts (read from the parser in core/src/backend/params.rs), in values.yaml and in
    the example StorageClass."""
    source = (ROOT / "core" / "src" / "backend" / "params.rs").read_text()
    accepted = {}
    for value, kind in re.findall(r'"(\w+)" => (OnConflict|DataPath|FenceAction)::', source):
        accepted.setdefault(kind, set()).add(value)
    params = {"onConflict": "OnConflict", "dataPath": "DataPath", "fenceAction": "FenceAction"}
    check(set(accepted) == set(params.values()), f"parameter parser not found: {sorted(accepted)}")
    for path in (CHART / "values.yaml", MANIFESTS / "examples" / "storageclass.yaml"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            key = line.strip().split(":")[0]
            if key not in params:
                continue
            j, comment = i - 1, []
            while j >= 0 and lines[j].strip().startswith("#"):
                comment.append(lines[j])
                j -= 1
            offered = set(re.findall(r'"(\w+)"', " ".join(comment)))
            wrong = offered - accepted[params[key]] - {"true", "false"}
            check(not wrong, f"{path.relative_to(ROOT)}: the comment on {key} offers {sorted(wrong)}, "
                             f"which the driver refuses (it accepts {sorted(accepted[params[key]])})")


def check_binaries_accept_chart(binaries):
    """The binaries parse what the chart passes them (flags and HOLDFAST_* variables).

    Paths are moved into a temporary directory; without a cluster the processes then fail
    at run time (or keep running until killed), which is fine. What fails the check is a
    rejected command line: clap's usage exit code 2, or an error naming a flag.
    """
    for variant in ("defaults", "etcd lease store"):
        docs = objects(render(VARIANTS[variant]))
        pods = {"holdfast-driver": find(docs, "DaemonSet"), "holdfast-controller": find(docs, "Deployment")}
        for name, workload in pods.items():
            c = container(workload["spec"]["template"]["spec"], name)
            with tempfile.TemporaryDirectory() as tmp:
                env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "KUBE_NODE_NAME": "check-node",
                       "POD_NAMESPACE": NAMESPACE}
                env.update({e["name"]: e["value"] for e in c["env"] if "value" in e})
                args = []
                for arg in c["args"]:
                    key, _, value = arg.partition("=")
                    if key == "--endpoint":
                        value = f"unix://{tmp}/csi.sock"
                    elif key in ("--backend-root", "--state-dir"):
                        value = f"{tmp}/{key[2:]}"
                        os.makedirs(value)
                    value = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], value)
                    args.append(f"{key}={value}" if value else key)
                command = [str(Path(binaries).resolve() / c["command"][0])] + args
                try:
                    done = subprocess.run(command, env=env, cwd=tmp, capture_output=True, text=True, timeout=5)
                except subprocess.TimeoutExpired:
                    continue  # still running: it accepted its configuration
                first = (done.stderr.strip().splitlines() or [""])[0]
                check(done.returncode != 2 and not re.match(r"^(error|Error): .*--[a-z]", first),
                      f"{name} ({variant}) rejects the chart's command line {args}: {done.stderr.strip()[:400]}")


CHECKS = [
    check_plain_yaml_parses,
    check_every_value_documented,
    check_lint,
    check_variants_render_valid,
    check_bad_values_refused,
    check_deploy_mirrors_chart,
    check_examples_match_chart,
    check_parameter_comments,
]


def main():
    if "--write" in sys.argv[1:]:
        DEPLOY.mkdir(parents=True, exist_ok=True)
        for name, text in expected_deploy_files().items():
            (DEPLOY / name).write_text(text)
        print(f"wrote {DEPLOY.relative_to(ROOT)}/")
    checks = list(CHECKS)
    if "--binaries" in sys.argv[1:]:
        binaries = sys.argv[sys.argv.index("--binaries") + 1]
        checks.append(lambda: check_binaries_accept_chart(binaries))
        checks[-1].__name__ = "check_binaries_accept_chart"
    passed, failed = 0, 0
    for run in checks:
        try:
            run()
            passed += 1
            print(f"ok   {run.__name__}")
        except Failure as e:
            failed += 1
            print(f"FAIL {run.__name__}: {e}")
        except Exception:
            failed += 1
            print(f"FAIL {run.__name__}: unexpected error", flush=True)
            traceback.print_exc()
    print(f"deploy-check: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
