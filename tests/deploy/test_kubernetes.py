"""`berth deploy --target kubernetes` (server/deploy/kubernetes.py): the kustomize directory it renders
builds with `kubectl kustomize`, every core object validates against the Kubernetes API schema (strict:
unknown fields fail), the InferencePool against the vendored Gateway API Inference Extension CRD, and the
manifests mean what berth needs (token only in the Secret, probes, drain timing, resources, HPA, pool)."""
from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from server.deploy import kubernetes as k8s
from server.deploy.config import parse_config

K8S_VERSION = "1.32.0"           # the Kubernetes API the core objects are validated against (pinned)
CRD = Path(k8s.__file__).parent / "k8s" / "crds" / "inference.networking.k8s.io_inferencepools.yaml"
TOKEN = "t0ken-" + "x" * 40

EXAMPLE = {"name": "qwen-chat", "model": "default", "deployment": "accelerated",
           "resources": {"cpu": 2, "memory": "8Gi", "replicas": 1}}
SCALED = {"name": "qwen-big", "model": "default", "deployment": "vllm", "token": TOKEN,
          "resources": {"cpu": "1500m", "memory": "12Gi", "replicas": 3},
          "max_num_seqs": 32, "quantization": "int8", "no_prefix_caching": True, "drain_timeout": 45,
          "served_model_name": "qwen$(HOME)", "knowledge_db": "postgresql://kb:s3cret-pass@db:5432/kb"}
CONFIGS = {"example": EXAMPLE, "scaled": SCALED}
KUBECTL = shutil.which("kubectl")


@pytest.fixture(scope="module", params=list(CONFIGS))
def rendered(request, tmp_path_factory):
    config = parse_config(copy.deepcopy(CONFIGS[request.param]))
    out = tmp_path_factory.mktemp(request.param)
    files = k8s.render(config, out)
    return config, out, files


