"""The C++ model step (kernels/native.py) against the PyTorch path on tiny random checkpoints.

The PyTorch path is itself checked against transformers (tests/engine/test_models.py); these tests
pin the extension to it: same hidden states and the same KV cache after a decode step, a prefill step
and a mixed step, for every supported architecture, batched rows with different context lengths,
float and quantized weights. CI builds the extension (`python -m kernels.native`), so a missing
extension fails here, not skips.
"""
import itertools

import pytest
import torch

from kernels import native
from kernels.metadata import build_metadata
from tests.engine.test_models import BLOCK_SIZE, PROMPT, checkpoint, new_caches, run_chunk  # noqa: F401

TABLES = [[1, 4, 6, 8], [2, 10, 12, 14], [3, 5, 7, 9]]
LENGTHS = [9, 13, 4]   # context lengths after the step: 3, 4 and 1 blocks
OFFSETS = [3, 0, 6]    # each sequence is PROMPT[offset:offset + length]
# tokens each sequence computes in the step, by kind of step: the rest of its context is cached first
NEW_TOKENS = {"decode": [1, 1, 1], "prefill": [9, 6, 4], "mixed": [1, 5, 4]}


def model_step(model, caches, use_native: bool, kind: str = "decode"):
    """Cache each sequence's first tokens (PyTorch path), then one step over the rest of all three
    together: one new token each (decode), whole prompts and chunks over a cached prefix (prefill), or
    decode rows before prefill rows (mixed, the scheduler's order)."""
    model.native_step = False
    new = NEW_TOKENS[kind]
    for table, n, i, q in zip(TABLES, LENGTHS, OFFSETS, new):
        if n > q:
            run_chunk(model, caches, PROMPT[i:i + n - q], 0, table)
    model.native_step = use_native
    ids, positions, slots = [], [], []
    for table, n, i, q in zip(TABLES, LENGTHS, OFFSETS, new):
        ids += PROMPT[i + n - q:i + n]
        positions += range(n - q, n)
        slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(n - q, n)]
    meta = build_metadata(new, LENGTHS, TABLES, slots, BLOCK_SIZE, "cpu")
    return model(torch.tensor(ids), torch.tensor(positions), caches, meta)


def decode_step(model, caches, use_native: bool):
    return model_step(model, caches, use_native, "decode")


@pytest.fixture(scope="module", autouse=True)
def extension():
    if not native.enabled():
        pytest.skip("BERTH_NATIVE=0")
    module = native.load()
    assert module is not None, "the native decode extension did not build (see the log line)"
    return module


@pytest.mark.parametrize("kind", ["decode", "prefill", "mixed"])
@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
def test_native_step_matches_pytorch_path(checkpoint, quantization, kind):  # noqa: F811
    _, folder, _ = checkpoint
    from server.engine.models.weights import build_model
    model = build_model(folder, torch.float32, "cpu")
    if quantization != "none":
        model.quantize(quantization)
    ref_caches, nat_caches = new_caches(model), new_caches(model)
    expected = model_step(model, ref_caches, use_native=False, kind=kind)
    got = model_step(model, nat_caches, use_native=True, kind=kind)
    assert model._native is not None, "the step did not take the native path"
    # int4: the step runs as one OpenMP team, unless a product other than q/k/v has a bias (InternLM3's o_proj and MLP)
    assert model._native.team == (quantization == "int4" and not _has_output_bias(model))
    assert got.shape == expected.shape == (sum(NEW_TOKENS[kind]), model.config.hidden_size)
    if quantization == "none":
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
        for (k_ref, v_ref), (k_nat, v_nat) in zip(ref_caches, nat_caches):
            torch.testing.assert_close(k_nat, k_ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v_nat, v_ref, atol=1e-5, rtol=1e-5)
    elif quantization == "int8":
        # torch's int8 kernel rounds activations to bf16: an fp32 difference of one ulp can move a
        # rounding by 2^-8 (seen on Mistral's prefill), so the bound is bf16's, not fp32's
        torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-2)
        assert torch.nn.functional.cosine_similarity(got, expected, dim=1).min() > 0.9999
    else:  # the native int4 kernel also rounds the activations to int8 per group of 32 (q4_linear below)
        assert torch.nn.functional.cosine_similarity(got, expected, dim=1).min() > 0.999
        for (k_ref, _), (k_nat, _) in zip(ref_caches, nat_caches):
            assert torch.nn.functional.cosine_similarity(k_nat.flatten(), k_ref.flatten(), dim=0) > 0.999


