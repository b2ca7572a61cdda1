"""Documents from the embedded corpus or a file, and a resumable stream of token windows.

`TokenDataset.batch(step)` is a pure function of (seed, step): sample ``g = step*batch_size+j``
lies in epoch ``g // num_windows`` and reads the window that epoch's permutation puts at
position ``g % num_windows``. A run resumed at step k therefore sees exactly the batches a
straight run sees, with no iterator state to checkpoint (the approach of levanter's
stateless data loaders, simplified to one in-memory stream).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxsys.data.corpus import format_question_solution, format_example, generate_problems
from jaxsys.data.tokenizer import Tokenizer

_SOURCES_HELP = ("use --data corpus (the embedded word problems), a .txt file (documents "
                 "separated by blank lines) or a .jsonl file (a \"text\" field, or \"question\" "
                 "and \"solution\" fields, per line)")


@lru_cache(maxsize=4)
def _corpus_documents(seed: int, num_problems: int) -> tuple[str, ...]:
    return tuple(format_example(p) for p in generate_problems(num_problems, seed=seed))


def load_documents(source: str | Path | None, *, seed: int = 0,
                   num_problems: int = 20000) -> list[str]:
    """Training documents: the embedded corpus (None or ``"corpus"``), a .txt or a .jsonl.

    Corpus documents are formatted problems (`format_example`); .jsonl question/solution
    pairs are formatted the same way so that they mix with the corpus.
    """
    if source is None or str(source) == "corpus":
        return list(_corpus_documents(seed, num_problems))
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} not found; {_SOURCES_HELP}")
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"data file {path} has an unknown extension {path.suffix!r}; "
                         f"{_SOURCES_HELP}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {path} is not UTF-8 text ({e}); convert it to UTF-8") from e
    if not text.strip():
        raise ValueError(f"data file {path} is empty; {_SOURCES_HELP}")
    docs = _read_txt(text) if path.suffix == ".txt" else _read_jsonl(text, path)
    if not docs:
        raise ValueError(f"data file {path} holds no usable documents; {_SOURCES_HELP}")
    return docs


def _read_txt(text: str) -> list[str]:
    paragraphs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line.rstrip())
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    if current:
        paragraphs.append("\n".join(current))
    return paragraphs


def _read_jsonl(text: str, path: Path) -> list[str]:
    docs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number} is not valid JSON ({e.msg}); fix the "
                             "line or remove it") from e
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {number} should be a JSON object, found "
                             f"{type(record).__name__}")
        if isinstance(record.get("text"), str) and record["text"].strip():
            docs.append(record["text"])
        elif isinstance(record.get("question"), str) and isinstance(record.get("solution"), str):
            docs.append(format_question_solution(record["question"].strip(),
                                                 record["solution"].strip()))
    return docs


class TokenDataset:
    """Windows of ``seq_len + 1`` tokens (inputs and shifted targets) from one token stream.

    Window i starts at ``i * seq_len``, so consecutive windows share one boundary token and
    every token is a target exactly once per epoch.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be a 1-D integer array, got {tokens.dtype} "
                             f"with shape {tokens.shape}")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"need seq_len >= 1 and batch_size >= 1, got {seq_len=}, "
                             f"{batch_size=}")
        if len(tokens) < seq_len + 1:
            raise ValueError(f"data has {len(tokens)} tokens, need at least "
                             f"seq_len+1={seq_len + 1}; add data or lower --seq-len")
        self.tokens = tokens.astype(np.int32, copy=False)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed

    @classmethod
    def from_documents(cls, docs: Sequence[str], tokenizer: Tokenizer, *, seq_len: int,
                       batch_size: int, seed: int = 0) -> TokenDataset:
        """Encodes each document as BOS + text + EOS and concatenates them in order."""
        if not docs:
            raise ValueError("no documents to build a dataset from; add data")
        encoded = tokenizer.encode_batch(list(docs), add_bos=True, add_eos=True)
        tokens = np.concatenate([np.asarray(ids, dtype=np.int64) for ids in encoded])
        if len(tokens) and tokens.max() > np.iinfo(np.int32).max:
            raise ValueError(f"token id {tokens.max()} does not fit int32")
        return cls(tokens.astype(np.int32), seq_len=seq_len, batch_size=batch_size, seed=seed)

    @property
    def num_windows(self) -> int:
        """Non-overlapping windows per epoch."""
        return (len(self.tokens) - 1) // self.seq_len

    @property
    def tokens_per_batch(self) -> int:
        """Target tokens per batch (``batch_size * seq_len``), for throughput figures."""
        return self.batch_size * self.seq_len

    def _permutation(self, epoch: int) -> np.ndarray:
        return _epoch_permutation(self.seed, epoch, self.num_windows)

    def batch(self, step: int) -> np.ndarray:
        """int32 ``[batch_size, seq_len + 1]``; a pure function of (seed, step)."""
        if step < 0:
            raise ValueError(f"{step=} must be >= 0")
        samples = step * self.batch_size + np.arange(self.batch_size)
        epochs, positions = np.divmod(samples, self.num_windows)
        starts = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):  # a batch spans at most a few epochs
            mine = epochs == epoch
            starts[mine] = self._permutation(int(epoch))[positions[mine]] * self.seq_len
        offsets = starts[:, None] + np.arange(self.seq_len + 1)  # [batch, seq_len + 1]
        return self.tokens[offsets]

    def __repr__(self) -> str:
        return (f"TokenDataset(tokens={len(self.tokens)}, seq_len={self.seq_len}, "
                f"batch_size={self.batch_size}, seed={self.seed}, windows={self.num_windows})")


@lru_cache(maxsize=8)
def _epoch_permutation(seed: int, epoch: int, num_windows: int) -> np.ndarray:
    permutation = np.random.default_rng([seed, epoch]).permutation(num_windows)
    permutation.setflags(write=False)  # shared through the cache
    return permutation


def corpus_dataset(tokenizer: Tokenizer, *, seq_len: int, batch_size: int, seed: int = 0,
                   num_problems: int = 20000) -> TokenDataset:
    """The embedded corpus, tokenized, as a `TokenDataset` (the `jaxsys train` default)."""
    docs = load_documents(None, seed=seed, num_problems=num_problems)
    return TokenDataset.from_documents(docs, tokenizer, seq_len=seq_len,
                                       batch_size=batch_size, seed=seed)
