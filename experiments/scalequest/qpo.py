"""Question preference optimization (ScaleQuest's QPO): preference pairs of questions, and DPO.

ScaleQuest asks a strong model to rewrite questions into better ones and prefers the
rewrite; here the preferences come from labels instead, with no rewriting model: a question
the verifier solves in at least `min_steps` operations and the solver gets right in some but
not all of its samples is *chosen* (the questions the pipeline keeps and learns from); an
unsolvable question, or a trivial one (fewer operations, or one the solver never fails), is
*rejected*; one the solver never gets right has no label (too hard for it, or phrased in a
way it cannot read: the samples cannot tell which). The policy and the frozen reference both
start from the QFT model; the loss is `jaxsys.preference.dpo_loss` over the question tokens
only.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsys.config import ModelConfig
from jaxsys.data.tokenizer import Tokenizer
from jaxsys.model import ModelDef
from jaxsys.preference import dpo_loss, sequence_logprobs
from jaxsys.train import TrainConfig, make_optimizer

from experiments.scalequest.models import QUESTION_PREFIX, question_document

log = logging.getLogger("scalequest")


@dataclass(frozen=True)
class QPOConfig:
    steps: int = 40
    pairs_per_step: int = 8
    learning_rate: float = 2e-4  # with DPO alone at 5e-4 the sampled questions collapsed (README)
    beta: float = 0.1
    # Weight of the chosen questions' mean per-token negative log-likelihood added to the DPO
    # loss (RPO, Pang et al. 2024): DPO alone can widen the margin by lowering both sequences,
    # which here collapsed the sampled questions onto a few near-copies.
    nll_weight: float = 1.0
    seq_len: int = 256  # question tokens beyond it are cut (and not scored)
    seed: int = 0


def label(record: dict, attempt: dict | None, *, min_steps: int) -> str | None:
    """"chosen", "rejected" or None (no label) for one sampled question.

    `record` is its static-filter record, `attempt` its solver attempts (None when the
    question was dropped before the solver saw it)."""
    if record["dropped_by"] in ("format", "solvable"):
        return "rejected"  # unsolvable
    if record.get("steps", 0) < min_steps:
        return "rejected"  # trivial by the verifier's count
    if attempt is None:
        return None  # a duplicate or contaminated question: no solver label
    if attempt["failure_rate"] == 0:
        return "rejected"  # trivial for the solver
    if attempt["failure_rate"] == 1:
        return None  # never answered: no response to learn from, and no sign why
    return "chosen"


def make_pairs(chosen: list[str], rejected: list[str], *, seed: int) -> list[dict]:
    """Each chosen question once, against a rejected one drawn in turn from a shuffled list."""
    if not chosen or not rejected:
        return []
    rng = random.Random(seed)
    rejected = rejected[:]
    rng.shuffle(rejected)
    return [{"chosen": c, "rejected": rejected[i % len(rejected)]} for i, c in enumerate(chosen)]


def encode_questions(questions: list[str], tokenizer: Tokenizer, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """tokens [n, seq_len + 1] (BOS, prefix, question, EOS, pad) and mask [n, seq_len]: 1 on the
    targets that are question or EOS tokens, the part of the sequence the question model writes."""
    prefix = len(tokenizer.encode(QUESTION_PREFIX, add_bos=True))
    tokens = np.full((len(questions), seq_len + 1), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(questions), seq_len), np.float32)
    for i, q in enumerate(questions):
        ids = tokenizer.encode(question_document(q), add_bos=True, add_eos=True)[:seq_len + 1]
        tokens[i, :len(ids)] = ids
        mask[i, prefix - 1:len(ids) - 1] = 1.0  # target t + 1 is scored at t
    return tokens, mask


def train_dpo(config: ModelConfig, tokenizer: Tokenizer, reference_params, pairs: list[dict],
              qc: QPOConfig) -> tuple[dict, list[dict]]:
    """DPO from the reference; returns (policy params, one metrics row per step)."""
    model = ModelDef(config)
    chosen, chosen_mask = encode_questions([p["chosen"] for p in pairs], tokenizer, qc.seq_len)
    rejected, rejected_mask = encode_questions([p["rejected"] for p in pairs], tokenizer, qc.seq_len)
    logprobs = jax.jit(lambda params, t, m: sequence_logprobs(model, params, t, m))
    ref_chosen = np.concatenate([np.asarray(logprobs(reference_params, chosen[i:i + 32], chosen_mask[i:i + 32]))
                                 for i in range(0, len(pairs), 32)])
    ref_rejected = np.concatenate([np.asarray(logprobs(reference_params, rejected[i:i + 32],
                                                       rejected_mask[i:i + 32]))
                                   for i in range(0, len(pairs), 32)])
    tx = make_optimizer(TrainConfig(steps=qc.steps, learning_rate=qc.learning_rate,
                                    warmup_steps=max(1, qc.steps // 10), weight_decay=0.0))

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(p):
            tokens = jnp.concatenate([batch["chosen"], batch["rejected"]])  # one forward for both
            mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
            lp = sequence_logprobs(model, p, tokens, mask)
            n = batch["chosen"].shape[0]
            loss, metrics = dpo_loss(lp[:n], lp[n:], batch["ref_chosen"], batch["ref_rejected"], beta=qc.beta)
            nll = -jnp.mean(lp[:n] / batch["chosen_mask"].sum(-1))
            return loss + qc.nll_weight * nll, {**metrics, "dpo_loss": loss, "chosen_nll": nll}
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, **metrics}

    params = jax.tree.map(jnp.asarray, reference_params)
    opt_state = tx.init(params)
    rng = np.random.default_rng(qc.seed)
    rows = []
    for i in range(qc.steps):
        pick = rng.choice(len(pairs), size=qc.pairs_per_step, replace=len(pairs) < qc.pairs_per_step)
        batch = {"chosen": chosen[pick], "chosen_mask": chosen_mask[pick], "rejected": rejected[pick],
                 "rejected_mask": rejected_mask[pick], "ref_chosen": ref_chosen[pick],
                 "ref_rejected": ref_rejected[pick]}
        params, opt_state, metrics = step(params, opt_state, batch)
        rows.append({"step": i + 1, **{k: float(v) for k, v in metrics.items()}})
        if (i + 1) % 10 == 0 or i + 1 == qc.steps:
            log.info("qpo step %d/%d %s", i + 1, qc.steps, {k: round(v, 4) for k, v in rows[-1].items()})
    return jax.device_get(params), rows
