"""Kubernetes manifests for a service: `berth deploy CONFIG --target kubernetes -o DIR` writes a kustomize
directory (`kubectl apply -k DIR`).

    render(config, Path("out"))   # -> the files written, kustomization.yaml first

kustomization.yaml lists deployment.yaml (`berth serve` pods), service.yaml (ClusterIP, port 8000 "http"),
secret.yaml (the token: it appears in no other object; the container reads it as `--token $(BERTH_TOKEN)`),
hpa.yaml (autoscaling/v2 on the pods' `vllm:num_requests_waiting`, a custom metric: needs an adapter such
as prometheus-adapter) and inferencepool.yaml (a Gateway API Inference Extension InferencePool,
inference.networking.k8s.io/v1, over the pods, with its endpoint picker at the Service `<name>-epp`).
Beside them: a Dockerfile (+ .dockerignore) building the image from the berth source, and a README.

The pods: an init container resolves the model into the cache volume ($BERTH_CACHE, an emptyDir unless
`cache_claim` names a PersistentVolumeClaim) and compiles the native kernels for the node; the model is
never in the image. Readiness is /ready, liveness /health (a startup probe covers a slow load), both open
without the token; /metrics is public (--metrics-public) for scrapers and the endpoint picker. Shutdown:
preStop sleeps PRESTOP_SECONDS while the pod is still ready (routes converge), then SIGTERM makes berth
drain for --drain-timeout; terminationGracePeriodSeconds covers both plus GRACE_MARGIN_SECONDS.
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import yaml

from server.deploy.config import MAX_REPLICAS, ServiceConfig

TEMPLATES = Path(__file__).parent / "k8s"
PORT = 8000
CACHE_DIR = "/var/cache/berth"
PRESTOP_SECONDS = 10
DEFAULT_DRAIN_TIMEOUT = 30.0        # berth serve --drain-timeout's default (server/cli.py)
GRACE_MARGIN_SECONDS = 15
RUN_AS = 10001                      # the image's user (k8s/Dockerfile)
EPP_PORT = 9002                     # an endpoint picker's ext-proc gRPC port (the project's default)
HPA_METRIC = "vllm:num_requests_waiting"
HPA_WAITING_PER_POD = 4             # average queued requests per pod above which the HPA adds pods
HPA_MAX_FACTOR = 4                  # maxReplicas = replicas x this (at most MAX_REPLICAS)
INFERENCE_API = "inference.networking.k8s.io/v1"
COMPONENT = "model-server"
FILES = ("kustomization.yaml", "deployment.yaml", "service.yaml", "secret.yaml", "hpa.yaml",
         "inferencepool.yaml")
# flags the manifests set themselves: a config's own value would duplicate or contradict them
MANAGED_KNOBS = {"metrics_public", "drain_timeout"}

FETCH_SCRIPT = """\
import logging
logging.basicConfig(level=logging.INFO, format="%(message)s")
from server.model_store import resolve_model
print("model ready:", resolve_model({model!r}), flush=True)
from kernels import native
native.load()  # compiled once per node CPU type into the cache; the PyTorch path serves without it
"""


def render(config: ServiceConfig, out_dir: Path, *, cache_claim: str | None = None) -> list[Path]:
    """Write the kustomize directory for `config` into `out_dir` (created if needed; berth's files in it
    are replaced, others left alone) and return the files written. `cache_claim`: an existing
    PersistentVolumeClaim to hold the model cache instead of an emptyDir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    documents = {
        "kustomization.yaml": kustomization(config),
        "deployment.yaml": deployment(config, cache_claim),
        "service.yaml": service(config),
        "secret.yaml": secret(config),
        "hpa.yaml": hpa(config),
        "inferencepool.yaml": inference_pool(config),
    }
    written = []
    for name, body in documents.items():
        written.append(_write(out_dir / name, _header(config, name) + _dump(body)))
    dockerfile = (TEMPLATES / "Dockerfile").read_text(encoding="utf-8").replace("@@IMAGE@@", config.image)
    ignore = (TEMPLATES / "dockerignore").read_text(encoding="utf-8")
    written.append(_write(out_dir / "Dockerfile", dockerfile))
    written.append(_write(out_dir / ".dockerignore", ignore))
    written.append(_write(out_dir / "Dockerfile.dockerignore", ignore))    # used by `docker build -f`
    written.append(_write(out_dir / "README.md", _readme(config)))
    return written


# ---- the objects

def pod_labels(config: ServiceConfig) -> dict:
    """The model-server pods' labels: the Deployment's, Service's and InferencePool's selector."""
    return {"app.kubernetes.io/name": config.name, "app.kubernetes.io/component": COMPONENT}


