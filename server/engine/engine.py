"""Engine: the paged engine's glue (add, abort, step). Scheduler, BlockManager, ModelRunner and Sampler
do the work; this file only wires them and turns sampled tokens into events."""
from __future__ import annotations

import itertools
import logging
import time

import torch

from kernels import native
from protocol.errors import ProtocolError
from protocol.types import Event, Failed, FinishReason, GenerateRequest
from server.config import EngineConfig
from server.engine.block_manager import BlockManager
from server.engine.model_runner import ModelRunner, kv_bytes_per_token
from server.engine.output import ChoiceOutput, make_logprob
from server.engine.sampler import Sampler, SamplingTensors
from server.engine.scheduler import Scheduler, needs_sample
from server.engine.sequence import Sequence
from server.engine.stats import EngineStats
from server.engine.tokenizer import Tokenizer, admit

log = logging.getLogger("berth.engine")


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, config: EngineConfig, max_model_len: int):
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_new_tokens = config.max_new_tokens
        self.block_manager = BlockManager(runner.num_blocks, runner.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   max_model_len)
        self.sampler = Sampler()
        self.outputs: dict[int, ChoiceOutput] = {}           # seq_id -> output bookkeeping
        self.generators: dict[int, torch.Generator] = {}
        self.forks: dict[int, list[Sequence]] = {}          # n > 1: choices held until choice 0's prompt is cached
        self._seq_ids = itertools.count()

    @classmethod
    def from_folder(cls, folder: str, config: EngineConfig, device: torch.device, dtype: torch.dtype) -> "Engine":
        from server.engine.models.weights import build_model

        model = build_model(folder, dtype, device, config.max_model_len)
        if config.quantization != "none":
            model.quantize(config.quantization)
        limit = model.config.max_position_embeddings
        max_model_len = min(config.max_model_len or limit, limit)
        per_block = kv_bytes_per_token(model.config, dtype) * config.block_size
        num_blocks = max(int(config.kv_cache_gib * 2**30) // per_block, 2)
        runner = ModelRunner(model, device, dtype, config.block_size, num_blocks)
        # build the C++ model step now (once per machine) rather than on the first request
        native_step = device.type == "cpu" and dtype == torch.float32 and native.load() is not None
        log.info("paged engine: %s %s%s, %d KV blocks of %d tokens%s", device, dtype,
                 "" if config.quantization == "none" else f", {config.quantization} weights", num_blocks,
                 config.block_size, ", native step" if native_step else "")
        return cls(runner, Tokenizer(folder), config, max_model_len)

    def add(self, request: GenerateRequest) -> None:
        prompt_ids = self.tokenizer.encode_request(request)
        adm = admit(request, prompt_ids, self.max_model_len, self.tokenizer.vocab_size, self.max_new_tokens)
        max_tokens = self._fit_pool(request, len(prompt_ids), adm.max_tokens)
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
        self.scheduler.add(seqs[0])
        if len(seqs) > 1:   # the other choices start once seqs[0]'s prompt blocks are in the prefix cache
            self.forks[seqs[0].seq_id] = seqs[1:]

    def _fit_pool(self, request: GenerateRequest, num_prompt: int, max_tokens: int) -> int:
        """A request that can never fit the KV pool is refused now, never queued forever."""
        if self.scheduler.can_ever_fit(num_prompt + max_tokens):
            return max_tokens
        capacity = self.runner.num_blocks * self.runner.block_size
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
        for seq in self.scheduler.abort(request_id) + held:
            out = self.outputs.pop(seq.seq_id, None)
            self.generators.pop(seq.seq_id, None)
            if out is not None:
                events.append(out.finished(FinishReason.ABORT, seq.num_cached_tokens, seq.queue_time))
        return events

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.forks)

    @torch.inference_mode()
    def step(self) -> list[tuple[str, Event]]:
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        logits = self.runner.run(out)
        seqs = [s.seq for s in out.scheduled if needs_sample(s)]
        sampled = self._sample(logits, seqs) if seqs else ([], None)
        self.scheduler.update(out, {seq.seq_id: tok for seq, tok in zip(seqs, sampled[0])})
        events: list[tuple[str, Event]] = []
        for i, seq in enumerate(seqs):
            for child in self.forks.pop(seq.seq_id, ()):
                self.scheduler.add(child)
            events += self._emit(seq, sampled[0][i], sampled[1], i)
        return events

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]):
        params = [s.params for s in seqs]
        tensors = SamplingTensors.build(params, logits.device)
        penalties = tensors.any_penalties
        banned = [list(self.outputs[s.seq_id].stop_ids) if s.num_output_tokens < s.params.min_tokens else []
                  for s in seqs] if any(p.min_tokens for p in params) else None
        result = self.sampler.sample(
            logits, tensors,
            [s.output_token_ids for s in seqs] if penalties else [[] for _ in seqs],
            [s.prompt_token_ids for s in seqs] if penalties else [[] for _ in seqs],
            [self.generators.get(s.seq_id) for s in seqs], banned)
        return result.token_ids, result

    def _emit(self, seq: Sequence, token_id: int, result, row: int) -> list[tuple[str, Event]]:
        out = self.outputs[seq.seq_id]
        try:
            logprob = None
            if seq.params.logprobs:
                top = result.top_logprobs[row] if result.top_logprobs else None
                logprob = make_logprob(self.tokenizer, token_id, result.logprobs[row], top)
            delta = out.add(token_id, logprob)
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

    def snapshot(self) -> EngineStats:
        bm = self.block_manager
        hits = bm.prefix_hit_stats
        return EngineStats(num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
                           num_blocks_total=bm.num_blocks, num_blocks_used=bm.num_used_blocks,
                           num_blocks_evictable=bm.num_evictable_blocks,
                           num_preemptions=self.scheduler.num_preemptions,
                           prefix_queries=hits.num_query_tokens, prefix_hit_tokens=hits.num_hit_tokens)
