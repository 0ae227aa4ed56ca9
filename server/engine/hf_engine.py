"""The `transformers` engine: the EAS "standard deployment". Any HF causal LM, one sequence at a time.

Same synchronous contract as the paged engine (add / abort / step), so AsyncEngine drives either.
Each step runs one forward of the current sequence with HF's own KV cache (prefill, then one token).
Structured outputs work as on the paged engine, except that a request waits for its grammar's compile
when it starts (one sequence at a time: nothing else would run meanwhile anyway).
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import torch

from protocol.errors import ProtocolError
from protocol.types import Event, Failed, FinishReason, GenerateRequest
from server.engine.output import ChoiceOutput, make_logprob
from server.engine.sampler import Sampler, SamplingTensors
from server.engine.stats import EngineStats
from server.engine.tokenizer import Tokenizer, admit


@dataclass(slots=True)
class _Job:
    request: GenerateRequest
    prompt_ids: list[int]
    outputs: list[ChoiceOutput]
    choice: int = 0                       # choices run one after another
    output_ids: list[int] = field(default_factory=list)
    past: object = None
    generator: torch.Generator | None = None
    grammar: object = None                # PendingGrammar when the request has a constraint
    matcher: object = None                # the current choice's Matcher
    arrival: float = field(default_factory=time.monotonic)
    started: float | None = None

    @property
    def queue_time(self) -> float | None:
        return None if self.started is None else self.started - self.arrival


class HFEngine:
    def __init__(self, folder: str, dtype: torch.dtype, max_model_len: int | None = None,
                 max_new_tokens: int | None = None):
        import transformers

        self.tokenizer = Tokenizer(folder)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, local_files_only=True).eval()
        limit = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(max_model_len or limit, limit)
        self.sampler = Sampler()
        self.max_new_tokens = max_new_tokens
        self.waiting: collections.deque[_Job] = collections.deque()
        self.current: _Job | None = None
        self.stats = EngineStats()
        self._grammar_service = None
        self._bitmask = None

    def add(self, request: GenerateRequest) -> None:
        prompt_ids = self.tokenizer.encode_request(request)
        adm = admit(request, prompt_ids, self.max_model_len, self.tokenizer.vocab_size, self.max_new_tokens)
        outputs = [ChoiceOutput(self.tokenizer, request.params, i, prompt_ids, adm.max_tokens,
                                self.tokenizer.eos_token_ids) for i in range(request.params.n)]
        job = _Job(request, prompt_ids, outputs)
        if request.constraint is not None:
            job.grammar = self._grammars().compile(request.constraint)
            if job.grammar.done():
                job.grammar.result()      # a cached or instantly failed compile: its error is a 400 now
        self.waiting.append(job)

    def _grammars(self):
        if self._grammar_service is None:
            from server.grammar import GrammarService, allocate_bitmask

            vocab = self.model.get_output_embeddings().weight.shape[0]
            self._grammar_service = GrammarService(self.tokenizer.hf, vocab, self.tokenizer.eos_token_ids)
            self._bitmask = allocate_bitmask(1, vocab)
        return self._grammar_service

    def abort(self, request_id: str) -> list[Event]:
        jobs = [j for j in self.waiting if j.request.request_id == request_id]
        for j in jobs:
            self.waiting.remove(j)
        if self.current is not None and self.current.request.request_id == request_id:
            jobs.append(self.current)
            self.current = None
        return [o.finished(FinishReason.ABORT, queue_time=j.queue_time) for j in jobs for o in j.outputs[j.choice:]]

    def has_unfinished(self) -> bool:
        return self.current is not None or bool(self.waiting)

    @torch.inference_mode()
    def step(self) -> list[tuple[str, Event]]:
        if self.current is None:
            if not self.waiting:
                return []
            self.current = self.waiting.popleft()
            self.current.started = time.monotonic()
            self._start_choice(self.current)
        job = self.current
        rid = job.request.request_id
        try:
            token_id, logprob, complete = self._next_token(job)
            out = job.outputs[job.choice]
            events: list[tuple[str, Event]] = [(rid, out.add(token_id, logprob, complete))]
        except Exception as exc:  # noqa: BLE001 - one request's failure must not stop the engine
            self.current = None
            error = exc if isinstance(exc, ProtocolError) else ProtocolError("generation failed", status=500)
            return [(rid, Failed(error, o.index)) for o in job.outputs[job.choice:]]
        if out.reason is not None:
            events.append((rid, out.finished(queue_time=job.queue_time)))
            job.choice += 1
            if job.choice == len(job.outputs):
                self.current = None
            else:
                self._start_choice(job)
        return events

    def _start_choice(self, job: _Job) -> None:
        job.output_ids, job.past = [], None
        job.matcher = None
        seed = job.request.params.seed
        job.generator = None if seed is None else torch.Generator().manual_seed((seed + job.choice) % 2**63)

    def _next_token(self, job: _Job) -> tuple[int, object, bool]:
        params = job.request.params
        if job.past is None:
            ids = torch.tensor([job.prompt_ids])                           # (1, P)
        else:
            ids = torch.tensor([[job.output_ids[-1]]])                     # (1, 1)
        result = self.model(input_ids=ids, cache=job.past, use_cache=True)
        job.past = result.past_key_values
        logits = result.logits[:, -1, :].float()                           # (1, V)
        tensors = SamplingTensors.build([params], logits.device)
        mask = None
        if job.grammar is not None and job.matcher is None:
            job.matcher = job.grammar.result().matcher()    # raises the compile's GrammarError
        if job.matcher is not None:
            job.matcher.fill(self._bitmask, 0)
            mask = ([0], self._bitmask)
        res = self.sampler.sample(logits, tensors, [job.output_ids], [job.prompt_ids], [job.generator],
                                  grammar_mask=mask)
        token_id = res.token_ids[0]
        job.output_ids.append(token_id)
        complete = False
        if job.matcher is not None:
            if not job.matcher.accept(token_id):
                raise ProtocolError(f"a sampled token broke the grammar: {job.matcher.error}", status=500)
            complete = job.matcher.is_terminated
        logprob = None
        if params.logprobs:
            top = res.top_logprobs[0] if res.top_logprobs else None
            logprob = make_logprob(self.tokenizer, token_id, res.logprobs[0], top)
        return token_id, logprob, complete

    def snapshot(self) -> EngineStats:
        self.stats.num_running = int(self.current is not None)
        self.stats.num_waiting = len(self.waiting)
        return self.stats