@pytest.fixture(scope="module", params=["files", "kustomize"])
def objects(request, rendered):
    """{kind: object}: the files as written, and as `kubectl kustomize` builds them."""
    config, out, _ = rendered
    if request.param == "kustomize":
        if KUBECTL is None:
            pytest.skip("kubectl is not installed: cannot run `kubectl kustomize`")
        proc = subprocess.run([KUBECTL, "kustomize", str(out)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    else:
        listed = yaml.safe_load((out / "kustomization.yaml").read_text())["resources"]
        docs = [d for name in listed for d in yaml.safe_load_all((out / name).read_text()) if d]
    kinds = [d["kind"] for d in docs]
    assert sorted(kinds) == sorted(["Deployment", "Service", "Secret", "HorizontalPodAutoscaler", "InferencePool"])
    return config, {d["kind"]: d for d in docs}


def _raw(config) -> dict:
    """The config dict a ServiceConfig was parsed from."""
    return next(c for c in CONFIGS.values() if c["name"] == config.name)


def _container(objects) -> dict:
    (container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


# ---- files

def test_render_writes_the_directory(rendered):
    config, out, files = rendered
    names = {p.name for p in files}
    assert names == {"kustomization.yaml", "deployment.yaml", "service.yaml", "secret.yaml", "hpa.yaml",
                     "inferencepool.yaml", "Dockerfile", ".dockerignore", "Dockerfile.dockerignore", "README.md"}
    assert all(p.parent == out and p.is_file() for p in files)
    assert not list(out.glob("*.tmp"))
    kustomization = yaml.safe_load((out / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization" and "namespace" not in kustomization
    assert set(kustomization["resources"]) == {"deployment.yaml", "service.yaml", "secret.yaml", "hpa.yaml",
                                              "inferencepool.yaml"}
    assert kustomization["labels"][0]["pairs"]["app.kubernetes.io/name"] == config.name


def test_dockerfile_builds_from_source_without_a_model(rendered):
    config, out, _ = rendered
    text = (out / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in text
    assert re.search(r"^USER 10001", text, re.M) and f"--uid {k8s.RUN_AS}" in text
    assert re.search(r"^EXPOSE 8000$", text, re.M) and 'ENTRYPOINT ["berth"]' in text
    # no model in the image: nothing resolves or downloads one at build time
    assert "resolve_model" not in text and "pip download" not in text and "huggingface" not in text.lower()
    ignore = (out / ".dockerignore").read_text()
    assert ignore == (out / "Dockerfile.dockerignore").read_text()
    assert "**/*.gguf" in ignore and "!server/" in ignore and "!kernels/" in ignore
    readme = (out / "README.md").read_text()
    assert "@@" not in readme and "kubectl apply -k" in readme and "prometheus-adapter" in readme
    assert "InferencePool" in readme and "HTTPRoute" in readme and f"{config.name}-epp" in readme


def test_kernel_sources_and_k8s_data_ship_in_the_package():
    """The image is a non-editable install: the native kernels' sources and the templates are package data."""
    setup = (Path(k8s.__file__).parents[2] / "setup.py").read_text()
    assert '"kernels": ["csrc/*"]' in setup and '"server.deploy": ["k8s/*", "k8s/crds/*"]' in setup


# ---- schemas

def test_core_objects_validate_against_the_kubernetes_api(objects):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    _, by_kind = objects
    for kind in ("Deployment", "Service", "Secret", "HorizontalPodAutoscaler"):
        assert kubernetes_validate.validate(by_kind[kind], K8S_VERSION, strict=True) == "1.32", kind


def test_kubernetes_validation_catches_unknown_fields(objects):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    bad = copy.deepcopy(objects[1]["Deployment"])
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/ready", "port": 8000}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def _crd_schema() -> tuple[dict, list[tuple[str, str]]]:
    """The CRD's v1 openAPIV3Schema as a JSON Schema, and its x-kubernetes-validations (CEL) rules by path.
    Structural schemas drop unknown fields (kubectl's strict field validation rejects them): objects
    with properties get additionalProperties: false unless x-kubernetes-preserve-unknown-fields."""
    crd = yaml.safe_load(CRD.read_text())
    assert crd["spec"]["group"] == "inference.networking.k8s.io" and crd["spec"]["names"]["kind"] == "InferencePool"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert version["served"] and version["storage"]
    rules: list[tuple[str, str]] = []

    def convert(node: dict, path: str) -> dict:
        out = {}
        for key, value in node.items():
            if key == "x-kubernetes-validations":
                rules.extend((path, rule["rule"]) for rule in value)
            elif key == "x-kubernetes-int-or-string":
                out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            elif key.startswith("x-kubernetes-") or key == "description":
                continue
            elif key == "properties":
                out[key] = {name: convert(sub, f"{path}.{name}") for name, sub in value.items()}
            elif key in ("items", "additionalProperties") and isinstance(value, dict):
                out[key] = convert(value, f"{path}[]")
            elif key == "nullable":
                continue
            else:
                out[key] = value
        if node.get("x-kubernetes-int-or-string"):
            out.pop("type", None)
        if node.get("nullable") and "type" in out:
            out["type"] = [out["type"], "null"]
        if "properties" in out and "additionalProperties" not in out \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out

    return convert(version["schema"]["openAPIV3Schema"], "$"), rules


def _check_cel_rules(pool: dict, rules: list[tuple[str, str]]) -> None:
    """The CRD's CEL rules, in Python; a new or changed rule fails here until it is reviewed."""
    assert sorted(rules) == sorted([
        ("$.spec.endpointPickerRef", "self.kind != 'Service' || has(self.port)"),
        ("$.spec.targetPorts", "self.all(p1, self.exists_one(p2, p1.number==p2.number))"),
    ])
    ref = pool["spec"].get("endpointPickerRef")
    if ref is not None:
        assert ref.get("kind", "Service") != "Service" or "port" in ref, "port is required for a Service"
    numbers = [p["number"] for p in pool["spec"]["targetPorts"]]
    assert len(numbers) == len(set(numbers)), "port number must be unique"


def test_inference_pool_validates_against_the_vendored_crd(objects):
    _, by_kind = objects
    pool = by_kind["InferencePool"]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    schema, rules = _crd_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(pool)
    _check_cel_rules(pool, rules)


@pytest.mark.parametrize("mutate", [
    lambda s: s.update(targetPort=[{"number": 8000}]),                     # unknown field (typo)
    lambda s: s.pop("targetPorts"),                                         # required
    lambda s: s["endpointPickerRef"].update(failureMode="Open"),            # enum
    lambda s: s["targetPorts"].append({"number": 70000}),                  # maximum
    lambda s: s["selector"].update(matchExpressions=[{"key": "a", "operator": "In"}]),  # not supported in v1
])
def test_crd_validation_catches_bad_pools(rendered, mutate):
    schema, _ = _crd_schema()
    pool = k8s.inference_pool(rendered[0])
    mutate(pool["spec"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(pool)


def test_crd_rules_catch_a_picker_without_port(rendered):
    _, rules = _crd_schema()
    pool = k8s.inference_pool(rendered[0])
    del pool["spec"]["endpointPickerRef"]["port"]
    with pytest.raises(AssertionError, match="port is required"):
        _check_cel_rules(pool, rules)


# ---- semantics

def test_token_is_only_in_the_secret(objects):
    config, by_kind = objects
    secret = by_kind["Secret"]
    assert secret["stringData"]["token"] == config.token and secret["type"] == "Opaque"
    for kind, obj in by_kind.items():
        if kind != "Secret":
            assert config.token not in yaml.safe_dump(obj), f"the token leaks into the {kind}"
    container = _container(by_kind)
    args = container["args"]
    assert "--token" not in args                # berth serve reads $BERTH_TOKEN: not even in the process list
    env = {e["name"]: e for e in container["env"]}
    assert env["BERTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "token"}
    if config.knowledge_db is not None:      # a database URL holds a password: the Secret carries it too
        assert secret["stringData"]["knowledge-db"] == config.knowledge_db
        assert config.knowledge_db not in yaml.safe_dump(by_kind["Deployment"])
        assert args[args.index("--knowledge-db") + 1] == "$(BERTH_KNOWLEDGE_DB)"
        assert env["BERTH_KNOWLEDGE_DB"]["valueFrom"]["secretKeyRef"]["key"] == "knowledge-db"


def test_probes_and_shutdown(objects):
    config, by_kind = objects
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    container = _container(by_kind)
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] == "http"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300    # a model load gets minutes
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    assert pre_stop >= 5
    args = container["args"]
    drain = float(args[args.index("--drain-timeout") + 1])
    assert args.count("--drain-timeout") == 1
    assert drain == float(_raw(config).get("drain_timeout", 30))
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain


def test_serve_command(objects):
    config, by_kind = objects
    container = _container(by_kind)
    assert container["image"] == config.image
    assert container["command"] == ["berth"]
    args = container["args"]
    assert args[:5] == ["serve", "--host", "0.0.0.0", "--port", "8000"]
    assert args.count("--metrics-public") == 1
    assert args[args.index("--model") + 1] == config.model
    assert args[args.index("--engine") + 1] == config.engine
    raw = _raw(config)
    for key in ("max_num_seqs", "quantization", "served_model_name"):
        if key in raw:
            flag = "--" + key.replace("_", "-")
            value = str(raw[key]).replace("$", "$$")       # Kubernetes would expand $(HOME) otherwise
            assert args[args.index(flag) + 1] == value, flag
    if raw.get("no_prefix_caching"):
        assert "--no-prefix-caching" in args
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]


def test_resources_replicas_and_pod_security(objects):
    config, by_kind = objects
    deployment = by_kind["Deployment"]
    assert deployment["spec"]["replicas"] == config.resources.replicas
    container = _container(by_kind)
    for side in ("requests", "limits"):
        assert _cores(container["resources"][side]["cpu"]) == config.resources.cpu
        assert container["resources"][side]["memory"] == config.resources.memory
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["automountServiceAccountToken"] is False
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def _cores(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_model_cache_volume_and_fetch(objects):
    config, by_kind = objects
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model-cache"] == {"name": "model-cache", "emptyDir": {}}
    (init,) = pod["initContainers"]
    for container in (init, _container(by_kind)):
        env = {e["name"]: e.get("value") for e in container["env"]}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert env["BERTH_CACHE"] == mounts["model-cache"] == k8s.CACHE_DIR
        assert mounts["tmp"] == "/tmp" and env["HOME"] == "/tmp"    # writable places on a read-only root
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert init["image"] == config.image and init["command"][:2] == ["python", "-c"]
    assert f"resolve_model({config.model!r})" in init["command"][2]
    compile(init["command"][2], "fetch-model", "exec")


def test_cache_claim_option(tmp_path):
    config = parse_config(copy.deepcopy(EXAMPLE))
    k8s.render(config, tmp_path, cache_claim="berth-models")
    deployment = yaml.safe_load((tmp_path / "deployment.yaml").read_text())
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"] == {"claimName": "berth-models"}


def test_service(objects):
    config, by_kind = objects
    service = by_kind["Service"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    assert _selects(service["spec"]["selector"], by_kind)


def _selects(selector: dict, by_kind: dict) -> bool:
    labels = by_kind["Deployment"]["spec"]["template"]["metadata"]["labels"]
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_hpa(objects):
    config, by_kind = objects
    hpa = by_kind["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": by_kind["Deployment"]["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] == config.resources.replicas
    assert config.resources.replicas < hpa["spec"]["maxReplicas"] <= 64
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "vllm:num_requests_waiting"
    assert metric["pods"]["target"]["type"] == "AverageValue"


def test_inference_pool_selects_the_pods(objects):
    config, by_kind = objects
    pool = by_kind["InferencePool"]
    assert pool["kind"] == "InferencePool" and pool["metadata"]["name"] == config.name
    assert _selects(pool["spec"]["selector"]["matchLabels"], by_kind)
    assert pool["spec"]["selector"]["matchLabels"] == by_kind["Deployment"]["spec"]["selector"]["matchLabels"]
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    assert pool["spec"]["endpointPickerRef"]["name"] == f"{config.name}-epp"
    # the picker scrapes the pods' /metrics without a token
    assert "--metrics-public" in _container(by_kind)["args"]


def test_dollar_signs_survive_kubernetes_expansion(tmp_path):
    """Kubernetes expands $(VAR) in command/args and turns $$ into $: a model path with `$` stays literal."""
    config = parse_config(copy.deepcopy(EXAMPLE) | {"model": "/models/a$(HOME)b.gguf"})
    k8s.render(config, tmp_path)
    pod = yaml.safe_load((tmp_path / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert _expand(args[args.index("--model") + 1]) == "/models/a$(HOME)b.gguf"
    assert "resolve_model('/models/a$(HOME)b.gguf')" in _expand(pod["initContainers"][0]["command"][2])
    assert "must exist inside the container" in (tmp_path / "deployment.yaml").read_text()


def _expand(text: str) -> str:
    """Kubernetes' $(VAR) expansion with no variables defined: `$$` -> `$`, `$(X)` kept."""
    return re.sub(r"\$\$", "$", text)


def test_cpu_quantities():
    assert [k8s._cpu(c) for c in (2.0, 1.5, 0.25, 0.0001, 16)] == ["2", "1500m", "250m", "1m", "16"]
