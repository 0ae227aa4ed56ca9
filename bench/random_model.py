"""Random-weight model folders built where they run: a model's shape, random weights, a stand-in tokenizer.

Speed depends on a model's shape, not its weights (bench/synth_gguf.py makes the same point for GGUF files),
so the GPU bench (bench/gpu.sh) measures SmolLM2-135M's shape without carrying its 98 MB file, and the GPU
tests build tiny Llama/Qwen2 models the same way. Nothing is downloaded:

    write_random_model(folder, SMOLLM2_135M)           # config.json, model.safetensors, tokenizer files
    python -m bench.random_model OUT [--tiny] [--dtype bfloat16]

The tokenizer is a word-level one with one token per id (<t0> .. <tN-1>; <t1> BOS, <t2> EOS) unless
`tokenizer_from` names a folder whose tokenizer files to copy (the real one, where it is at hand).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

SMOLLM2_135M = dict(   # ~/.cache/berth/models/SmolLM2-135M-Instruct/config.json, the fields that shape it
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576, intermediate_size=1536,
    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, vocab_size=49152, bos_token_id=1,
    eos_token_id=2, pad_token_id=2)
TINY_LLAMA = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=128, intermediate_size=256,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    rms_norm_eps=1e-5, rope_theta=10000.0, vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=2)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def write_random_model(folder: str | Path, config: dict, dtype: str = "bfloat16", seed: int = 0,
                       tokenizer_from: str | Path | None = None) -> Path:
    """An HF folder with `config`'s architecture and random weights (transformers' own initialisation,
    norms and biases perturbed so that every weight matters), stored in `dtype`."""
    import torch
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fields = dict(config)
    hf_config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.to(getattr(torch, dtype)).save_pretrained(folder, safe_serialization=True)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_from) / name).is_file():
                shutil.copy(Path(tokenizer_from) / name, folder / name)
    else:
        write_tokenizer(folder, config["vocab_size"])
    return folder


def write_tokenizer(folder: str | Path, vocab_size: int) -> None:
    """A word-level tokenizer with one token per id, so that every id the model can sample decodes."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"<t{i}>": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<t0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<t0>", bos_token="<t1>",
                                                eos_token="<t2>", pad_token="<t2>")
    fast.save_pretrained(str(folder))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.random_model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer Llama instead of SmolLM2-135M's shape")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokenizer-from", default=None, help="copy this folder's tokenizer files")
    args = ap.parse_args(argv)
    folder = write_random_model(args.out, TINY_LLAMA if args.tiny else SMOLLM2_135M, args.dtype,
                                tokenizer_from=args.tokenizer_from)
    print(json.dumps({"folder": str(folder), "files": sorted(p.name for p in folder.iterdir())}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
