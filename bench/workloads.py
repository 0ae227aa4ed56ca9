"""Seeded synthetic workloads and the two load shapes (closed loop at concurrency C, open loop
at Poisson rate λ).

A Conversation is the unit of work: one round for single-request benchmarks, R rounds for the
multi-turn chat workload, whose follow-ups are short so that a prefix cache shows in later rounds.
"""
from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from bench.clients import RequestResult, StructuredSpec

DEFAULT_TOKENIZER_DIR = Path.home() / ".cache" / "berth" / "models" / "SmolLM2-135M-Instruct"

# Common English words; with a BPE vocabulary each " word" is about one token.
_WORDS = (
    "time year people way day man thing woman life child world school state family student group "
    "country problem hand part place case week company system program question work government number "
    "night point home water room mother area money story fact month lot right study book eye job word "
    "business issue side kind head house service friend father power hour game line end member law car "
    "city community name president team minute idea kid body information back parent face others level "
    "office door health person art war history party result change morning reason research girl guy "
    "moment air teacher force education foot boy age policy music market sense nation plan college "
    "interest death experience effect class control care field development role effort rate heart drug "
    "show leader light voice wife police mind price report decision son view relationship town road "
    "arm difference value building action model season society tax director position player record "
    "paper space ground form event official matter center couple site project activity star table need "
    "court oil situation cost industry figure street image phone data picture practice piece land "
    "product doctor wall patient worker news test movie north love support technology step baby "
    "computer type attention film tree source organization hair window evidence population site"
).split()

_FOLLOW_UPS = (
    "Can you explain that in more detail?", "Why is that so?", "Give me an example of that.",
    "How would you summarise your last answer?", "What follows from this?", "Tell me more.",
)


@dataclass(slots=True)
class Turn:
    prompt: str
    prompt_len: int      # target length in tokens
    output_len: int


@dataclass(slots=True)
class Conversation:
    turns: list[Turn]
    constraint: StructuredSpec | None = None    # sent on every round; None: free text

    @property
    def tag(self) -> str:
        return "free" if self.constraint is None else "constrained"


def constrained_flags(num: int, fraction: float) -> list[bool]:
    """Which of num conversations carry the constraint: the first ceil(k * fraction) of every k
    are constrained, spread evenly by index (0.5: constrained, free, constrained, ...; 1: all;
    0: none), so free and constrained requests interleave at every load shape."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    f = Fraction(fraction).limit_denominator(1_000_000)
    return [math.ceil((i + 1) * f) > math.ceil(i * f) for i in range(num)]


def with_constraint(conversations: list[Conversation], constraint: StructuredSpec | None,
                    fraction: float = 1.0) -> list[Conversation]:
    """New conversations (same turns) where `fraction` of them, by index, carry constraint."""
    flags = constrained_flags(len(conversations), fraction if constraint is not None else 0.0)
    return [Conversation(c.turns, constraint if flag else None) for c, flag in zip(conversations, flags)]


class TokenCounter:
    """A tokenizers.Tokenizer loaded from a model folder's tokenizer.json."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, folder: str | Path | None = None) -> "TokenCounter | None":
        path = Path(folder or DEFAULT_TOKENIZER_DIR) / "tokenizer.json"
        if not path.is_file():
            return None
        from tokenizers import Tokenizer
        return cls(Tokenizer.from_file(str(path)))

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def random_text(self, rng: random.Random, num_tokens: int) -> str:
        """Random vocabulary tokens decoded to text that re-encodes to about num_tokens tokens."""
        special = set(self.tokenizer.get_added_tokens_decoder()) if hasattr(
            self.tokenizer, "get_added_tokens_decoder") else set()
        vocab_size = self.tokenizer.get_vocab_size()
        ids = [i for i in (rng.randrange(vocab_size) for _ in range(num_tokens * 2)) if i not in special]
        text = self.tokenizer.decode(ids[:num_tokens])
        for _ in range(2):    # decode/encode is not an identity: trim to the target length
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids[:num_tokens]
            text = self.tokenizer.decode(ids)
        return text


def random_text(rng: random.Random, num_tokens: int, counter: TokenCounter | None = None) -> str:
    if counter is not None:
        return counter.random_text(rng, num_tokens)
    return " ".join(rng.choice(_WORDS) for _ in range(num_tokens))


def synthetic_conversations(num: int, input_len: int, output_len: int, rounds: int = 1, seed: int = 0,
                            counter: TokenCounter | None = None) -> list[Conversation]:
    """num conversations; round 0 is a random input_len-token prompt, each later round a follow-up
    question plus random words, about input_len // 4 tokens in all."""
    rng = random.Random(seed)
    follow_len = max(8, input_len // 4)
    conversations = []
    for _ in range(num):
        turns = [Turn(random_text(rng, input_len, counter), input_len, output_len)]
        for _ in range(rounds - 1):
            question = rng.choice(_FOLLOW_UPS)
            filler = random_text(rng, max(1, follow_len - len(question.split())), counter)
            turns.append(Turn(f"{question} {filler}", follow_len, output_len))
        conversations.append(Conversation(turns))
    return conversations


@dataclass(slots=True)
class LoadPoint:
    """Closed loop (concurrency set) or open loop (request_rate set, Poisson arrivals)."""
    concurrency: int | None = None
    request_rate: float | None = None

    @property
    def label(self) -> str:
        return f"c={self.concurrency}" if self.concurrency is not None else f"rate={self.request_rate:g}/s"


def sweep_points(concurrencies: list[int] | None, rates: list[float] | None) -> list[LoadPoint]:
    if rates:
        return [LoadPoint(request_rate=rate) for rate in rates]
    return [LoadPoint(concurrency=c) for c in concurrencies or [1]]


def poisson_gaps(rate: float, num: int, seed: int) -> list[float]:
    """Seeded exponential inter-arrival gaps in seconds (a Poisson process at `rate` per second)."""
    rng = random.Random(seed)
    return [rng.expovariate(rate) for _ in range(num)]


RunOne = Callable[[Conversation], Awaitable[list[RequestResult]]]


async def run_load(conversations: list[Conversation], run_one: RunOne, point: LoadPoint, seed: int = 0,
                   on_done: Callable[[], None] | None = None) -> list[RequestResult]:
    """Run every conversation under the load shape; results in conversation order."""
    outputs: list[list[RequestResult]] = [[] for _ in conversations]

    async def one(index: int) -> None:
        outputs[index] = await run_one(conversations[index])
        if on_done is not None:
            on_done()

    if point.request_rate is not None:
        gaps = poisson_gaps(point.request_rate, max(0, len(conversations) - 1), seed)
        tasks = [asyncio.create_task(one(0))] if conversations else []
        for index, gap in enumerate(gaps, start=1):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(index)))
        await asyncio.gather(*tasks)
    else:
        queue = iter(range(len(conversations)))

        async def worker() -> None:
            for index in queue:
                await one(index)

        await asyncio.gather(*(worker() for _ in range(max(1, point.concurrency or 1))))
    return [r for rs in outputs for r in rs]
