"""The batching engine: a request queue, continuous batching over paged KV, preemption.

Continuous batching as Orca and vLLM do it: requests join and leave the running batch
at every step. A step is one compiled program (`jaxsys.nanobatch.serving_step`) over
the decode rows of every running sequence that has its whole context in pages (one
token each), plus up to `prefill_lanes` rows, one per sequence still prefilling, that
push a chunk of `prefill_chunk` prompt tokens each, so long prompts are prefilled chunk
by chunk between decode steps. Shapes are static: decode rows are padded up to a bucket
(powers of two up to `max_batch`) and there is a program per number of prefill lanes,
so a handful of programs serve every mix.

KV pages come from one `PageAllocator` pool, allocated on the host before each step
for exactly the tokens that step writes, and returned when a sequence finishes, is
cancelled or times out. When the pool runs out mid-decode, the most recently admitted
sequence is preempted (vLLM's recompute policy): its pages are freed and it goes back
to the front of the queue with its prompt and the tokens it has generated so far, to be
prefilled again later. Requests that cannot fit the pool or the context are refused at
submission; a full queue refuses with `EngineBusy` rather than waiting without bound.

With `speculative="draft"` (and a draft model), every decode row runs a speculative round
per step instead (`jaxsys.spec_serving`): the draft model proposes `gamma` tokens over its
own pages (same page tables), the target verifies them in one forward, and each sequence
keeps its accepted drafts plus the target's token, so greedy output is unchanged and
sampled output keeps its distribution; `speculative_metrics()` gives the acceptance.
With `speculative="self"` the model drafts for itself over a retrieval selection of its
own pages (TriForce's middle level, `jaxsys.spec_serving.self_decode_step`): per layer
and KV head, `retrieval_budget` tokens of whole pages scored by their mean key against
the query of the last verified token, plus every page committed since the selection. A
sequence's selection is made on its first round and again every `rebuild_every` rounds,
after a round that accepted less than `rebuild_below` of its drafts, or when its window
would overflow; it lives on the host with the sequence and is dropped on preemption.
With `speculative="triforce"` the draft model, over its own pages as a StreamingLLM cache,
drafts `gamma` tokens for that retrieval level until each row has `gamma_outer`, which the
model over every page then verifies (`spec_serving.triforce_decode_step`).

Sampling is per request (temperature, top-k, top-p, seed) and keyed by (seed, position),
as in `jaxsys.decode`, so a request's tokens do not depend on what else is batched with
it; greedy output equals `jaxsys.decode.generate` up to float reduction order.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import queue
import threading
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.kvcache.paged import PageAllocator, PagePoolExhausted, pages_per_sequence
from jaxsys.model import ModelDef
from jaxsys.nanobatch import (Lane, compiler_options, empty_pools, search_split, serving_step, time_call,
                              write_step)
from jaxsys.sampling import SamplingParams

log = logging.getLogger("jaxsys.engine")

STOP, LENGTH, TIMEOUT, CANCELLED, ERROR = "stop", "length", "timeout", "cancelled", "error"
SPECULATIVE_MODES = ("none", "draft", "self", "triforce")


class EngineBusy(RuntimeError):
    """The engine refuses a request for now: `status` 429 (queue full) or 503 (KV pool full, stopping)."""

    def __init__(self, message: str, *, status: int, retry_after_s: float):
        super().__init__(message)
        self.status, self.retry_after_s = status, retry_after_s


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 8  # running sequences (decode rows of a step)
    max_len: int | None = None  # prompt + generated tokens per sequence; default the model's max_seq_len
    page_size: int = 16
    num_pages: int | None = None  # default: max_batch full-length sequences
    prefill_chunk: int = 32  # prompt tokens per prefill lane per step
    prefill_lanes: int = 1
    max_queue: int = 64  # waiting requests before new ones get EngineBusy(429)
    # KV pages the waiting requests' contexts need, as a multiple of the pool, before new ones get 503.
    max_queued_pools: float = 4.0
    # Decode row counts a program is compiled for (rows are padded up to the next); default powers of two up to
    # max_batch. Fewer buckets: fewer programs to compile, more padded rows.
    decode_buckets: tuple[int, ...] = ()
    splits: tuple[tuple[int, ...], ...] = ()  # nano-batch splits by decode rows, e.g. ((8, 8),)
    attention_impl: str = "auto"
    streams: bool = False  # each nano-batch on its own GPU stream (`compute_on("gpu_stream:N")`)
    ynn_dots: bool = False  # on CPU, XLA's YNNPACK dot fusions in the step programs (default: Eigen dots, faster here)
    speculative: str = "none"  # "draft": a draft model proposes `gamma` tokens per round (`jaxsys.spec_serving`);
    # "self": the model itself over a retrieval selection of its pages does
    # "triforce": the draft model (StreamingLLM view of its pages) drafts `gamma` for the model over the retrieval
    # selection, which drafts `gamma_outer` for the model over every page
    gamma: int = 4
    gamma_outer: int = 8  # triforce: tokens the retrieval level proposes per full verify
    draft_window: int = 256  # triforce: the draft model's recent window (tokens), beside its sink page
    retrieval_budget: int = 256  # self: tokens (whole pages) the retrieval selection keeps per layer and KV head
    rebuild_every: int = 8  # self: rounds between a sequence's selections
    rebuild_below: float = 0.5  # ... or sooner, after a round that accepted less than this fraction

    def __post_init__(self):
        for name in ("max_batch", "page_size", "prefill_chunk", "prefill_lanes", "max_queue", "gamma", "gamma_outer",
                     "draft_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name}={getattr(self, name)} must be >= 1")
        if self.speculative not in SPECULATIVE_MODES:
            raise ValueError(f"EngineConfig.speculative={self.speculative!r}: the engine serves "
                             f"{SPECULATIVE_MODES}")
        if self.speculative in ("self", "triforce") and (self.retrieval_budget % self.page_size
                                           or self.retrieval_budget < 2 * self.page_size):
            raise ValueError(f"retrieval_budget={self.retrieval_budget} must be a multiple of page_size "
                             f"{self.page_size} holding at least two pages (the sink page and the newest)")
        buckets = tuple(self.decode_buckets)
        if buckets and (list(buckets) != sorted(set(buckets)) or buckets[0] < 1 or buckets[-1] != self.max_batch):
            raise ValueError(f"decode_buckets={buckets} must be increasing positive row counts ending at max_batch "
                             f"{self.max_batch}")
        if self.rebuild_every < 1:
            raise ValueError(f"EngineConfig.rebuild_every={self.rebuild_every} must be >= 1")
        if self.max_len is not None and self.max_len < 1:
            raise ValueError(f"EngineConfig.max_len={self.max_len} must be >= 1 (None: the model's max_seq_len)")


@dataclasses.dataclass
class Request:
    prompt: list[int]
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()  # EOS and stop tokens; the stop token is the last one generated
    timeout_s: float | None = None  # from submission; the request ends with finish_reason "timeout"


class Sequence:
    """A submitted request and its progress; `stream()` yields its tokens as they come."""

    def __init__(self, seq_id: int, request: Request):
        self.id, self.request = seq_id, request
        self.generated: list[int] = []
        self.cached = 0  # tokens of prompt + generated whose keys/values are in pages
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.preemptions = 0
        self.submitted = time.perf_counter()
        self.deadline = None if request.timeout_s is None else self.submitted + request.timeout_s
        self.rounds = 0  # speculative rounds (a key for their random draws)
        self.retrieval: dict | None = None  # self-speculation: query, selection (chunks, base), rounds since, rate
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.cancel_requested = False
        self.done = threading.Event()
        self._events: queue.Queue = queue.Queue()

    @property
    def context_len(self) -> int:
        return len(self.request.prompt) + len(self.generated)

    def context(self, start: int, stop: int) -> list[int]:
        prompt = self.request.prompt
        return (prompt + self.generated)[start:stop] if stop > len(prompt) else prompt[start:stop]

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def stream(self, poll_s: float = 0.5):
        """Token ids as they are generated, until the sequence ends (check `finish_reason` then)."""
        while True:
            try:
                token = self._events.get(timeout=poll_s)
            except queue.Empty:
                if self.done.is_set() and self._events.empty():
                    return
                continue
            if token is None:
                return
            yield token

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.submitted

    @property
    def latency_s(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.submitted


def buckets_for(max_batch: int) -> tuple[int, ...]:
    sizes = {max_batch}
    b = 1
    while b < max_batch:
        sizes.add(b)
        b *= 2
    return tuple(sorted(sizes))


class Engine:
    """Continuous batching for one model on one device. Thread-safe `submit`/`cancel`.

    Run it in a background thread (`start`/`stop`) or drive it with `run_until_idle`.
    """

    def __init__(self, model: ModelDef, params, config: EngineConfig = EngineConfig(), *,
                 draft: ModelDef | None = None, draft_params=None):
        self.model, self.params, self.config = model, params, config
        c = model.config
        if (config.speculative in ("draft", "triforce")) != (draft is not None and draft_params is not None):
            raise ValueError(f"speculative={config.speculative!r}: 'draft' and 'triforce' need a draft model and its "
                             f"params, the other modes take none")
        kept = config.retrieval_budget // config.page_size
        if config.speculative in ("self", "triforce") and kept > pages_per_sequence(config.max_len or c.max_seq_len,
                                                                        config.page_size):
            raise ValueError(f"retrieval_budget={config.retrieval_budget} exceeds the context length "
                             f"{config.max_len or c.max_seq_len}; lower it")
        # Tokens a full verify scores per round; the retrieval window: pages committed since the selection, read in
        # full (a new selection when they would overflow); triforce's draft model reads its window's pages.
        self.spec_width = config.gamma_outer if config.speculative == "triforce" else config.gamma
        self.window_pages = -(-config.rebuild_every * (self.spec_width + 1) // config.page_size) + 1
        self.draft_window_pages = -(-config.draft_window // config.page_size) + 1
        if draft is not None and draft.config.vocab_size != c.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the target's "
                             f"({c.vocab_size}); speculative decoding needs the same token ids")
        self.draft, self.draft_params = draft, draft_params
        self.max_len = config.max_len or c.max_seq_len
        self.pages_per_sequence = pages_per_sequence(self.max_len, config.page_size)
        num_pages = config.num_pages or config.max_batch * self.pages_per_sequence
        self.allocator = PageAllocator(num_pages, config.page_size)
        self._new_pools()
        self.buckets = tuple(config.decode_buckets) or buckets_for(config.max_batch)
        self.splits = {sum(s): tuple(s) for s in config.splits}
        for rows, split in self.splits.items():
            if rows not in self.buckets or min(split) < 1:
                raise ValueError(f"nano-batch split {split} must be positive sizes adding up to a decode bucket "
                                 f"{self.buckets}")
        self._cv = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []  # admission order: the last is preempted first
        self._ids = itertools.count()
        self._programs: dict = {}
        self._jit = partial(jax.jit, compiler_options=compiler_options(config.ynn_dots))
        self._write = self._jit(write_step, donate_argnums=(0,))
        self._thread: threading.Thread | None = None
        self._stop = False
        self.draining = False
        self.counters = collections.Counter()
        self.spec_accepted_at = np.zeros(self.spec_width, np.int64)  # rounds that accepted draft j (speculative)
        # Tokens and ends recorded by the engine thread, handed to the sequences' streams once the next step's
        # program is dispatched (`_deliver`): the HTTP threads that wake on them then run beside the device,
        # instead of holding the interpreter while the engine plans its next step.
        self._outbox: list[tuple[Sequence, int | None]] = []

    # ----- requests -----
    def check(self, request: Request) -> None:
        """Host-side checks; a ValueError's message says what to change."""
        prompt, vocab = request.prompt, self.model.config.vocab_size
        if not isinstance(prompt, list) or not prompt:
            raise ValueError("the prompt is empty; give at least one token")
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}) for this model")
        if not isinstance(request.max_tokens, int) or request.max_tokens < 1:
            raise ValueError(f"max_tokens={request.max_tokens!r} must be an integer >= 1")
        if len(prompt) + request.max_tokens > self.max_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({request.max_tokens}) exceeds the "
                             f"context length {self.max_len}; shorten the prompt or ask for fewer tokens")
        need = -(-min(len(prompt) + request.max_tokens + self._lookahead, self.max_len) // self.config.page_size)
        if need > self.allocator.num_pages:
            raise ValueError(f"this request needs {need} KV pages, the pool has {self.allocator.num_pages}")
        if request.timeout_s is not None and not request.timeout_s > 0:
            raise ValueError(f"timeout_s={request.timeout_s} must be > 0")
        SamplingParams.make(1, temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
                            seed=request.seed)  # a seed beyond int64 would fail the whole step, not one request

    def submit(self, request: Request) -> Sequence:
        """Queue a request; raises ValueError (bad request) or EngineBusy (try again later)."""
        self.check(request)
        with self._cv:
            if self.draining or self._stop:
                raise EngineBusy("the server is shutting down", status=503, retry_after_s=5.0)
            if len(self._waiting) >= self.config.max_queue:
                self.counters["rejected_queue_full"] += 1
                raise EngineBusy(f"the request queue is full ({self.config.max_queue} waiting); retry later",
                                 status=429, retry_after_s=1.0)
            pages = sum(self._pages_for(s.context_len + 1) for s in self._waiting)
            limit = self.config.max_queued_pools * self.allocator.num_pages
            if self._waiting and pages + self._pages_for(len(request.prompt) + 1) > limit:
                self.counters["rejected_kv_full"] += 1
                raise EngineBusy(f"the KV page pool is full: the queued requests need {pages} pages, "
                                 f"{self.config.max_queued_pools:g}x the pool; retry later", status=503,
                                 retry_after_s=2.0)
            seq = Sequence(next(self._ids), request)
            self._waiting.append(seq)
            self.counters["requests"] += 1
            self.counters["prompt_tokens"] += len(request.prompt)
            self._cv.notify_all()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """End a request at the next step (its pages return to the pool); a finished one is left as is."""
        with self._cv:
            seq.cancel_requested = True
            self._cv.notify_all()

    def generate(self, requests: list[Request], timeout_s: float | None = None) -> list[Sequence]:
        """Submit every request and wait for all (in the background thread if started, else here)."""
        seqs = [self.submit(r) for r in requests]
        if self._thread is None:
            self.run_until_idle()
        for s in seqs:
            if not s.wait(timeout_s):
                raise TimeoutError(f"request {s.id} did not finish in {timeout_s} s")
        return seqs

    # ----- state -----
    def snapshot(self) -> dict:
        with self._cv:
            return {"waiting": len(self._waiting), "running": len(self._running),
                    "pages_in_use": self.allocator.num_pages - self.allocator.num_free,
                    "pages_total": self.allocator.num_pages, **self.counters}

    def speculative_metrics(self) -> dict:
        """Acceptance of the speculative rounds so far: overall, per draft position, tokens per target forward."""
        with self._cv:
            rounds, accepted = self.counters["spec_rounds"], self.counters["spec_accepted"]
            at = self.spec_accepted_at.copy()
        drafted = rounds * self.spec_width
        emitted = accepted + rounds  # each round adds its accepted drafts and the target's token
        out = {"rounds": rounds, "acceptance": accepted / drafted if drafted else 0.0,
               "acceptance_by_position": (at / rounds).tolist() if rounds else [0.0] * len(at),
               "mean_accepted": accepted / rounds if rounds else 0.0,
               "target_forwards_per_token": rounds / emitted if emitted else 0.0}
        if self.config.speculative in ("self", "triforce"):
            out["retrieval_rebuilds"] = self.counters["spec_rebuilds"]
        if self.config.speculative == "triforce":  # the draft model's proposals to the retrieval level
            inner = self.counters["spec_inner_drafted"]
            out["draft_acceptance"] = self.counters["spec_inner_accepted"] / inner if inner else 0.0
        return out

    def idle(self) -> bool:
        with self._cv:
            return not self._waiting and not self._running

    def _new_pools(self) -> None:
        """Empty page pools for the model (and the draft model), the allocator's geometry."""
        pages, size = self.allocator.num_pages, self.config.page_size
        self.pools = empty_pools(self.model.config, pages, size)
        self.draft_pools = empty_pools(self.draft.config, pages, size) if self.draft is not None else None

    def _bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    @staticmethod
    def _filters(seqs) -> bool:
        """Whether any of these sequences samples with top-k or top-p (a static switch of the programs)."""
        return any(s.request.top_k > 0 or s.request.top_p < 1 for s in seqs)

    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.config.page_size)

    @property
    def _lookahead(self) -> int:
        """Positions past the next token that a decode step writes (the drafted tokens)."""
        return self.spec_width - 1 if self.config.speculative != "none" else 0

    # ----- the loop -----
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="jaxsys-engine", daemon=True)
            self._thread.start()

    def stop(self, *, drain: bool = True, timeout_s: float | None = None) -> None:
        """Stop the background thread; with `drain`, in-flight and queued requests finish first."""
        with self._cv:
            self.draining = True
            if not drain:
                for s in [*self._waiting, *self._running]:
                    s.cancel_requested = True
            self._cv.notify_all()
        deadline = None if timeout_s is None else time.perf_counter() + timeout_s
        while self._thread is not None and not self.idle():
            if deadline is not None and time.perf_counter() > deadline:
                break
            time.sleep(0.01)
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._cv:  # stopped: it may be started (or driven by run_until_idle) again
            self._stop = self.draining = False

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._waiting and not self._running:
                    self._deliver()
                    self._cv.wait()
                if self._stop:
                    for s in [*self._waiting, *self._running]:
                        self._finish(s, CANCELLED)
                    self._deliver()
                    return
            self.step()

    def run_until_idle(self) -> None:
        while not self.idle():
            self.step()
        self._deliver()

    def step(self) -> None:
        """One scheduling round: expire, admit, plan (allocating pages), run one program, record."""
        with self._cv:
            self._expire(time.perf_counter())
            self._admit()
            decode, prefill = self._plan()
        if not decode and not prefill:
            self._deliver()
            time.sleep(0.001)
            return
        try:
            if self.config.speculative == "draft":
                dec_tokens, pre_tokens = self._run_speculative(decode, prefill)
            elif self.config.speculative in ("self", "triforce"):
                dec_tokens, pre_tokens = self._run_self(decode, prefill)
            else:
                dec_tokens, pre_tokens = self._run(decode, prefill)
        except Exception as e:  # noqa: BLE001 - every request in the step gets the error, none hangs
            log.exception("serving step failed")
            with self._cv:
                failed = decode + [s for s, _ in prefill]
                if any(leaf.is_deleted() for leaf in jax.tree.leaves((self.pools, self.draft_pools))):
                    self._new_pools()  # every sequence's KV is gone
                    failed = list(self._running)
                for s in failed:
                    self._finish(s, ERROR, f"serving step failed: {e}")
                self._deliver()
            return
        with self._cv:
            self.counters["steps"] += 1
            for s, tokens in zip(decode, dec_tokens):
                for token in tokens:  # one, or a speculative round's accepted drafts and the target's token
                    if s.finish_reason is not None:
                        break
                    s.cached += 1
                    self._append(s, int(token))
            for (s, n), token in zip(prefill, pre_tokens):
                s.cached += n
                if s.cached == s.context_len:
                    self._append(s, int(token))

    def _expire(self, now: float) -> None:
        for s in list(self._waiting) + list(self._running):
            if s.cancel_requested:
                self._finish(s, CANCELLED)
            elif s.deadline is not None and now > s.deadline:
                self._finish(s, TIMEOUT)

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.config.max_batch:
            s = self._waiting[0]
            if self._pages_for(s.context_len + 1) > self.allocator.num_free:
                return
            self._waiting.popleft()
            self._running.append(s)

    def _plan(self) -> tuple[list[Sequence], list[tuple[Sequence, int]]]:
        """Decode rows and prefill (sequence, tokens) of this step, with pages allocated for their tokens."""
        decode, prefill = [], []
        for s in list(self._running):
            if s not in self._running:
                continue  # preempted below for an older sequence
            remaining = s.context_len - s.cached
            if remaining > 1 and len(prefill) >= self.config.prefill_lanes:
                continue
            n = 1 if remaining == 1 else min(remaining, self.config.prefill_chunk)
            ahead = self._lookahead if remaining == 1 else 0
            if not self._allocate(s, min(s.cached + n + ahead, self.max_len)):
                continue
            (decode.append(s) if remaining == 1 else prefill.append((s, n)))
        return decode, prefill

    def _allocate(self, s: Sequence, tokens: int) -> bool:
        """Pages for `tokens` tokens of `s`, preempting the newest sequences; False if `s` itself was."""
        while True:
            try:
                self.allocator.allocate(s.id, tokens)
                return True
            except PagePoolExhausted:
                victim = self._running[-1]
                self._preempt(victim)
                if victim is s:
                    return False

    def _preempt(self, s: Sequence) -> None:
        if self.allocator.pages(s.id):
            self.allocator.free(s.id)
        s.cached = 0
        s.retrieval = None  # its next prefill gives the query of a new selection
        s.preemptions += 1
        self.counters["preemptions"] += 1
        self._running.remove(s)
        self._waiting.appendleft(s)

    def _append(self, s: Sequence, token: int) -> None:
        s.generated.append(token)
        self.counters["generated_tokens"] += 1
        if s.first_token_at is None:
            s.first_token_at = time.perf_counter()
        self._outbox.append((s, token))
        if token in s.request.stop_ids:
            self._finish(s, STOP)
        elif len(s.generated) >= s.request.max_tokens:
            self._finish(s, LENGTH)

    def _finish(self, s: Sequence, reason: str, error: str | None = None) -> None:
        if s.finish_reason is not None:
            return
        if self.allocator.pages(s.id):
            self.allocator.free(s.id)
        if s in self._running:
            self._running.remove(s)
        elif s in self._waiting:
            self._waiting.remove(s)
        s.finish_reason, s.error, s.finished_at = reason, error, time.perf_counter()
        self.counters[f"finished_{reason}"] += 1
        self._outbox.append((s, None))
        self._cv.notify_all()

    def _deliver(self) -> None:
        """Hand the recorded tokens and ends to the sequences' streams, in order (an end also sets `done`)."""
        out, self._outbox = self._outbox, []
        for s, item in out:
            s._events.put(item)
            if item is None:
                s.done.set()

    # ----- device work -----
    def _program(self, rows: int, has_prefill: bool, filters: bool, split: tuple[int, ...] | None = None):
        if split is None:
            split = self.splits.get(rows, (rows,)) if rows else ()
        key = (rows, has_prefill, filters, split)
        if key not in self._programs:
            step = partial(serving_step, self.model, split=split, filters=filters, impl=self.config.attention_impl,
                           streams=self.config.streams)
            self._programs[key] = self._jit(step)
        return self._programs[key]

    def _step(self, program, dec: Lane | None, pre: Lane | None):
        """Run a step program, then store its new keys/values (pools donated to the write program)."""
        dec_tokens, pre_tokens, writes = program(self.params, self.pools, dec, pre)
        self.pools = self._write(self.pools, writes)
        self._deliver()  # the last step's tokens, while this one runs
        return dec_tokens, pre_tokens

    def warmup(self, *, filters: tuple[bool, ...] = (False,)) -> int:
        """Compile (by running once on rows that write nowhere) every step program; returns how many."""
        count = 0
        if self.config.speculative in ("self", "triforce"):
            for f in filters:
                for rows in self.buckets:
                    self._run_self_lanes(self._lane(rows, 2, []), *self._retrieval_inputs([], rows), None, f)
                    count += 1
                for lanes in range(1, self.config.prefill_lanes + 1):
                    self._run_self_lanes(None, None, None, None, None, None,
                                         self._lane(lanes, self.config.prefill_chunk, []), f)
                    count += 1
            jax.block_until_ready(self.pools)
            return count
        if self.draft is not None:
            for f in filters:
                for rows in self.buckets:
                    self._run_speculative_lanes(self._lane(rows, 2, []), np.zeros(rows, np.int32), None, f)
                    count += 1
                for lanes in range(1, self.config.prefill_lanes + 1):
                    self._run_speculative_lanes(None, None, self._lane(lanes, self.config.prefill_chunk, []), f)
                    count += 1
            jax.block_until_ready(self.pools)
            return count
        for rows in (0, *self.buckets):
            for lanes in range(self.config.prefill_lanes + 1):
                if not rows and not lanes:
                    continue
                for f in filters:
                    dec = self._lane(rows, 1, []) if rows else None
                    pre = self._lane(lanes, self.config.prefill_chunk, []) if lanes else None
                    jax.block_until_ready(self._step(self._program(rows, bool(lanes), f), dec, pre))
                    count += 1
        return count

    def time_decode(self, split: tuple[int, ...], *, context: int | None = None, repeats: int = 5) -> float:
        """Median seconds of one decode-only step of sum(split) rows at `context` tokens, with this split.

        Every row reads and writes the same pages (the pool's content is scratch until a
        sequence writes it), so call this before serving, not while sequences hold pages.
        """
        rows = sum(split)
        context = min(context or self.max_len // 2, self.max_len - 1)
        table = np.broadcast_to(np.arange(self.pages_per_sequence) % self.allocator.num_pages,
                                (rows, self.pages_per_sequence))
        zeros = np.zeros(rows, np.int32)
        lane = Lane(jnp.asarray(zeros[:, None]), jnp.full((rows, 1), context, jnp.int32),
                    jnp.asarray(table, jnp.int32), jnp.asarray(zeros),
                    SamplingParams.make(rows))
        program = self._program(rows, False, False, tuple(split))

        def run():
            return self._step(program, lane, None)[0]
        return time_call(run, repeats=repeats)

    def search_splits(self, rows: int | None = None, *, context: int | None = None, max_parts: int = 4):
        """The automatic nano-batch search (`jaxsys.nanobatch.search_split`) for `rows` decode rows; adopts the best."""
        rows = rows or self.config.max_batch
        result = search_split(lambda split: self.time_decode(split, context=context), rows, max_parts=max_parts)
        self.splits[rows] = result.best
        return result

    def _lane(self, rows: int, width: int, items: list[tuple[Sequence, int]], start=None) -> Lane:
        """Rows of `n` tokens from each sequence's position `start(s)` (default: its first uncached token)."""
        tokens = np.zeros((rows, width), np.int32)
        positions = np.full((rows, width), -1, np.int32)
        select = np.zeros(rows, np.int32)
        table = np.full((rows, self.pages_per_sequence), self.allocator.num_pages, np.int32)
        temp, top_k, top_p, seed = np.zeros(rows, np.float32), np.zeros(rows, np.int32), \
            np.ones(rows, np.float32), np.zeros(rows, np.int64)
        for row, (s, n) in enumerate(items):
            first = s.cached if start is None else start(s)
            lo = max(first, 0)  # positions before 0 stay padding
            tokens[row, lo - first:n] = s.context(lo, first + n)
            positions[row, lo - first:n] = np.arange(lo, first + n)
            select[row] = n - 1
            table[row] = self.allocator.page_table([s.id], self.pages_per_sequence)[0]
            r = s.request
            temp[row], top_k[row], top_p[row], seed[row] = r.temperature, r.top_k, r.top_p, r.seed
        # NumPy leaves, as every per-step input: the compiled step's call moves them to the device (a jnp.asarray
        # each: ~0.1 ms of Python dispatch per array, paid on every step).
        sp = SamplingParams(temp, top_k, top_p, seed.astype(np.uint32).astype(np.int32))
        return Lane(tokens, positions, table, select, sp)

    def _prefill_lane(self, prefill: list[tuple[Sequence, int]]) -> Lane:
        """One lane per prefilling sequence (a program per lane count: an idle lane would cost a full chunk)."""
        return self._lane(len(prefill), self.config.prefill_chunk, prefill)

    def _spec_program(self, kind: str, rows: int, filters: bool):
        key = ("speculative", kind, rows, filters)
        if key not in self._programs:
            from jaxsys import spec_serving
            if kind == "decode":
                step = partial(spec_serving.spec_decode_step, self.model, self.draft, gamma=self.config.gamma,
                               max_len=self.max_len, filters=filters)
            else:
                step = partial(spec_serving.spec_prefill_step, self.model, self.draft, filters=filters)
            self._programs[key] = self._jit(step, donate_argnums=(3,))  # the draft pools update in place
        return self._programs[key]

    def _run_speculative(self, decode: list[Sequence], prefill: list[tuple[Sequence, int]]):
        """A speculative round for the decode rows, then the prefill lanes (target and draft model)."""
        filters = self._filters(decode + [s for s, _ in prefill])
        dec = pre = rounds = None
        if decode:
            rows = self._bucket(len(decode))
            dec = self._lane(rows, 2, [(s, 2) for s in decode], start=lambda s: s.cached - 1)
            rounds = np.zeros(rows, np.int32)
            rounds[:len(decode)] = [s.rounds for s in decode]
        if prefill:
            pre = self._prefill_lane(prefill)
        out, pre_tokens = self._run_speculative_lanes(dec, rounds, pre, filters)
        dec_tokens = []
        if decode:
            drafted, k, token = (np.asarray(x) for x in out)
            dec_tokens = [self._record_round(s, drafted[i], k[i], token[i]) for i, s in enumerate(decode)]
        return dec_tokens, np.asarray(pre_tokens)[:len(prefill)] if prefill else []

    def _run_speculative_lanes(self, dec: Lane | None, rounds, pre: Lane | None, filters: bool):
        """Run the speculative decode program (then the target's writes) and the prefill program on lanes."""
        out = pre_tokens = None
        if dec is not None:
            rows = dec.tokens.shape[0]
            drafted, k, token, writes, self.draft_pools = self._spec_program("decode", rows, filters)(
                self.params, self.draft_params, self.pools, self.draft_pools, dec, rounds)
            self.pools = self._write(self.pools, writes)
            out = drafted, k, token
        if pre is not None:
            pre_tokens, writes, self.draft_pools = self._spec_program("prefill", pre.tokens.shape[0], filters)(
                self.params, self.draft_params, self.pools, self.draft_pools, pre)
            self.pools = self._write(self.pools, writes)
        self._deliver()  # the last step's tokens, while these programs run
        return out, pre_tokens

    def _record_round(self, s: Sequence, drafted, k: int, token: int) -> list[int]:
        """Count a sequence's speculative round; its new tokens: the accepted drafts and the verifier's token."""
        s.rounds += 1
        self.counters["spec_rounds"] += 1
        self.counters["spec_accepted"] += int(k)
        self.spec_accepted_at[:k] += 1
        return [*drafted[:k].tolist(), int(token)]

    # ----- self-speculation and TriForce (`jaxsys.spec_serving`) -----
    def _self_program(self, kind: str, rows: int, filters: bool):
        key = (self.config.speculative, kind, rows, filters)
        if key not in self._programs:
            from jaxsys import spec_serving
            c = self.config
            if c.speculative == "self" and kind == "decode":
                step = self._jit(partial(spec_serving.self_decode_step, self.model, gamma=c.gamma,
                                         max_len=self.max_len, filters=filters, window_pages=self.window_pages))
            elif c.speculative == "self":
                step = self._jit(partial(spec_serving.self_prefill_step, self.model, filters=filters))
            elif kind == "decode":
                step = self._jit(partial(spec_serving.triforce_decode_step, self.model, self.draft, gamma=c.gamma,
                                         gamma_outer=c.gamma_outer, max_len=self.max_len, filters=filters,
                                         window_pages=self.window_pages, draft_window=c.draft_window,
                                         draft_window_pages=self.draft_window_pages))
            else:  # the draft pools update in place
                step = self._jit(partial(spec_serving.triforce_prefill_step, self.model, self.draft,
                                         filters=filters), donate_argnums=(3,))
            self._programs[key] = step
        return self._programs[key]

    def _needs_selection(self, s: Sequence) -> bool:
        """A new retrieval selection: the first round, every `rebuild_every` rounds, after a poorly accepted
        round, or when the tokens committed since the last one would overflow the window."""
        r, c = s.retrieval, self.config
        if r is None or r.get("chunks") is None:
            return True
        since = s.context_len - 2 - r["base"]
        return (r["since"] >= c.rebuild_every or r["rate"] < c.rebuild_below
                or since > (self.window_pages - 1) * c.page_size)

    def _retrieval_inputs(self, decode: list[Sequence], rows: int):
        """Per-row (rounds, chunks, base, query, rebuild) arrays of a self-speculative round."""
        c = self.model.config
        kept = self.config.retrieval_budget // self.config.page_size
        rounds = np.zeros(rows, np.int32)
        chunks = np.zeros((rows, c.n_layers, c.n_kv_heads, kept), np.int32)
        base = np.zeros(rows, np.int32)
        query = np.zeros((rows, c.n_layers, c.n_heads, c.resolved_head_dim), np.float32)
        rebuild = np.zeros(rows, bool)
        for i, s in enumerate(decode):
            rounds[i] = s.rounds
            r = s.retrieval or {}
            rebuild[i] = self._needs_selection(s)
            if not rebuild[i]:
                chunks[i], base[i] = r["chunks"], r["base"]
            if r.get("query") is not None:
                query[i] = r["query"]
        return rounds, chunks, base, query, rebuild

    def _run_self(self, decode: list[Sequence], prefill: list[tuple[Sequence, int]]):
        """A self-speculative round for the decode rows, then the prefill lanes (which give each finished
        prompt's query for its first selection)."""
        filters = self._filters(decode + [s for s, _ in prefill])
        dec, inputs = None, (None,) * 5
        if decode:
            rows = self._bucket(len(decode))
            dec = self._lane(rows, 2, [(s, 2) for s in decode], start=lambda s: s.cached - 1)
            inputs = self._retrieval_inputs(decode, rows)
        pre = self._prefill_lane(prefill) if prefill else None
        out, pre_out = self._run_self_lanes(dec, *inputs, pre, filters)
        dec_tokens = []
        if decode:
            drafted, k, token, query, chunks, base, inner = (None if x is None else np.asarray(x) for x in out)
            rebuild = inputs[-1]
            for i, s in enumerate(decode):
                dec_tokens.append(self._record_round(s, drafted[i], k[i], token[i]))
                r = s.retrieval if s.retrieval is not None else {}
                if rebuild[i]:
                    r.update(chunks=chunks[i], base=int(base[i]), since=0)
                    self.counters["spec_rebuilds"] += 1
                r.update(query=query[i], since=r["since"] + 1, rate=k[i] / self.spec_width)
                s.retrieval = r
                if inner is not None:
                    self.counters["spec_inner_drafted"] += int(inner[i, 0])
                    self.counters["spec_inner_accepted"] += int(inner[i, 1])
        pre_tokens = []
        if prefill:
            tokens, query = (np.asarray(x) for x in pre_out)
            for i, (s, n) in enumerate(prefill):
                if s.cached + n == s.context_len:  # the prompt is in: its last token's query scores the pages
                    s.retrieval = {"query": query[i], "chunks": None}
            pre_tokens = tokens[:len(prefill)]
        return dec_tokens, pre_tokens

    def _run_self_lanes(self, dec: Lane | None, rounds, chunks, base, query, rebuild, pre: Lane | None,
                        filters: bool):
        out = pre_out = None
        triforce = self.config.speculative == "triforce"

        def models():  # the pools as they are now (each program's writes replace them)
            return (self.params, self.draft_params, self.pools, self.draft_pools) if triforce else \
                (self.params, self.pools)
        if dec is not None:
            program = self._self_program("decode", dec.tokens.shape[0], filters)
            drafted, k, token, writes, *rest = program(*models(), dec, rounds, chunks, base, query, rebuild)
            self.pools = self._write(self.pools, writes)
            if triforce:
                draft_writes, *rest = rest
                self.draft_pools = self._write(self.draft_pools, draft_writes)
            else:
                rest.append(None)  # no inner level
            out = (drafted, k, token, *rest)
        if pre is not None:
            tokens, writes, query, *draft_pools = self._self_program("prefill", pre.tokens.shape[0], filters)(
                *models(), pre)
            if triforce:
                self.draft_pools = draft_pools[0]
            self.pools = self._write(self.pools, writes)
            pre_out = tokens, query
        self._deliver()  # the last step's tokens, while these programs run
        return out, pre_out

    def _run(self, decode: list[Sequence], prefill: list[tuple[Sequence, int]]):
        rows = self._bucket(len(decode)) if decode else 0
        filters = self._filters(decode + [s for s, _ in prefill])
        dec = self._lane(rows, 1, [(s, 1) for s in decode]) if decode else None
        pre = self._prefill_lane(prefill) if prefill else None
        dec_tokens, pre_tokens = self._step(self._program(rows, bool(prefill), filters), dec, pre)
        dec_tokens = [[t] for t in np.asarray(dec_tokens)[:len(decode)].tolist()] if decode else []
        pre_tokens = np.asarray(pre_tokens)[:len(prefill)] if prefill else []
        return dec_tokens, pre_tokens
