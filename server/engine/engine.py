"""Engine: the paged engine's glue (add, abort, step). Scheduler, BlockManager, ModelRunner and Sampler
do the work; this file only wires them and turns sampled tokens into events."""
from __future__ import annotations

import itertools
import logging
import time

import torch

import kernels
from kernels import native
from protocol.errors import ProtocolError
from protocol.types import Event, Failed, FinishReason, GenerateRequest
from server.config import EngineConfig
from server.engine.block_manager import BlockManager, blocks_to_hold
from server.engine.constrained import GrammarBook
from server.engine.model_runner import ModelRunner, kv_bytes_per_token
from server.engine.models.arch import kv_groups
from server.engine.output import ChoiceOutput, make_logprob
from server.engine.sampler import Sampler, SamplingTensors
from server.engine.scheduler import Scheduler, needs_sample
from server.engine.sequence import Sequence
from server.engine.stats import EngineStats
from server.engine.tokenizer import Tokenizer, admit

log = logging.getLogger("berth.engine")


def _device_bytes(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    return free


def _stored_half(hf_config) -> bool:
    return str(getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", "")).endswith(("bfloat16", "float16"))


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, config: EngineConfig, max_model_len: int):
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_new_tokens = config.max_new_tokens
        # one block table per KV group: a group attending to a sliding window (Phi-3's every layer, Gemma's local
        # layers) releases the blocks that fall out of it
        self.block_manager = BlockManager(runner.num_blocks, runner.block_size, config.enable_prefix_caching,
                                          windows=getattr(runner, "group_windows", None))
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   max_model_len)
        self.sampler = Sampler()
        self.outputs: dict[int, ChoiceOutput] = {}           # seq_id -> output bookkeeping
        self.generators: dict[int, torch.Generator] = {}
        self.forks: dict[int, list[Sequence]] = {}          # n > 1: choices held until choice 0's prompt is cached
        self._seq_ids = itertools.count()
        self._max_num_seqs = config.max_num_seqs
        self._grammars: GrammarBook | None = None              # built on the first constrained request

    @property
    def grammars(self) -> GrammarBook:
        if self._grammars is None:
            from server.grammar import GrammarService

            service = GrammarService(self.tokenizer.hf, self.runner.model.config.vocab_size,
                                     self.tokenizer.eos_token_ids)
            self._grammars = GrammarBook(service, self._max_num_seqs)
        return self._grammars

    @classmethod
    def from_folder(cls, folder: str, config: EngineConfig, device: torch.device, dtype: torch.dtype) -> "Engine":
        from transformers import AutoConfig

        from server.engine import memory
        from server.engine.models.gguf_loader import gguf_of
        from server.engine.models.weights import build_model, weight_bytes

        is_gguf = gguf_of(folder) is not None
        if is_gguf and config.quantization in ("int8", "int4"):
            raise ValueError(f"--quantization {config.quantization}: a GGUF keeps its own quant types "
                             "(use --quantization auto, or give an HF folder)")
        hf_config = AutoConfig.from_pretrained(folder, local_files_only=True)
        limit = hf_config.max_position_embeddings
        max_model_len = min(config.max_model_len or limit, limit)
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        activations = memory.activation_bytes(hf_config.hidden_size, hf_config.intermediate_size,
                                              hf_config.vocab_size, hf_config.num_attention_heads, head_dim,
                                              config.max_num_batched_tokens, config.max_num_seqs)
        available = memory.available_bytes() if device.type == "cpu" else _device_bytes(device)
        # before loading: a model whose files alone cannot fit gets one clear error, never the OOM killer
        files = memory.file_bytes(folder)
        # a folder on the CPU keeps its stored dtype (bf16 stays bf16; fp32 activations around it)
        keep_stored = device.type == "cpu" and dtype == torch.float32 and not is_gguf
        quantization = config.quantization
        if is_gguf:     # Q4_K scales widen to fp16 per 32 (x1.11), Q5_K/Q6_K become Q8_0 (x1.3-1.5)
            estimate = int(files * 1.35)
        else:
            stored = 2 if _stored_half(hf_config) else 4
            params = files / stored

            def estimate_for(method: str) -> int:
                per_param = {"int8": 1.1, "int4": 0.6}.get(method, stored if keep_stored else dtype.itemsize)
                return int(params * per_param)
            if quantization == "auto":   # as stored, unless only a quantized form fits
                budget = config.memory_utilization * available - activations
                quantization = next((m for m in ("none", "int8", "int4") if estimate_for(m) < 0.8 * budget), "none")
                if quantization != "none":
                    log.warning("the weights as stored (~%.1f GiB) do not fit here: quantizing to %s",
                                estimate_for("none") / memory.GIB, quantization)
            estimate = estimate_for(quantization)
        if estimate + activations > config.memory_utilization * available:
            raise memory.MemoryPlanError(
                f"the model does not fit: its weights need ~{estimate / memory.GIB:.1f} GiB and activations "
                f"~{activations / memory.GIB:.1f} GiB; {available / memory.GIB:.1f} GiB available")
        model = build_model(folder, dtype, device, config.max_model_len, quantization=quantization,
                            keep_stored_dtype=keep_stored)
        memory.return_freed_memory(steady=device.type == "cpu")
        block_size = kernels.block_size_for(device, config.block_size)
        windows = [g.window for g in kv_groups(model.config, max_model_len)]
        context_blocks = blocks_to_hold(windows, block_size, max_model_len, config.max_num_batched_tokens)
        plan = memory.plan_memory(weight_bytes(model), kv_bytes_per_token(model.config, dtype, max_model_len),
                                  block_size, activations, max_model_len, config.max_num_seqs, config.kv_cache_gib,
                                  config.memory_utilization, available, context_blocks=context_blocks)
        log.info("%s", plan.summary())
        runner = ModelRunner(model, device, dtype, block_size, plan.num_blocks, max_model_len)
        if config.cuda_graphs and device.type == "cuda":
            runner.capture_cuda_graphs(config.max_num_seqs, max_model_len)
        # build the C++ model step now (once per machine) rather than on the first request
        native_step = device.type == "cpu" and dtype == torch.float32 and native.load() is not None
        rotary = model.model.rotary_emb
        if rotary.params["rope_type"] == "longrope":
            log.info("LongRoPE: %s factors for every sequence (max_model_len %d, original context %d)",
                     "long" if rotary.long_factors else "short", max_model_len,
                     rotary.params["original_max_position_embeddings"])
        if native_step and not getattr(model, "native_capable", True):
            native_step = False
            log.info("%s: every step runs the PyTorch path (the native step cannot compute them exactly)",
                     getattr(model, "native_reason", "partial rotary embeddings"))
        stored_dtype = model.model.layers[0].self_attn.o_proj.weight.dtype   # (every attention has an o_proj)
        weights = "GGUF types" if is_gguf else (f"{quantization} weights" if quantization in ("int8", "int4")
                                                 else f"{str(stored_dtype).removeprefix('torch.')} weights")
        log.info("paged engine: %s %s%s, %d KV blocks of %d tokens%s", device, dtype,
                 f", {weights}" if weights else "", plan.num_blocks, block_size,
                 (", native step (one team)" if getattr(model, "_native", None) is not None and model._native.team
                  else ", native step") if native_step else "")
        engine = cls(runner, Tokenizer(folder), config, max_model_len)
        engine.memory_plan = plan
        return engine

    def add(self, request: GenerateRequest) -> None:
        prompt_ids = self.tokenizer.encode_request(request)
        adm = admit(request, prompt_ids, self.max_model_len, self.tokenizer.vocab_size, self.max_new_tokens)
        max_tokens = self._fit_pool(request, len(prompt_ids), adm.max_tokens)
        grammar = None
        if request.constraint is not None:
            grammar = self.grammars.service.compile(request.constraint)
            if grammar.done():
                grammar.result()    # a cached or instantly failed compile: its error is this request's 400
        params, now = request.params, time.monotonic()
        seqs = []
        for index in range(params.n):
            seq = Sequence(seq_id=next(self._seq_ids), request_id=request.request_id, index=index,
                           token_ids=list(prompt_ids), num_prompt_tokens=len(prompt_ids), params=params,
                           max_tokens=max_tokens, arrival=now)
            self.outputs[seq.seq_id] = ChoiceOutput(self.tokenizer, params, index, prompt_ids, max_tokens,
                                                    self.tokenizer.eos_token_ids)
            if params.seed is not None:
                self.generators[seq.seq_id] = torch.Generator(self.runner.device).manual_seed(
                    (params.seed + index) % 2**63)
            seqs.append(seq)
            if grammar is not None:
                self.grammars.attach(seq, grammar)
        if grammar is not None and not grammar.done():
            self.grammars.hold(seqs[0])     # enters the scheduler once its grammar is compiled
        else:
            self.scheduler.add(seqs[0])
        if len(seqs) > 1:   # the other choices start once seqs[0]'s prompt blocks are in the prefix cache
            self.forks[seqs[0].seq_id] = seqs[1:]

    def _fit_pool(self, request: GenerateRequest, num_prompt: int, max_tokens: int) -> int:
        """A request that can never fit the KV pool is refused now, never queued forever."""
        if self.scheduler.can_ever_fit(num_prompt + max_tokens):
            return max_tokens
        capacity = self.block_manager.capacity_tokens(self.scheduler.max_num_batched_tokens, num_prompt + max_tokens)
        if request.cap_max_tokens and self.scheduler.can_ever_fit(num_prompt + 1):
            while max_tokens > 1 and not self.scheduler.can_ever_fit(num_prompt + max_tokens):
                max_tokens = max(1, min(max_tokens - 1, capacity - num_prompt))
            return max_tokens
        raise ProtocolError(f"the request needs {num_prompt + max_tokens} tokens of KV cache but the pool holds "
                            f"{capacity}; lower max_tokens or the prompt", param="max_tokens")

    def abort(self, request_id: str) -> list[Event]:
        events = []
        held = [c for cs in self.forks.values() for c in cs if c.request_id == request_id]
        self.forks = {p: cs for p, cs in self.forks.items() if cs[0].request_id != request_id}
        if self._grammars is not None:
            held += self._grammars.abort(request_id)
        for seq in self.scheduler.abort(request_id) + held:
            out = self.outputs.pop(seq.seq_id, None)
            self.generators.pop(seq.seq_id, None)
            if self._grammars is not None:
                self._grammars.drop(seq)
            if out is not None:
                events.append(out.finished(FinishReason.ABORT, seq.num_cached_tokens, seq.queue_time))
        return events

    def has_unfinished(self) -> bool:
        return (self.scheduler.has_unfinished() or bool(self.forks)
                or (self._grammars is not None and self._grammars.num_held > 0))

    @torch.inference_mode()
    def step(self) -> list[tuple[str, Event]]:
        events = self._admit_compiled() if self._grammars is not None and self._grammars.num_held else []
        out = self.scheduler.schedule()
        if out.is_empty:
            if self._grammars is not None and self._grammars.num_held:
                self._grammars.wait(timeout=0.02)   # only grammar compiles are pending: do not spin
            return events
        if self._grammars is not None:
            for seq in out.preempted:
                self._grammars.release(seq)
        logits = self.runner.run(out)
        seqs = [s.seq for s in out.scheduled if needs_sample(s)]
        sampled = self._sample(logits, seqs) if seqs else ([], None)
        complete = self._advance_grammars(seqs, sampled[0]) if self._grammars is not None else {}
        self.scheduler.update(out, {seq.seq_id: tok for seq, tok in zip(seqs, sampled[0])})
        for i, seq in enumerate(seqs):
            for child in self.forks.pop(seq.seq_id, ()):
                self.scheduler.add(child)
            events += self._emit(seq, sampled[0][i], sampled[1], i, complete.get(seq.seq_id, False))
        return events

    def _admit_compiled(self) -> list[tuple[str, Event]]:
        """Held requests whose grammar is compiled enter the scheduler; a failed compile fails them."""
        ready, failed = self._grammars.poll()
        for seq in ready:
            self.scheduler.add(seq)
        events: list[tuple[str, Event]] = []
        for seq, error in failed:
            children = self.forks.pop(seq.seq_id, [])
            for choice in [seq] + children:
                self.outputs.pop(choice.seq_id, None)
                self.generators.pop(choice.seq_id, None)
                self._grammars.drop(choice)
                events.append((choice.request_id, Failed(error, choice.index)))
        return events

    def _advance_grammars(self, seqs: list[Sequence], token_ids: list[int]) -> dict[int, bool | ProtocolError]:
        """Advance each constrained choice's matcher by its sampled token: seq_id -> whether its text
        is complete, or the error that ends it."""
        complete: dict[int, bool | ProtocolError] = {}
        for seq, token_id in zip(seqs, token_ids):
            if self._grammars.is_constrained(seq):
                try:
                    complete[seq.seq_id] = self._grammars.accept(seq, token_id)
                except ProtocolError as err:
                    log.error("grammar of %s: %s", seq.request_id, err.message)
                    complete[seq.seq_id] = err
        return complete

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]):
        params = [s.params for s in seqs]
        tensors = SamplingTensors.build(params, logits.device)
        penalties = tensors.any_penalties
        grammar_mask = self._grammars.mask(seqs) if self._grammars is not None else None
        constrained = set(grammar_mask[0]) if grammar_mask is not None else set()
        # min_tokens never bans what a grammar requires: a constrained choice ends when its grammar does
        banned = [list(self.outputs[s.seq_id].stop_ids)
                  if s.num_output_tokens < s.params.min_tokens and row not in constrained else []
                  for row, s in enumerate(seqs)] if any(p.min_tokens for p in params) else None
        result = self.sampler.sample(
            logits, tensors,
            [s.output_token_ids for s in seqs] if penalties else [[] for _ in seqs],
            [s.prompt_token_ids for s in seqs] if penalties else [[] for _ in seqs],
            [self.generators.get(s.seq_id) for s in seqs], banned, grammar_mask)
        return result.token_ids, result

    def _emit(self, seq: Sequence, token_id: int, result, row: int,
              complete: bool | ProtocolError = False) -> list[tuple[str, Event]]:
        out = self.outputs[seq.seq_id]
        if isinstance(complete, ProtocolError):
            self._drop(seq)
            return [(seq.request_id, Failed(complete, seq.index))]
        try:
            logprob = None
            if seq.params.logprobs:
                top = result.top_logprobs[row] if result.top_logprobs else None
                logprob = make_logprob(self.tokenizer, token_id, result.logprobs[row], top)
            delta = out.add(token_id, logprob, complete)
        except Exception:  # noqa: BLE001 - a per-request fault fails that request alone
            log.exception("output processing failed for %s", seq.request_id)
            self._drop(seq)
            return [(seq.request_id, Failed(ProtocolError("generation failed", status=500), seq.index))]
        events = [(seq.request_id, delta)]
        if out.reason is not None:
            self._drop(seq)
            events.append((seq.request_id, out.finished(cached_tokens=seq.num_cached_tokens,
                                                        queue_time=seq.queue_time)))
        return events

    def _drop(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self.outputs.pop(seq.seq_id, None)
        self.generators.pop(seq.seq_id, None)
        if self._grammars is not None:
            self._grammars.drop(seq)

    def snapshot(self) -> EngineStats:
        bm = self.block_manager
        hits = bm.prefix_hit_stats
        return EngineStats(num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
                           num_blocks_total=bm.num_blocks, num_blocks_used=bm.num_used_blocks,
                           num_blocks_evictable=bm.num_evictable_blocks,
                           num_preemptions=self.scheduler.num_preemptions,
                           prefix_queries=hits.num_query_tokens, prefix_hit_tokens=hits.num_hit_tokens)