def _has_output_bias(model) -> bool:
    layer = model.model.layers[0]
    return any(m.bias is not None for m in (layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj))


def test_team_step_is_independent_of_the_thread_count(checkpoint):  # noqa: F811
    """The int4 team step splits every phase across its threads; each output element is computed by
    one thread in the same order whatever the split, so 1, 2 or 3 threads give identical results."""
    _, folder, _ = checkpoint
    from server.engine.models.weights import build_model
    model = build_model(folder, torch.float32, "cpu")
    if _has_output_bias(model):
        pytest.skip("biases on o_proj / the MLP: the step runs per op, not as a team")
    model.quantize("int4")
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            caches = new_caches(model)
            results.append((model_step(model, caches, use_native=True, kind="mixed"), caches))
    finally:
        torch.set_num_threads(threads)
    assert model._native.team
    for got, caches in results[1:]:
        assert torch.equal(got, results[0][0])
        assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(caches, results[0][1]))


def test_native_prefill_attention_is_balanced_and_causal(checkpoint):  # noqa: F811
    """A prompt long enough for the pair-split attention (>= 64 query heads): each token sees exactly
    its prefix, as in the PyTorch path, for every token of a 40-token prompt over 10 blocks."""
    _, _, model = checkpoint
    prompt = (PROMPT * 4)[:40]
    table = [20, 3, 17, 8, 11, 1, 29, 5, 14, 26]
    model.native_step = False
    expected = run_chunk(model, new_caches(model), prompt, 0, table)
    model.native_step, model._native = True, None
    got = run_chunk(model, new_caches(model), prompt, 0, table)
    assert model._native is not None
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the kernels round it: int8 per group of 32 with scale max|x| / 127."""
    groups = x.view(x.shape[0], -1, 32)
    scale = groups.abs().amax(dim=-1, keepdim=True) / 127
    return (torch.round(groups / torch.where(scale > 0, scale, 1)) * scale).view_as(x)


def unpack_q4(packed: torch.Tensor, scale_min: torch.Tensor) -> torch.Tensor:
    """(N, K) float weight from q4_linear's layout, element by element as its comment describes it."""
    blocks, groups = packed.shape[:2]
    w = torch.empty(blocks * 8, groups * 32)
    codes, scales = packed.tolist(), scale_min.float().tolist()
    for b, g, v, i, e in itertools.product(range(blocks), range(groups), range(4), range(8), range(4)):
        byte = codes[b][g][v][4 * i + e]
        scale, low = scales[b][g][0][i], scales[b][g][1][i]
        w[8 * b + i, 32 * g + 4 * v + e] = (byte & 15) * scale + low
        w[8 * b + i, 32 * g + 16 + 4 * v + e] = (byte >> 4) * scale + low
    return w


