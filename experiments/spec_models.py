"""The benchmark pair for hierarchical speculative decoding: a long-context target and a tiny draft.

TriForce (Sun et al. 2024) pays off where a target's KV cache, not its weights, dominates
the bytes read per decoded token, and where the target needs far-back context (so its
retrieval-based sparse cache must find the right chunks). These two byte-level Llama
models are shaped and trained for that regime on `jaxsys.data.longctx`, whose documents
restate random facts thousands of bytes after stating them:

- the target (4 layers, dim 128) holds a KV cache at 4096 tokens several times its
  weights, and is trained first on short documents at 512 tokens (cheap: copying forms
  there), then on full documents at 2048 tokens and last on 4352-token windows (the
  benchmark decodes at 4096 + 128; trained to 2048 only, it failed past that length);
- the draft (2 layers, dim 48) has about a tenth of the target's parameters and only
  ever sees 512 tokens, as a StreamingLLM cache would give it.

`context_gain` shows the target uses its context: held-out loss with the whole document
visible against only the last 512 tokens (plus BOS as an attention sink), overall and on
the restated fact values.

    python -m experiments.spec_models [--quick] [--folder .cache/spec_models]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from jaxsys.config import BYTE_VOCAB_PADDED, ModelConfig
from jaxsys.data.longctx import (
    MAX_BYTES,
    MIN_BYTES,
    PARAGRAPH_SENTENCES,
    CopyDrillBatches,
    LongContextBatches,
    LongDocument,
    MixedBatches,
    heldout_documents,
)

TARGET = ModelConfig(
    vocab_size=BYTE_VOCAB_PADDED, dim=128, n_layers=4, n_heads=8, n_kv_heads=8, head_dim=16,
    ffn_dim=384, max_seq_len=8192, tie_embeddings=True, bos_id=257, eos_ids=(258,), tokenizer="byte",
)
DRAFT = replace(TARGET, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12, ffn_dim=192)

# --quick: the same recipe, tiny, for smoke tests (about a minute on 2 cores).
QUICK_TARGET = replace(TARGET, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=128)
QUICK_DRAFT = replace(DRAFT, dim=32, n_layers=1, head_dim=8, ffn_dim=64)


@dataclass(frozen=True)
class Phase:
    """One training run: its folder name, schedule and data."""

    name: str
    steps: int
    seq_len: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    copy_rows: int = 0  # rows of each batch from `CopyDrillBatches`, the rest from the corpus
    min_bytes: int = MIN_BYTES
    max_bytes: int = MAX_BYTES
    paragraph_sentences: tuple[int, int] = PARAGRAPH_SENTENCES

    def batches(self):
        sources = []
        if self.copy_rows:
            sources.append(CopyDrillBatches(self.seq_len, self.copy_rows, seed=DATA_SEED))
        if self.batch_size > self.copy_rows:
            sources.append(LongContextBatches(
                self.seq_len, self.batch_size - self.copy_rows, seed=DATA_SEED, min_bytes=self.min_bytes,
                max_bytes=self.max_bytes, paragraph_sentences=self.paragraph_sentences))
        return MixedBatches(*sources)

    def data_meta(self) -> dict:
        """What decides the data, as saved in checkpoint meta (JSON: lists, not tuples)."""
        return {"corpus": "longctx", "seed": DATA_SEED, "copy_rows": self.copy_rows,
                "min_bytes": self.min_bytes, "max_bytes": self.max_bytes,
                "paragraph_sentences": list(self.paragraph_sentences)}


DATA_SEED = 0
SHORT_DOCS = dict(min_bytes=500, max_bytes=1000)  # a 512-token window holds a whole document
DENSE = (1, 2)  # filler sentences per paragraph: a fact mention every ~150 bytes
MID_DOCS = dict(min_bytes=2000, max_bytes=4000)  # a 2048-token window: restatements ~2000 back

# The target's recipe: copying forms on the drill alone; the corpus then teaches it to
# find facts by their names, in short dense documents mixed with the drill (which keeps
# the copying alive meanwhile), then across 2048 tokens and last across the benchmark's 4K.
RECIPES: dict[bool, dict[str, tuple[ModelConfig, tuple[Phase, ...]]]] = {
    False: {
        "target": (TARGET, (
            Phase("target-copy", 1000, 128, 16, 1e-3, 20, copy_rows=16),
            Phase("target-short", 400, 512, 8, 3e-3, 20, copy_rows=2, **SHORT_DOCS, paragraph_sentences=DENSE),
            Phase("target", 120, 2048, 2, 1e-3, 10, **MID_DOCS),
            # Trained only up to 2048 positions, it fell apart past them (full-document loss
            # 1.83 against 0.51 with the last 512 tokens); the benchmark decodes at 4096 + 128.
            Phase("target-long", 50, 4352, 1, 5e-4, 5),
        )),
        "draft": (DRAFT, (Phase("draft", 400, 512, 8, 3e-3, 20, **SHORT_DOCS),)),
    },
    True: {
        "target": (QUICK_TARGET, (
            Phase("quick-target-copy", 20, 128, 8, 1e-3, 5, copy_rows=8),
            Phase("quick-target-short", 15, 256, 4, 1e-3, 5, copy_rows=2, **SHORT_DOCS,
                  paragraph_sentences=DENSE),
            Phase("quick-target", 5, 1024, 2, 1e-3, 2, **MID_DOCS),
        )),
        "draft": (QUICK_DRAFT, (Phase("quick-draft", 20, 256, 4, 3e-3, 5, **SHORT_DOCS),)),
    },
}


def kv_weight_ratio(config: ModelConfig, tokens: int = 4096) -> float:
    """KV-cache bytes at `tokens` of context over weight bytes, both in one dtype."""
    kv_elements = 2 * config.n_layers * tokens * config.n_kv_heads * config.resolved_head_dim
    return kv_elements / config.num_params


def _phase_meta(phase: Phase) -> dict:
    return {"data": phase.data_meta(), "phase": phase.name}


def _finished(folder: Path, config: ModelConfig, phase: Phase) -> bool:
    """True when `folder` holds this phase's last step, trained with this config and data."""
    from jaxsys import checkpoint
    try:
        root, step = checkpoint.resolve(folder)
    except checkpoint.CheckpointError:
        return False
    meta = checkpoint.read_meta(root / str(step))
    if not ModelConfig.from_dict(meta["model"]).same_weights(config) or meta.get("data") != _phase_meta(phase)["data"]:
        raise RuntimeError(f"{folder} holds a checkpoint of another model or data ({meta.get('model')}, "
                           f"{meta.get('data')}); remove that folder or pass another --folder")
    return step >= phase.steps


