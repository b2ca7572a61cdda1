"""Preference optimization of sequences: per-sequence log-probabilities and the DPO loss.

Direct Preference Optimization (Rafailov et al., 2023) trains a policy on (chosen,
rejected) pairs against a frozen reference model: with ``r(y) = log pi(y) - log ref(y)``
summed over the scored tokens of y, the loss is ``-log sigmoid(beta * (r(chosen) -
r(rejected)))``. ScaleQuest's question preference optimization (QPO) applies it to
questions alone; `experiments/scalequest/` uses it that way. The reference log-probs are
computed once before training (they never change), so a step runs only the policy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsys.model import ModelDef


def sequence_logprobs(model: ModelDef, params, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum of log p(token) over the scored tokens of each sequence.

    tokens: [batch, seq + 1] int; mask: [batch, seq], 1 where target ``tokens[:, t + 1]``
    counts (so a prompt prefix and the padding are left out). Returns [batch] float32.
    """
    logits, _ = model.apply(params, tokens[:, :-1])  # [B, T, V]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    target = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, T]
    return jnp.sum(target * mask.astype(jnp.float32), axis=-1)


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, reference_chosen: jax.Array,
             reference_rejected: jax.Array, *, beta: float) -> tuple[jax.Array, dict]:
    """Mean DPO loss over pairs of sequence log-probs (each [pairs]), and its metrics.

    Its gradient raises the policy's log-prob of the chosen sequence and lowers that of the
    rejected one, weighted by ``sigmoid(-margin)``: pairs the policy already ranks well by a
    wide margin barely move it.
    """
    if beta <= 0:
        raise ValueError(f"{beta=} must be positive (it scales the implicit reward)")
    margin = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    loss = -jnp.mean(jax.nn.log_sigmoid(margin))
    return loss, {"margin": jnp.mean(margin), "pair_accuracy": jnp.mean(margin > 0)}