def secret_name(config: ServiceConfig) -> str:
    return f"{config.name}-token"


def drain_timeout(config: ServiceConfig) -> float:
    return float(config.knobs.get("drain_timeout", DEFAULT_DRAIN_TIMEOUT))


def grace_seconds(config: ServiceConfig) -> int:
    return PRESTOP_SECONDS + math.ceil(drain_timeout(config)) + GRACE_MARGIN_SECONDS


def max_replicas(config: ServiceConfig) -> int:
    return min(MAX_REPLICAS, config.resources.replicas * HPA_MAX_FACTOR)


def kustomization(config: ServiceConfig) -> dict:
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "labels": [{"pairs": {"app.kubernetes.io/name": config.name, "app.kubernetes.io/part-of": "berth"},
                    "includeSelectors": False, "includeTemplates": True}],
        "resources": list(FILES[1:]),
    }


def container_args(config: ServiceConfig) -> list[str]:
    """`berth serve`'s arguments (after the `berth` command): the secrets as $(VAR) references to env
    vars from the Secret, every other `$` escaped as `$$` (Kubernetes expands $(VAR) in args)."""
    own = replace(config, knobs={k: v for k, v in config.knobs.items() if k not in MANAGED_KNOBS})
    serve = own.serve_args(token=False)     # berth serve reads the token from $BERTH_TOKEN (the Secret)
    refs = {}
    if config.knowledge_db is not None:
        refs[serve.index("--knowledge-db") + 1] = "$(BERTH_KNOWLEDGE_DB)"
    return (["serve", "--host", "0.0.0.0", "--port", str(PORT), "--metrics-public",
             "--drain-timeout", _number(drain_timeout(config))]
            + [refs.get(i, arg.replace("$", "$$")) for i, arg in enumerate(serve)])


def deployment(config: ServiceConfig, cache_claim: str | None = None) -> dict:
    labels = pod_labels(config)
    resources = {"requests": _resources(config), "limits": _resources(config)}
    threads = {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}}   # whole cores, rounded up
    common_env = [{"name": "BERTH_CACHE", "value": CACHE_DIR}, {"name": "HOME", "value": "/tmp"}]
    mounts = [{"name": "model-cache", "mountPath": CACHE_DIR}, {"name": "tmp", "mountPath": "/tmp"}]
    security = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                "capabilities": {"drop": ["ALL"]}}
    env = [{"name": "BERTH_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": secret_name(config), "key": "token"}}}]
    if config.knowledge_db is not None:
        env.append({"name": "BERTH_KNOWLEDGE_DB",
                    "valueFrom": {"secretKeyRef": {"name": secret_name(config), "key": "knowledge-db"}}})
    env += common_env + [{"name": "OMP_NUM_THREADS", "valueFrom": threads}]
    probe = {"port": "http", "scheme": "HTTP"}
    cache = ({"persistentVolumeClaim": {"claimName": cache_claim}} if cache_claim else {"emptyDir": {}})
    pod = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": grace_seconds(config),
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "initContainers": [{
            "name": "fetch-model",
            "image": config.image,
            "imagePullPolicy": "IfNotPresent",
            "command": ["python", "-c", FETCH_SCRIPT.format(model=config.model).replace("$", "$$")],
            "env": common_env + [{"name": "MAX_JOBS", "valueFrom": threads}],
            "resources": resources,
            "securityContext": security,
            "volumeMounts": mounts,
        }],
        "containers": [{
            "name": "berth",
            "image": config.image,
            "imagePullPolicy": "IfNotPresent",
            "command": ["berth"],
            "args": container_args(config),
            "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
            "env": env,
            "resources": resources,
            # startup: the model loads (liveness waits for it); then /health every 10 s, 3 misses restart
            "startupProbe": {"httpGet": {"path": "/health", **probe}, "periodSeconds": 5, "timeoutSeconds": 5,
                             "failureThreshold": 120},
            "livenessProbe": {"httpGet": {"path": "/health", **probe}, "periodSeconds": 10, "timeoutSeconds": 5,
                              "failureThreshold": 3},
            # ready: loaded and not draining; out of the endpoints after 2 misses
            "readinessProbe": {"httpGet": {"path": "/ready", **probe}, "periodSeconds": 5, "timeoutSeconds": 3,
                               "successThreshold": 1, "failureThreshold": 2},
            "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SECONDS)]}}},
            "securityContext": security,
            "volumeMounts": mounts,
        }],
        "volumes": [{"name": "model-cache", **cache}, {"name": "tmp", "emptyDir": {}}],
    }
    if config.resources.replicas > 1:
        pod["topologySpreadConstraints"] = [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                             "whenUnsatisfiable": "ScheduleAnyway",
                                             "labelSelector": {"matchLabels": labels}}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": config.name, "labels": dict(labels)},
        "spec": {
            "replicas": config.resources.replicas,
            "selector": {"matchLabels": dict(labels)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": dict(labels),
                             "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(PORT),
                                             "prometheus.io/path": "/metrics"}},
                "spec": pod,
            },
        },
    }


