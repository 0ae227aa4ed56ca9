"""Service configs: a small JSON or YAML file in the spirit of an EAS service JSON.

    {"name": "qwen-chat", "model": "default", "deployment": "accelerated",
     "resources": {"cpu": 2, "memory": "8Gi", "replicas": 1}}

Fields: name (a DNS label: lower-case letters, digits and "-", at most 63, as Kubernetes needs), model
(what `berth serve --model` takes), deployment ("accelerated" = the paged engine, with "vllm", "sglang"
and "bladellm" accepted as its aliases; "standard" = the transformers engine), resources (cpu: cores >
0; memory: a Kubernetes quantity such as "8Gi" or "512Mi"; replicas: 1-64), token (32+ random bytes
generated when absent), port (the service's port on this machine; default: a free one), knowledge (a
directory indexed at start) and knowledge_db, image (the container image for Kubernetes), and any knob of
`berth serve` under its flag name with "_" (max_model_len, max_num_seqs, quantization, kv_cache_gib...).
Every error is a ConfigError whose message names the field.
"""
from __future__ import annotations

import argparse
import json
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DEPLOYMENTS = {"accelerated": "accelerated", "vllm": "accelerated", "sglang": "accelerated",
               "bladellm": "accelerated", "standard": "standard", "transformers": "standard"}
MEMORY_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|K|M|G|T)?$")
MEMORY_UNITS = {None: 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
MAX_REPLICAS = 64
MIN_TOKEN_CHARS = 32
# berth serve flags a config may not set: the service decides them
RESERVED_KNOBS = {"model", "engine", "host", "port", "token", "knowledge", "knowledge_db", "log_level"}
TOP_LEVEL = {"name", "model", "deployment", "resources", "token", "port", "knowledge", "knowledge_db", "image"}
DEFAULT_IMAGE = "berth:latest"


class ConfigError(ValueError):
    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True, slots=True)
class Resources:
    cpu: float = 2.0
    memory: str = "8Gi"
    replicas: int = 1

    @property
    def memory_bytes(self) -> int:
        number, unit = MEMORY_RE.match(self.memory).groups()
        return int(float(number) * MEMORY_UNITS[unit])


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    name: str
    model: str = "default"
    deployment: str = "accelerated"
    resources: Resources = field(default_factory=Resources)
    token: str = ""
    token_generated: bool = False
    port: int | None = None
    knowledge: str | None = None
    knowledge_db: str | None = None
    image: str = DEFAULT_IMAGE
    knobs: dict = field(default_factory=dict)      # berth serve flag dest -> value

    @property
    def engine(self) -> str:
        return "paged" if self.deployment == "accelerated" else "transformers"

    def serve_args(self, token: bool = True) -> list[str]:
        """`berth serve` arguments for one replica (without --host / --port). token=False: the token is
        left out (pass it as $BERTH_TOKEN, so it never shows in the process list)."""
        args = ["--model", self.model, "--engine", self.engine] + (["--token", self.token] if token else [])
        if self.knowledge is not None:
            args += ["--knowledge", self.knowledge]
        if self.knowledge_db is not None:
            args += ["--knowledge-db", self.knowledge_db]
        for dest, value in self.knobs.items():
            flag = "--" + dest.replace("_", "-")
            if value is True:
                args.append(flag)
            elif value is not False:
                args += [flag, str(value)]
        return args

    def to_dict(self) -> dict:
        """The config as a file would hold it (the token included: keep the file private)."""
        body = {"name": self.name, "model": self.model, "deployment": self.deployment,
                "resources": {"cpu": self.resources.cpu, "memory": self.resources.memory,
                              "replicas": self.resources.replicas},
                "token": self.token, "image": self.image}
        for key in ("port", "knowledge", "knowledge_db"):
            if getattr(self, key) is not None:
                body[key] = getattr(self, key)
        return body | self.knobs


def load_config(path: str | Path) -> ServiceConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_config(_decode(text, path.suffix.lower()))