def _train_phase(folder: Path, config: ModelConfig, phase: Phase, init_from: Path | None, log) -> None:
    import meshes
    from jaxsys.loading import load_model
    from jaxsys.train import TrainConfig, train

    mesh = meshes.single_device_mesh(("node", "gpu", "gcd"))
    tc = TrainConfig(steps=phase.steps, batch_size=phase.batch_size, seq_len=phase.seq_len,
                     learning_rate=phase.learning_rate, warmup_steps=phase.warmup_steps,
                     seed=DATA_SEED, log_every=25, ckpt_every=50, keep_last=1)
    data = phase.batches()
    init_params = None
    resuming = (folder.exists() and any(p.name.isdigit() for p in folder.iterdir()))
    if init_from is not None and not resuming:
        init_params = load_model(str(init_from)).params
    log(f"training {phase.name}: {phase.steps} steps of {phase.batch_size} x {phase.seq_len} tokens"
        + (f", from {init_from.name}" if init_params is not None else ""))
    result = train(config, tc, mesh, data, ckpt_dir=folder, resume=True, meta=_phase_meta(phase),
                   init_params=init_params)
    if result.stopped_by_signal:
        raise RuntimeError(f"{phase.name} stopped by SIGTERM at step {result.end_step}; run again to resume")
    log(f"{phase.name}: loss {np.mean(result.losses[-10:]):.3f} at step {result.end_step}, "
        f"{result.tokens_per_s:.0f} tokens/s")