def service(config: ServiceConfig) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": config.name, "labels": pod_labels(config)},
        "spec": {"type": "ClusterIP", "selector": pod_labels(config),
                 "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}]},
    }


def secret(config: ServiceConfig) -> dict:
    data = {"token": config.token}
    if config.knowledge_db is not None:
        data["knowledge-db"] = config.knowledge_db
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": secret_name(config), "labels": {"app.kubernetes.io/name": config.name}},
        "type": "Opaque",
        "stringData": data,
    }


def hpa(config: ServiceConfig) -> dict:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": config.name, "labels": {"app.kubernetes.io/name": config.name}},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": config.name},
            "minReplicas": config.resources.replicas,
            "maxReplicas": max_replicas(config),
            "metrics": [{"type": "Pods", "pods": {
                "metric": {"name": HPA_METRIC},
                "target": {"type": "AverageValue", "averageValue": str(HPA_WAITING_PER_POD)}}}],
            # a new pod takes a while to load its model: add at most 2 a minute, remove 1 per 2 minutes
            "behavior": {
                "scaleUp": {"stabilizationWindowSeconds": 60,
                            "policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}]},
                "scaleDown": {"stabilizationWindowSeconds": 300,
                              "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}]},
            },
        },
    }


def inference_pool(config: ServiceConfig) -> dict:
    return {
        "apiVersion": INFERENCE_API,
        "kind": "InferencePool",
        "metadata": {"name": config.name, "labels": {"app.kubernetes.io/name": config.name}},
        "spec": {
            "selector": {"matchLabels": pod_labels(config)},
            "targetPorts": [{"number": PORT}],
            "endpointPickerRef": {"name": f"{config.name}-epp", "port": {"number": EPP_PORT},
                                  "failureMode": "FailOpen"},
        },
    }


# ---- writing

_HEADERS = {
    "deployment.yaml": "# `berth serve` pods. The token comes from the Secret (env BERTH_TOKEN); the model is fetched "
                       "into the\n# cache volume by the init container at start, never baked into the image.\n",
    "secret.yaml": "# The API token. Keep this file private (do not commit it): it is the service's only "
                   "credential.\n",
    "hpa.yaml": f"# Scales on {HPA_METRIC}, a custom Pods metric: it needs Prometheus scraping the pods and an "
                "adapter\n# serving custom.metrics.k8s.io (prometheus-adapter). See README.md.\n",
    "inferencepool.yaml": "# Gateway API Inference Extension (CRDs required). An endpoint picker must run behind "
                          "the Service\n# named in endpointPickerRef; route to the pool with an HTTPRoute backendRef. "
                          "See README.md.\n",
}


def _header(config: ServiceConfig, name: str) -> str:
    text = f"# Written by `berth deploy --target kubernetes` for the service {config.name!r}.\n"
    text += _HEADERS.get(name, "")
    if name == "deployment.yaml":
        paths = [("model", config.model)] if config.model != "default" else []
        paths += [("knowledge", config.knowledge)] if config.knowledge is not None else []
        for field_name, path in paths:
            text += f"# {field_name} {path!r} must exist inside the container: mount it (e.g. a PVC) at that path.\n"
    return text


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:      # shared dicts are written out, not as &anchors
        return True


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _dump(body: dict) -> str:
    return yaml.dump(body, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True,
                     width=120)


def _write(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def _readme(config: ServiceConfig) -> str:
    values = {"NAME": config.name, "MODEL": config.model, "IMAGE": config.image,
              "REPLICAS": str(config.resources.replicas), "CPU": _cpu(config.resources.cpu),
              "MEMORY": config.resources.memory, "PRESTOP": str(PRESTOP_SECONDS),
              "DRAIN": _number(drain_timeout(config)), "GRACE": str(grace_seconds(config)),
              "MIN": str(config.resources.replicas), "MAX": str(max_replicas(config)),
              "WAITING": str(HPA_WAITING_PER_POD)}
    text = (TEMPLATES / "README.md").read_text(encoding="utf-8")
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    return text


def _resources(config: ServiceConfig) -> dict:
    return {"cpu": _cpu(config.resources.cpu), "memory": config.resources.memory}


def _cpu(cores: float) -> str:
    """A Kubernetes CPU quantity: "2" or "1500m" (millicores, the finest it takes)."""
    milli = max(1, round(cores * 1000))
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