def _decode(text: str, suffix: str) -> object:
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError("config", f"not valid YAML: {str(exc).splitlines()[0]}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError("config", f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


def parse_config(obj: object) -> ServiceConfig:
    if not isinstance(obj, dict):
        raise ConfigError("config", "must be an object")
    name = obj.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError("name", "is required: 1-63 lower-case letters, digits or '-', starting and ending "
                                  "with a letter or digit")
    model = _str(obj, "model", "default")
    deployment = _str(obj, "deployment", "accelerated").lower()
    if deployment not in DEPLOYMENTS:
        raise ConfigError("deployment", f"must be one of {', '.join(DEPLOYMENTS)}")
    token = obj.get("token")
    generated = token is None
    if generated:
        token = secrets.token_urlsafe(32)          # 32 random bytes
    elif not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ConfigError("token", f"must be a string of at least {MIN_TOKEN_CHARS} characters without spaces "
                                   "(leave it out to have one generated)")
    port = obj.get("port")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535):
        raise ConfigError("port", "must be an integer in 1-65535")
    knobs = _knobs({k: v for k, v in obj.items() if k not in TOP_LEVEL})
    return ServiceConfig(name=name, model=model, deployment=DEPLOYMENTS[deployment],
                         resources=_resources(obj.get("resources")), token=token, token_generated=generated,
                         port=port, knowledge=_optional_str(obj, "knowledge"),
                         knowledge_db=_optional_str(obj, "knowledge_db"), image=_str(obj, "image", DEFAULT_IMAGE),
                         knobs=knobs)


def _str(obj: dict, key: str, default: str) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, "must be a non-empty string")
    return value


def _optional_str(obj: dict, key: str) -> str | None:
    return None if obj.get(key) is None else _str(obj, key, "")


def _resources(value: object) -> Resources:
    if value is None:
        return Resources()
    if not isinstance(value, dict):
        raise ConfigError("resources", "must be an object with cpu, memory and replicas")
    unknown = set(value) - {"cpu", "memory", "replicas"}
    if unknown:
        raise ConfigError(f"resources.{sorted(unknown)[0]}", "is not a resource berth knows (cpu, memory, replicas)")
    cpu = value.get("cpu", 2)
    if isinstance(cpu, str):
        cpu = _cpu_quantity(cpu)
    if isinstance(cpu, bool) or not isinstance(cpu, (int, float)) or not 0 < cpu <= 1024:
        raise ConfigError("resources.cpu", "must be a number of cores > 0 (e.g. 2 or \"500m\")")
    memory = value.get("memory", "8Gi")
    if isinstance(memory, int) and not isinstance(memory, bool):
        memory = str(memory)
    if not isinstance(memory, str) or not MEMORY_RE.match(memory) or float(MEMORY_RE.match(memory).group(1)) <= 0:
        raise ConfigError("resources.memory", 'must be a quantity such as "8Gi", "512Mi" or "16G"')
    replicas = value.get("replicas", 1)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= MAX_REPLICAS:
        raise ConfigError("resources.replicas", f"must be an integer in 1-{MAX_REPLICAS}")
    return Resources(float(cpu), memory, replicas)


def _cpu_quantity(text: str) -> float:
    try:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        raise ConfigError("resources.cpu", "must be a number of cores > 0 (e.g. 2 or \"500m\")") from None


def _knobs(extra: dict) -> dict:
    """Other keys must be berth serve flags (dest names); values are checked by berth serve's own parser."""
    parser = _serve_parser()
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help",)}
    argv = []
    for key, value in extra.items():
        if key in RESERVED_KNOBS or key not in actions:
            raise ConfigError(key, "is not a field of a service config nor a berth serve option")
        action = actions[key]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise ConfigError(key, "must be true or false")
            argv += [action.option_strings[0]] if value else []
        elif isinstance(value, (dict, list, bool)) or value is None:
            raise ConfigError(key, "must be a number or a string")
        else:
            argv += [action.option_strings[0], str(value)]
    try:
        parser.parse_args(argv)
    except _ParseError as exc:
        raise ConfigError(_blamed(str(exc), extra), str(exc)) from None
    return dict(extra)


class _ParseError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise _ParseError(message)


def _serve_parser() -> argparse.ArgumentParser:
    from server.cli import serve_parser

    root = _Parser(prog="berth", add_help=False)
    sub = root.add_subparsers(dest="command", parser_class=_Parser)
    serve_parser(sub)
    return sub.choices["serve"]


def _blamed(message: str, extra: dict) -> str:
    for key in extra:
        if "--" + key.replace("_", "-") in message:
            return key
    return next(iter(extra), "config")
