"""Training and batched sampling for the pipeline, on jaxsys's training loop and decoder.

Every model here is trained by `jaxsys.train.train` on formatted documents, in windows that
each start at a document (`DocumentWindows`), with checkpoints under the run folder so a
cut-off stage resumes where it stopped; every sample comes from one compiled
`jaxsys.decode.Decoder` per (batch, cache length) whose parameters are swapped between
models of the same shape, so a new model costs no new compilation.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import numpy as np

from jaxsys.config import ModelConfig
from jaxsys.data.tokenizer import Tokenizer
from jaxsys.data.training_text import extract_answer, format_prompt
from jaxsys.decode import Decoder
from jaxsys.model import ModelDef
from jaxsys.sampling import SamplingParams
from jaxsys.train import TrainConfig, train

log = logging.getLogger("scalequest")
QUESTION_PREFIX = "Question:"  # the empty user turn that question sampling starts from


def question_document(question: str) -> str:
    """QFT training text: a question alone, after the prefix a solver's prompt starts with."""
    return f"{QUESTION_PREFIX} {question}"


class DocumentWindows:
    """Training windows that each start at a document's BOS, for `jaxsys.train`.

    `jaxsys.data.TokenDataset` cuts its token stream every ``seq_len`` tokens, so with
    examples about as long as a window most windows hold the end of one example and the
    start of the next, and the answer is mostly predicted without its question in context.
    Here window i of an epoch starts at the i-th document of that epoch's permutation and
    runs on into the next ones (the stream wraps around), so every window holds one whole
    example when ``seq_len`` covers it; an epoch is one window per document.
    """

    def __init__(self, docs: list[str], tokenizer: Tokenizer, *, seq_len: int, batch_size: int, seed: int = 0):
        if not docs:
            raise ValueError("no documents to train on; add data")
        encoded = tokenizer.encode_batch(docs, add_bos=True, add_eos=True)
        self.starts = np.cumsum([0] + [len(ids) for ids in encoded[:-1]])
        stream = np.concatenate([np.asarray(ids, np.int32) for ids in encoded])
        self.tokens = np.resize(stream, len(stream) + seq_len + 1)  # wraps: every start has a full window
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed

    def batch(self, step: int) -> np.ndarray:
        """int32 [batch_size, seq_len + 1]; a pure function of (seed, step)."""
        samples = step * self.batch_size + np.arange(self.batch_size)
        epochs, positions = np.divmod(samples, len(self.starts))
        orders = {e: np.random.default_rng((self.seed, e)).permutation(len(self.starts))
                  for e in set(epochs.tolist())}  # a batch spans at most a few epochs
        docs = np.array([orders[e][i] for e, i in zip(epochs.tolist(), positions)])
        return self.tokens[self.starts[docs][:, None] + np.arange(self.seq_len + 1)]


def train_lm(ckpt_dir: Path, config: ModelConfig, tokenizer: Tokenizer, docs: list[str], tc: TrainConfig, mesh, *,
             init_params=None) -> tuple[dict, dict]:
    """Trains (or resumes, or reads back) a language model on `docs`; (params, summary)."""
    data = DocumentWindows(docs, tokenizer, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=tc.seed)
    t0, cpu0 = time.perf_counter(), time.process_time()
    result = train(config, tc, mesh, data, ckpt_dir=ckpt_dir, resume=True, init_params=init_params,
                   meta={"data": f"{len(docs)} documents"})
    if result.stopped_by_signal:  # not a finished stage: stop here; a rerun resumes from the checkpoint
        raise SystemExit(f"stopped by SIGTERM at step {result.end_step} of {tc.steps}; saved in {ckpt_dir}, "
                         "rerun the same command to resume")
    summary = {"steps": result.end_step, "documents": len(docs), "tokens": int(len(data.tokens) - tc.seq_len - 1),
               "first_loss": result.losses[0] if result.losses else None,
               "last_loss": result.losses[-1] if result.losses else None,
               "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0}
    return jax.device_get(result.state["params"]), summary


def save_params(path: Path, params) -> None:
    leaves = jax.tree.leaves(params)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, *[np.asarray(x) for x in leaves])
    tmp.replace(path)


def load_params(path: Path, config: ModelConfig) -> dict:
    treedef = jax.tree.structure(ModelDef(config).shapes)
    with np.load(path) as data:
        return jax.tree.unflatten(treedef, [data[f"arr_{i}"] for i in range(treedef.num_leaves)])


class Sampler:
    """Batched generation of text continuations for any params of one model config."""

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer, *, batch: int, max_len: int):
        self.batch, self.max_len, self.tokenizer = batch, max_len, tokenizer
        self.decoder = Decoder(ModelDef(config), None, max_len=max_len, batch=batch, prefill_chunk=256)

    def complete(self, params, prompts: list[str], *, max_new_tokens: int, temperature: float,
                 seed: int) -> list[str]:
        """One continuation per prompt (up to EOS, which is dropped). Row i of the whole call
        samples with seed ``seed * 1_000_003 + i``, so equal prompts give different texts."""
        self.decoder.params = params
        ids = self.tokenizer.encode_batch(prompts, add_bos=True)
        texts: list[str] = []
        for start in range(0, len(ids), self.batch):
            chunk = ids[start:start + self.batch]
            n = len(chunk)
            chunk = chunk + [chunk[-1]] * (self.batch - n)  # the compiled batch is fixed
            longest = max(len(p) for p in chunk)
            if longest >= self.max_len:
                raise ValueError(f"a prompt of {longest} tokens does not fit the cache of {self.max_len}; "
                                 "filter long questions first or build the sampler with a longer max_len")
            # Compiled lengths come in steps of 32 tokens, so few programs are built.
            room = max_new_tokens if longest + max_new_tokens <= self.max_len else \
                max(1, (self.max_len - longest) // 32 * 32)
            sp = SamplingParams.make(self.batch, temperature=temperature,
                                     seed=seed * 1_000_003 + start + np.arange(self.batch))
            out = self.decoder.generate(chunk, max_new_tokens=room, sampling=sp,
                                        stop_ids=(self.tokenizer.eos_id,))
            tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
            texts += [self.tokenizer.decode(tokens[i, :lengths[i]]) for i in range(n)]
        return texts


def sample_questions(sampler: Sampler, params, n: int, *, temperature: float, seed: int) -> list[str]:
    """`n` questions written from the empty user turn (``Question:``)."""
    texts = sampler.complete(params, [QUESTION_PREFIX] * n, max_new_tokens=sampler.max_len - 16,
                             temperature=temperature, seed=seed)
    return [t.strip() for t in texts]


def solve_questions(sampler: Sampler, params, questions: list[str], *, k: int, temperature: float,
                    seed: int, max_new_tokens: int) -> list[list[str]]:
    """k sampled solutions per question."""
    prompts = [format_prompt(q) for q in questions for _ in range(k)]
    texts = sampler.complete(params, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                             seed=seed)
    return [[t.strip() for t in texts[i * k:(i + 1) * k]] for i in range(len(questions))]


def accuracy(sampler: Sampler, params, problems: list[dict], *, max_new_tokens: int) -> float:
    """Greedy decoding; a problem counts when the first ``Answer:`` line is its exact answer."""
    texts = sampler.complete(params, [format_prompt(p["question"]) for p in problems],
                             max_new_tokens=max_new_tokens, temperature=0.0, seed=0)
    return float(np.mean([extract_answer(t) == p["answer"] for t, p in zip(texts, problems)]))