def ensure_pair(folder: Path, *, quick: bool = False, log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """(target, draft) checkpoint folders for `jaxsys.loading.load_model`, trained once.

    Each phase trains into its own subfolder of `folder`; a phase whose last step is
    already there (same model config and data) is reused, an interrupted one resumes.
    """
    folder = Path(folder)
    paths = {}
    for role in ("target", "draft"):  # the target first: it is the long one, better to know early
        config, phases = RECIPES[quick][role]
        previous = None
        for phase in phases:
            run_dir = folder / phase.name
            if not _finished(run_dir, config, phase):
                _train_phase(run_dir, config, phase, previous, log)
            previous = run_dir
        paths[role] = previous
    return paths["target"], paths["draft"]


def training_summary(run_dir: Path, last: int = 20) -> dict:
    """Steps, wall seconds between the first and last logged step, and the final train loss."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"steps": rows[-1]["step"], "seconds": rows[-1]["time"] - rows[0]["time"],
            "final_loss": float(np.mean([r["loss"] for r in rows[-last:]]))}


# --- does the target use its context? ------------------------------------------------------------

def _log_probs_fn(model):
    import jax
    import jax.numpy as jnp

    @jax.jit
    def target_log_probs(params, tokens, positions):
        """log p(tokens[:, t + 1] | tokens[:, :t + 1]): [batch, seq - 1]."""
        logits, _ = model.apply(params, tokens[:, :-1], positions[:, :-1])
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        return jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0], \
            jnp.argmax(logits, axis=-1) == tokens[:, 1:]

    return target_log_probs


def _full_context(fn, params, ids: np.ndarray, bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-target log-probs and hits (index t - 1 scores token t) with every earlier token visible."""
    padded = np.zeros(math.ceil(len(ids) / bucket) * bucket, np.int32)  # one compile per bucket
    padded[:len(ids)] = ids
    positions = np.arange(len(padded), dtype=np.int32)
    log_probs, hits = fn(params, padded[None], positions[None])
    return np.asarray(log_probs[0, :len(ids) - 1]), np.asarray(hits[0, :len(ids) - 1])


def _windowed(fn, params, ids: np.ndarray, window: int, stride: int, bos: int,
              batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Like `_full_context`, but token t sees BOS and between window - stride + 1 and window
    tokens before it; targets with at most `window` tokens before them are left as NaN
    (the full pass scores them identically)."""
    n = len(ids)
    log_probs, hits = np.full(n - 1, np.nan), np.zeros(n - 1, bool)
    # Block [a, a + stride) of targets reads inputs ids[a + stride - 1 - window : a + stride - 1].
    starts = list(range(window + 1, n, stride))
    for i in range(0, len(starts), batch):
        group = starts[i:i + batch]
        tokens = np.zeros((batch, window + 2), np.int32)  # BOS + window inputs + the last target
        positions = np.zeros((batch, window + 2), np.int32)
        for row, a in enumerate(group):
            first = a + stride - 1 - window
            span = np.arange(first, first + window + 1)
            tokens[row, 0], tokens[row, 1:] = bos, ids[np.minimum(span, n - 1)]
            positions[row, 1:] = span
        lp, hit = fn(params, tokens, positions)
        lp, hit = np.asarray(lp), np.asarray(hit)
        for row, a in enumerate(group):
            end = min(a + stride, n)  # targets a .. end - 1
            first = a + stride - 1 - window
            # target t sits at column (t - first) of tokens[:, 1:], scored at output column t - first
            cols = np.arange(a, end) - first
            log_probs[a - 1:end - 1], hits[a - 1:end - 1] = lp[row, cols], hit[row, cols]
    return log_probs, hits


def context_gain(model_path: str | Path, docs: Sequence[LongDocument], window: int = 512) -> dict:
    """Held-out loss (nats per token) with the full document visible vs only the last `window`
    tokens (plus BOS, as StreamingLLM keeps an attention sink), overall and on the bytes of
    restated fact values whose latest mention lies more than `window` bytes back; also the
    greedy accuracy on those bytes and the restated loss per distance bucket."""
    from jaxsys.loading import load_model
    from jaxsys.model import ModelDef

    loaded = load_model(str(model_path))
    config = loaded.config
    fn = _log_probs_fn(ModelDef(config))
    stride = max(1, window // 8)
    buckets = ((window, 1024), (1024, 2048), (2048, 4096), (4096, 1 << 30))
    sums = {k: {"all": [], "far": [], "far_hits": [], **{b: [] for b in buckets}} for k in ("full", "window")}
    for doc in docs:
        ids = doc.token_ids()
        if len(ids) > config.max_seq_len:
            raise ValueError(f"a document of {len(ids)} tokens exceeds max_seq_len={config.max_seq_len}")
        full = _full_context(fn, loaded.params, ids, bucket=2048)
        windowed = _windowed(fn, loaded.params, ids, window, stride, config.bos_id)
        short = np.isnan(windowed[0])  # targets within the window: identical either way
        windowed = (np.where(short, full[0], windowed[0]), np.where(short, full[1], windowed[1]))
        for kind, (log_probs, hits) in (("full", full), ("window", windowed)):
            s = sums[kind]
            s["all"].append(-log_probs)
            for r in doc.restatements:
                if r.distance <= window:
                    continue
                cols = np.arange(r.value_start, r.value_end)  # token t = offset + 1, scored at t - 1
                s["far"].append(-log_probs[cols])
                s["far_hits"].append(hits[cols])
                for lo, hi in buckets:
                    if lo < r.distance <= hi:
                        s[(lo, hi)].append(-log_probs[cols])

    def mean(parts):
        return float(np.concatenate(parts).mean()) if parts else float("nan")

    out = {"window": window, "documents": len(docs),
           "tokens": int(sum(len(p) for p in sums["full"]["all"])),
           "restated_far_tokens": int(sum(len(p) for p in sums["full"]["far"]))}
    for kind, s in sums.items():
        out[kind] = {"overall": mean(s["all"]), "restated": mean(s["far"]),
                     "restated_accuracy": mean(s["far_hits"]),
                     "restated_by_distance": {f"{lo}-{hi if hi < 1 << 30 else 'max'}": mean(s[(lo, hi)])
                                              for lo, hi in buckets}}
    return out


def distinct_token_ratio(token_ids: Sequence[int], n: int = 8) -> float:
    """Distinct n-grams over all n-grams of a generation (n=8 bytes, about a word and a half).

    Near 1 for varied text; a model stuck in a loop repeats its n-grams and drives it
    towards 0. NaN when there are fewer than n tokens.
    """
    ids = [int(t) for t in token_ids]
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny pair, trained in about a minute")
    parser.add_argument("--folder", type=Path, default=Path(".cache/spec_models"))
    parser.add_argument("--docs", type=int, default=None, help="held-out documents to evaluate (16; 2 with --quick)")
    args = parser.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    target_path, draft_path = ensure_pair(args.folder, quick=args.quick, log=log)
    docs = heldout_documents(args.docs or (2 if args.quick else 16), seed=DATA_SEED)
    rows = []
    for role, path in (("target", target_path), ("draft", draft_path)):
        config, phases = RECIPES[args.quick][role]
        log(f"evaluating {role} on {len(docs)} held-out documents")
        runs = {p.name: training_summary(args.folder / p.name) for p in phases}
        rows.append({"model": role, "path": str(path), "params": config.num_params,
                     "kv_weight_ratio_4096": kv_weight_ratio(config), "config": asdict(config),
                     "training": runs, "train_seconds": sum(r["seconds"] for r in runs.values()),
                     "gain": context_gain(path, docs)})

    target, draft = rows
    print(f"spec models in {args.folder}: {len(docs)} held-out documents, "
          f"{target['gain']['tokens']} tokens, {target['gain']['restated_far_tokens']} restated-value "
          f"tokens > 512 back; loss in nats/token")
    print(f"{'model':<8}{'params':>9}{'KV/W@4096':>10}{'train s':>9}{'loss full':>11}{'loss 512':>10}"
          f"{'fact full':>11}{'fact 512':>10}{'acc full':>10}{'acc 512':>9}")
    for r in rows:
        g = r["gain"]
        print(f"{r['model']:<8}{r['params']:>9,}{r['kv_weight_ratio_4096']:>10.2f}{r['train_seconds']:>9.0f}"
              f"{g['full']['overall']:>11.3f}{g['window']['overall']:>10.3f}"
              f"{g['full']['restated']:>11.3f}{g['window']['restated']:>10.3f}"
              f"{g['full']['restated_accuracy']:>10.1%}{g['window']['restated_accuracy']:>9.1%}")
    print("restated-value loss by distance (bytes back), target: "
          + ", ".join(f"{k}: {v:.2f} vs {target['gain']['window']['restated_by_distance'][k]:.2f}"
                      for k, v in target["gain"]["full"]["restated_by_distance"].items()))
    print(f"target / draft parameters: {target['params'] / draft['params']:.1f}x")
    print(json.dumps({"experiment": "spec_models", "quick": args.quick, "models": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