def unpack_q8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(N, K) float weight from q8_linear's layout, element by element as its comment describes it."""
    blocks, groups = qweight.shape[:2]
    w = torch.empty(blocks * 8, groups * 32)
    codes, scale = qweight.tolist(), scales.float().tolist()
    for b, g, v, i, e in itertools.product(range(blocks), range(groups), range(8), range(8), range(4)):
        w[8 * b + i, 32 * g + 4 * v + e] = codes[b][g][v][4 * i + e] * scale[b][g][i]
    return w


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 19])
def test_q4_and_q8_kernels_match_the_dequantized_product(extension, rows):
    """The int4 / int8 kernels equal (rounded activations) @ (dequantized weight)^T, for every tile size (4
    activation rows per pass; on AVX-512 VNNI from 8 rows on, 8 rows per pass over a pair of 8-row weight
    blocks) and remainders (rows; an odd block count, whose last block the pair kernels leave to the others)."""
    from kernels.quant import quantize_int4, quantize_q8
    torch.manual_seed(rows)
    weight, x = torch.randn(96, 192) * 0.05, torch.randn(rows, 192)
    x[0, :32] = 0  # an all-zero group
    xq = quantized_activations(x)
    q4 = quantize_int4(weight)
    w4 = unpack_q4(q4.q4_packed, q4.q4_scale_min)
    torch.testing.assert_close(extension.q4_linear(x, q4.q4_packed, q4.q4_scale_min), xq @ w4.t(),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(extension.q4_linear(x, q4.q4_packed[:11], q4.q4_scale_min[:11]), xq @ w4[:88].t(),
                               atol=1e-4, rtol=1e-4)
    assert (w4 - weight).abs().max() < 0.05 * 2 * 4.5 / 15  # half a step of the widest group range
    q8 = quantize_q8(weight[:85])  # 85 rows: padded to 11 blocks of 8
    w8 = unpack_q8(q8.qweight, q8.scales)
    assert q8.out_features == 85 and w8[85:].abs().max() == 0
    torch.testing.assert_close(extension.q8_linear(x, q8.qweight, q8.scales), xq @ w8.t(), atol=1e-4, rtol=1e-4)
    assert (w8[:85] - weight[:85]).abs().max() <= q8.scales.float().max() / 2 + 1e-6


def test_q4_and_q8_kernels_refuse_bad_input(extension):
    from kernels.quant import quantize_int4, quantize_q8
    q4, q8 = quantize_int4(torch.randn(32, 128)), quantize_q8(torch.randn(32, 128))
    with pytest.raises(RuntimeError, match="shapes"):
        extension.q4_linear(torch.randn(2, 64), q4.q4_packed, q4.q4_scale_min)
    with pytest.raises(RuntimeError, match="fp32"):
        extension.q8_linear(torch.randn(2, 128).double(), q8.qweight, q8.scales)
    with pytest.raises(RuntimeError, match="bad weight"):
        extension.q8_linear(torch.randn(2, 128), q8.qweight.float(), q8.scales)


def test_native_step_is_used_for_fp32_only(checkpoint):  # noqa: F811
    """An fp32 prefill builds the native model; a bf16 model keeps the PyTorch path."""
    _, folder, model = checkpoint
    model.native_step, model._native = True, None
    run_chunk(model, new_caches(model), PROMPT[:5], 0, [1, 2])
    assert model._native is not None
    from server.engine.models.weights import build_model
    bf16 = build_model(folder, torch.bfloat16, "cpu")
    caches = [(k.bfloat16(), v.bfloat16()) for k, v in new_caches(bf16)]
    run_chunk(bf16, caches, PROMPT[:5], 0, [1, 2])
    run_chunk(bf16, caches, PROMPT[5:6], 5, [1, 2])
    assert getattr(bf16, "_native", None) is None


def test_native_step_checks_its_inputs(checkpoint, extension):  # noqa: F811
    """Bad shapes, dtypes or indices raise instead of reading or writing outside a tensor."""
    _, _, model = checkpoint
    model.native_step, model._native = True, None
    decode_step(model, new_caches(model), use_native=True)
    step, caches = model._native, new_caches(model)
    x = torch.zeros(1, model.config.hidden_size)
    cos_sin = model.model.rotary_emb.cos_sin_cache
    table, rows = torch.tensor([[0]], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    pos = torch.tensor([0])
    with pytest.raises(RuntimeError, match="int32"):
        step.forward(x, pos, cos_sin, cos_sin, caches, table.long(), rows, 16)
    with pytest.raises(RuntimeError, match="fp32"):
        step.forward(x.double(), pos, cos_sin, cos_sin, caches, table, rows, 16)
    with pytest.raises(RuntimeError, match="per layer"):
        step.forward(x, pos, cos_sin, cos_sin, caches[:1], table, rows, 16)
    with pytest.raises(RuntimeError, match="one position and row per token"):
        step.forward(x, torch.tensor([0, 1]), cos_sin, cos_sin, caches, table, rows, 16)
    with pytest.raises(RuntimeError, match="token_rows out of range"):
        step.forward(x, pos, cos_sin, cos_sin, caches, table, torch.tensor([1], dtype=torch.int32), 16)
    with pytest.raises(RuntimeError, match="outside the block table"):
        step.forward(x, torch.tensor([BLOCK_SIZE]), cos_sin, cos_sin, caches, table, rows, 16)
    with pytest.raises(RuntimeError, match="outside the KV cache"):
        step.forward(x, pos, cos_sin, cos_sin, caches, torch.tensor([[len(caches[0][0])]], dtype=torch.int32), rows, 16)
    with pytest.raises(RuntimeError, match="cos_sin_local"):
        step.forward(x, pos, cos_sin, cos_sin[:1], caches, table, rows, 16)
    with pytest.raises(RuntimeError, match="KV caches"):
        step.forward(x, pos, cos_sin, cos_sin, [(k.double(), v.double()) for k, v in caches], table, rows, 16)
    layers = len(caches)
    with pytest.raises(RuntimeError, match="layers, S, max_blocks"):   # one table per layer, but too few of them
        step.forward(x, pos, cos_sin, cos_sin, caches, table.expand(layers + 1, 1, 1).contiguous(), rows, 16)
    bad_last = torch.zeros(layers, 1, 1, dtype=torch.int32)
    bad_last[-1] = len(caches[0][0])   # only the last layer's table points outside the cache
    with pytest.raises(RuntimeError, match="outside the KV cache"):
        step.forward(x, pos, cos_sin, cos_sin, caches, bad_last, rows, 16)
    assert step.forward(x, pos, cos_sin, cos_sin, caches, table, rows, 16).shape == x.shape
    assert step.forward(x, pos, cos_sin, cos_sin, caches, table.expand(layers, 1, 1).contiguous(), rows, 16).shape == x.shape


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("BERTH_NATIVE", "0")
    monkeypatch.setattr(native, "_module", native._UNTRIED)
    assert native.load() is None


def test_build_directory_is_per_cpu(monkeypatch, tmp_path):
    """A -march=native build is only reused on a CPU with the same model and instruction-set flags."""
    monkeypatch.setenv("BERTH_CACHE", str(tmp_path))
    first = native.build_dir()
    assert first.parent == tmp_path / "torch_extensions" and first.name.startswith("cpu_model-")
    assert native.build_dir() == first
    monkeypatch.setattr(native, "cpu_fingerprint", lambda: "othercpu")
    assert native.build_dir() != first


@pytest.mark.parametrize("vocab", [1, 7, 8, 9, 49152, 49157])
def test_argmax_rows_equals_torch_argmax(extension, vocab):
    """First index of the maximum (ties, -inf rows, signed zeros) and the first NaN, as torch.argmax,
    for vocabularies shorter than, equal to and not a multiple of the 8-lane vectors."""
    torch.manual_seed(vocab)
    x = torch.randn(6, vocab)
    x[1] = 0.0
    x[1, vocab // 2:] = -0.0                      # all equal (signed zeros): index 0
    x[2] = float("-inf")                          # all -inf: index 0
    x[3, -1] = x[3, vocab // 3] = x[3].max() + 1  # a tie between a middle and the last entry
    x[4, (2 * vocab) // 3] = float("nan")         # NaN wins, as in torch
    x[5, -1] = x[5].max() + 1                     # the maximum in the tail
    assert torch.equal(extension.argmax_rows(x), x.argmax(dim=-1))
    assert torch.equal(extension.argmax_rows(x[:, :vocab].t().contiguous().t()), x.argmax(dim=-1))


def test_sampler_uses_the_native_argmax_once_loaded(extension, monkeypatch):
    from server.engine import sampler
    logits = torch.randn(3, 100)
    calls = []
    monkeypatch.setattr(extension, "argmax_rows", lambda x: calls.append(x) or x.argmax(dim=-1), raising=False)
    assert sampler.argmax(logits).tolist() == logits.argmax(dim=-1).tolist() and len(calls) == 1
    assert sampler.argmax(logits.double()).tolist() == logits.argmax(dim=-1).tolist() and len(calls) == 1
