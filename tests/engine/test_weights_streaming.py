"""HF folders loaded tensor by tensor (server/engine/models/weights.py): each parameter is materialised when
its tensors are read, in the checkpoint's own dtype on the CPU, and quantized as soon as it is complete."""
import pytest
import torch
import transformers

from server.engine.models.weights import build_model, weight_bytes
from tests.engine.test_models import PROMPT, TINY, hf_logits, new_caches, run_chunk


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**TINY, "hidden_size": 64, "intermediate_size": 128})
    hf_model = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("bf16")
    hf_model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    reference = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return reference, str(folder)


def test_bf16_folder_keeps_bf16_weights_and_fp32_norms(bf16_checkpoint):
    reference, folder = bf16_checkpoint
    model = build_model(folder, torch.float32, "cpu", keep_stored_dtype=True)
    layer = model.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.dtype == torch.bfloat16
    assert layer.mlp.down_proj.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert layer.input_layernorm.weight.dtype == torch.float32
    fp32 = build_model(folder, torch.float32, "cpu")
    assert weight_bytes(model) < 0.6 * weight_bytes(fp32)
    # bf16 products round the activations to bf16 as well: within 2% of the logit range of the fp32 run
    ref = hf_logits(reference, PROMPT)
    logits = run_chunk(model, new_caches(model), PROMPT, 0, [5, 2, 9, 0])
    assert logits.dtype == torch.float32
    assert float((logits - ref).abs().max()) <= 0.02 * float(ref.max() - ref.min())
    torch.testing.assert_close(run_chunk(fp32, new_caches(fp32), PROMPT, 0, [5, 2, 9, 0]), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_while_loading_equals_quantized_after(bf16_checkpoint, method):
    _, folder = bf16_checkpoint
    streamed = build_model(folder, torch.float32, "cpu", quantization=method, keep_stored_dtype=True)
    after = build_model(folder, torch.float32, "cpu", keep_stored_dtype=True)
    after.quantize(method, keep_float=False)
    for a, b in zip(streamed.model.layers, after.model.layers):
        lin_a, lin_b = a.mlp.gate_up_proj, b.mlp.gate_up_proj
        assert lin_a.weight.numel() == 0                     # no float copy left behind
        qa, qb = (lin_a.int4, lin_b.int4) if method == "int4" else (lin_a.int8, lin_b.int8)
        assert qa is not None
        for field in ("q4_packed", "q4_scale_min", "qweight", "scales"):
            if getattr(qa, field, None) is not None:
                assert torch.equal(getattr(qa, field), getattr(qb, field))
    assert weight_bytes(streamed) < weight_bytes(build_model(folder, torch.float32, "cpu", keep_stored_dtype=True))
    logits = run_chunk(streamed, new_caches(streamed), PROMPT, 0, [5, 2, 9, 0])
    torch.testing.assert_close(logits, run_chunk(after, new_caches(after), PROMPT, 0, [5, 2, 9, 0]))
