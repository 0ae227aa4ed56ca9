"""Service configs: the issue's example as written, YAML, defaults, and errors that name the field."""
from __future__ import annotations

import json

import pytest

from server.deploy.config import ConfigError, load_config, parse_config

EXAMPLE = {"name": "qwen-chat", "model": "default", "deployment": "accelerated",
           "resources": {"cpu": 2, "memory": "8Gi", "replicas": 1}}


def test_the_issue_example_parses_as_written(tmp_path):
    path = tmp_path / "svc.json"
    path.write_text(json.dumps(EXAMPLE))
    cfg = load_config(path)
    assert (cfg.name, cfg.model, cfg.engine, cfg.resources.replicas) == ("qwen-chat", "default", "paged", 1)
    assert cfg.resources.memory_bytes == 8 * 2**30 and cfg.resources.cpu == 2.0
    assert cfg.token_generated and len(cfg.token) >= 43          # 32 random bytes, url-safe base64
    assert cfg.serve_args()[:6] == ["--model", "default", "--engine", "paged", "--token", cfg.token]
    assert load_config(path).token != cfg.token                   # a fresh token per parse


def test_yaml_aliases_and_knobs(tmp_path):
    path = tmp_path / "svc.yaml"
    path.write_text("name: chat\ndeployment: vLLM\nresources: {cpu: 500m, memory: 512Mi, replicas: 3}\n"
                    "max_model_len: 2048\nno_prefix_caching: true\ntoken: " + "t" * 40 + "\n")
    cfg = load_config(path)
    assert cfg.deployment == "accelerated" and cfg.resources.cpu == 0.5 and cfg.resources.replicas == 3
    assert not cfg.token_generated
    args = cfg.serve_args()
    assert args[args.index("--max-model-len") + 1] == "2048" and "--no-prefix-caching" in args
    assert parse_config({"name": "std", "deployment": "standard"}).engine == "transformers"


@pytest.mark.parametrize("body, field", [
    ([], "config"),
    ({}, "name"),
    ({"name": "Qwen_Chat"}, "name"),
    ({"name": "a" * 64}, "name"),
    ({"name": "q", "deployment": "turbo"}, "deployment"),
    ({"name": "q", "resources": {"cpu": 0}}, "resources.cpu"),
    ({"name": "q", "resources": {"memory": "8 GB"}}, "resources.memory"),
    ({"name": "q", "resources": {"replicas": 0}}, "resources.replicas"),
    ({"name": "q", "resources": {"gpus": 1}}, "resources.gpus"),
    ({"name": "q", "token": "short"}, "token"),
    ({"name": "q", "port": 70000}, "port"),
    ({"name": "q", "max_model_len": "long"}, "max_model_len"),
    ({"name": "q", "quantization": "int3"}, "quantization"),
    ({"name": "q", "host": "0.0.0.0"}, "host"),
    ({"name": "q", "colour": "blue"}, "colour"),
])
def test_errors_name_the_field(body, field):
    with pytest.raises(ConfigError) as info:
        parse_config(body)
    assert info.value.field == field and str(info.value).startswith(field + ":")


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "q",')
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)


def test_deploy_target_kubernetes_from_the_cli(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    config = tmp_path / "svc.json"
    config.write_text(json.dumps(EXAMPLE))
    out = tmp_path / "k8s"
    proc = subprocess.run([sys.executable, "-m", "server.cli", "deploy", str(config), "--target", "kubernetes",
                           "-o", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (out / "kustomization.yaml").is_file() and (out / "Dockerfile").is_file()
    token = next(line.split()[1] for line in proc.stdout.splitlines() if line.strip().startswith("token:"))
    assert token in (out / "secret.yaml").read_text()
    assert token not in (out / "deployment.yaml").read_text()
    proc = subprocess.run([sys.executable, "-m", "server.cli", "deploy", str(config), "--target", "kubernetes"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("berth: error: output:")
