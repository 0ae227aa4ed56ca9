"""Build the synchronous engine a config asks for: paged for supported architectures, else transformers."""
from __future__ import annotations

import logging

from server.config import EngineConfig, pick_device, pick_dtype

log = logging.getLogger("berth.engine")


def build_engine(config: EngineConfig, folder: str):
    import transformers

    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    kind = config.engine
    if kind in ("auto", "paged"):
        arch = (transformers.AutoConfig.from_pretrained(folder, local_files_only=True).architectures or ["?"])[0]
        if _paged_supports(folder):
            kind = "paged"
        else:
            log.warning("architecture %s is not supported by the paged engine; using transformers", arch)
            kind = "transformers"
    if kind == "paged":
        from server.engine.engine import Engine

        return Engine.from_folder(folder, config, device, dtype)
    from server.engine.hf_engine import HFEngine

    if config.quantization != "none":
        log.warning("--quantization %s applies to the paged engine only; ignored", config.quantization)

    return HFEngine(folder, dtype, config.max_model_len, config.max_new_tokens)


def _paged_supports(folder: str) -> bool:
    try:
        from server.engine.engine import Engine  # noqa: F401
        from server.engine.models.llama import is_supported
    except ImportError:
        return False
    import transformers

    return is_supported(transformers.AutoConfig.from_pretrained(folder, local_files_only=True))
