"""Tokenizers: a byte-level one that needs no files, and Hugging Face `tokenizer.json` folders.

Every tokenizer answers the same small interface (`Tokenizer`), and BOS/EOS are always added
by us, never by a tokenizer's post-processor, so that a BOS is never doubled and
``encode(..., add_bos=False)`` means exactly that (the `--prompt-ids` contract relies on it).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence


class Tokenizer(ABC):
    """Text <-> token ids. Special ids may be None where a tokenizer has no such token."""

    name: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends a generation (some models have several)."""
        return () if self.eos_id is None else (self.eos_id,)

    @abstractmethod
    def _encode_plain(self, text: str) -> list[int]:
        """The ids of `text` alone, without any special tokens."""

    @abstractmethod
    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Text for `ids`; ids outside the vocabulary decode to nothing."""

    def encode(self, text: str, *, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Ids of `text`, with BOS/EOS added when asked and the tokenizer has them."""
        ids = self._encode_plain(text)
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if add_eos and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = True,
                     add_eos: bool = False) -> list[list[int]]:
        """`encode` for many texts; subclasses may do this faster."""
        return [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_ids={self.eos_ids}, pad_id={self.pad_id})")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then pad=256, bos=257, eos=258 (vocab_size 259).

    Models may have a larger embedding table; ids >= 259 decode to nothing, and invalid
    UTF-8 decodes with replacement characters rather than failing mid-generation.
    """

    name = "byte"
    vocab_size = 259
    pad_id, bos_id, eos_id = 256, 257, 258
    _SPECIAL_TEXT = {256: "<pad>", 257: "<bos>", 258: "<eos>"}

    def _encode_plain(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        pieces: list[str] = []
        run = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
                continue
            text = self._piece(i)
            if text is None and not skip_special:
                text = self._SPECIAL_TEXT.get(i)
            if text is not None:
                pieces += [run.decode("utf-8", errors="replace"), text]
                run = bytearray()
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def _piece(self, i: int) -> str | None:
        """The text of an id above the bytes that is not a special token (none here)."""
        return None


class WordTokenizer(ByteTokenizer):
    """Whole words of a fixed vocabulary as single ids, everything else as UTF-8 bytes.

    Text is cut into pieces: a word with its leading space (`` apples``), a digit with its
    leading space (numbers stay one digit per id, so arithmetic is done digit by digit), a
    punctuation mark with its leading space, or one other character. A piece in the
    vocabulary is one id (259 + its index); any other piece is its bytes, with the byte
    tokenizer's ids (0..255, pad 256, bos 257, eos 258). Decoding concatenates the pieces,
    so every text round-trips exactly, and a model of this vocabulary reads and writes text
    outside it too (a byte at a time). Built from example texts with `WordTokenizer.fit`.
    """

    PIECE = re.compile(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]|.", re.S)

    def __init__(self, words: Sequence[str]):
        words = list(dict.fromkeys(words))
        single = [w for w in words if len(w.encode("utf-8")) < 2]
        if single:
            raise ValueError(f"WordTokenizer words must be longer than one byte (bytes have their own ids): {single[:5]}")
        self.words = words
        self._ids = {w: ByteTokenizer.vocab_size + i for i, w in enumerate(words)}
        self.vocab_size = ByteTokenizer.vocab_size + len(words)
        self.name = f"word{len(words)}"

    @classmethod
    def fit(cls, texts: Sequence[str], *, max_words: int = 4096, min_count: int = 2) -> "WordTokenizer":
        """The `max_words` most frequent multi-byte pieces of `texts` seen at least `min_count` times."""
        counts = Counter(piece for text in texts for piece in cls.PIECE.findall(text))
        ranked = sorted((p for p, c in counts.items() if c >= min_count and len(p.encode("utf-8")) > 1),
                        key=lambda p: (-counts[p], p))
        return cls(ranked[:max_words])

    def _encode_plain(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self.PIECE.findall(text):
            i = self._ids.get(piece)
            ids += [i] if i is not None else list(piece.encode("utf-8"))
        return ids

    def _piece(self, i: int) -> str | None:
        index = i - ByteTokenizer.vocab_size
        return self.words[index] if 0 <= index < len(self.words) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or remove the file") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def _ids(value) -> list[int]:
    """An id field of config.json: an int, a list of ints, or missing."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class HFTokenizer(Tokenizer):
    """A Hugging Face folder: `tokenizer.json`, plus special tokens from its config files.

    BOS/EOS/PAD come from `tokenizer_config.json` (``bos_token`` etc., a string or a dict
    with ``content``), then `config.json` and `generation_config.json` (``bos_token_id``,
    ``eos_token_id`` as an int or a list). All EOS ids are kept in `eos_ids` (Llama 3 ends on
    any of three); `eos_id` is the first. Without any config, a BOS that the tokenizer's
    post-processor adds is detected by encoding a test string. PAD falls back to EOS.
    """

    _TEST_TEXT = "a b"

    def __init__(self, folder: str | Path):
        import tokenizers  # only here: the byte tokenizer must not need it

        self.folder = Path(folder)
        path = self.folder / "tokenizer.json"
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"{path} could not be read as a tokenizers file ({e}); "
                             "re-save it with tokenizers/transformers or use another folder") from e
        self.name = f"hf:{self.folder.resolve().name}"
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

        tok_config = _read_json(self.folder / "tokenizer_config.json")
        configs = [_read_json(self.folder / f) for f in ("config.json", "generation_config.json")]
        plain = self._tok.encode(self._TEST_TEXT, add_special_tokens=False).ids
        full = self._tok.encode(self._TEST_TEXT, add_special_tokens=True).ids
        self.post_processor_adds_bos = len(full) > len(plain) and full[1:len(plain) + 1] == plain

        def from_config(key: str) -> list[int]:
            found = _ids(self._token_id(tok_config.get(f"{key}_token")))
            for config in configs:
                found += _ids(config.get(f"{key}_token_id"))
            return list(dict.fromkeys(i for i in found if 0 <= i < self.vocab_size))

        bos = from_config("bos") or ([full[0]] if self.post_processor_adds_bos else [])
        self.bos_id = bos[0] if bos else None
        self._eos_ids = tuple(from_config("eos"))
        self.eos_id = self._eos_ids[0] if self._eos_ids else None
        pad = from_config("pad")
        self.pad_id = pad[0] if pad else (self.eos_id if self.eos_id is not None else 0)
        self._special = {i for i in (self.bos_id, self.pad_id, *self._eos_ids) if i is not None}

    def _token_id(self, token) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        return self._tok.token_to_id(token) if isinstance(token, str) else None

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    def _encode_plain(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = True,
                     add_eos: bool = False) -> list[list[int]]:
        head = [self.bos_id] if add_bos and self.bos_id is not None else []
        tail = [self.eos_id] if add_eos and self.eos_id is not None else []
        encoded = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [head + e.ids + tail for e in encoded]

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        keep = [int(i) for i in ids if 0 <= int(i) < self.vocab_size
                and not (skip_special and int(i) in self._special)]
        return self._tok.decode(keep, skip_special_tokens=skip_special)


def load_tokenizer(kind_or_folder: str | Path) -> Tokenizer | None:
    """``"byte"`` -> `ByteTokenizer`; a folder with tokenizer.json (or that file) ->
    `HFTokenizer`; a folder without one -> None, so callers can ask for token ids instead."""
    if str(kind_or_folder) == "byte":
        return ByteTokenizer()
    path = Path(kind_or_folder)
    if path.is_file() and path.name == "tokenizer.json":
        path = path.parent
    if path.is_dir():
        return HFTokenizer(path) if (path / "tokenizer.json").is_file() else None
    raise ValueError(f"unknown tokenizer {str(kind_or_folder)!r}: pass 'byte' or a folder "
                     "that holds tokenizer.json")
