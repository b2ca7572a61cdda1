"""Long documents where retrieval matters: facts stated early, restated verbatim far later.

The benchmark corpus for hierarchical speculative decoding (TriForce, Sun et al. 2024):
its target model is meant to lean on a long KV cache, so the text must hold tokens that
only a long context predicts. Each document opens a register of facts with random content
(``The vault code of Aldermoor is 48213.``: invented names, random numbers, so nothing can
be memorised across documents), introduces a few more early on, then runs through long
filler paragraphs written by a small grammar (locally predictable, varied enough not to
repeat) and restates earlier facts verbatim (``As noted earlier, the vault code of
Aldermoor is 48213.``) from a few hundred to several thousand bytes after their last
mention. The values of those restatements are the tokens a window of recent context
cannot predict, and every document records where they are (`Restatement`).

Where the benchmarks of the paper use real long texts (PG-19, LongBench), this corpus is
generated, like the rest of jaxsys' data: nothing is downloaded, and a seed names every
document. All text is ASCII, so byte offsets are byte-tokenizer positions (plus one for
BOS). Training documents and held-out documents come from disjoint seed namespaces.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from jaxsys.data.tokenizer import ByteTokenizer

MIN_BYTES, MAX_BYTES = 4000, 8000  # document lengths, drawn uniformly (8002 tokens at most)
SHORTEST_BYTES = 500  # a document needs room for its register and a few restatements
# Filler sentences per paragraph; each paragraph holds one or two fact mentions. Fewer
# sentences make a denser document, a faster start for learning to copy.
PARAGRAPH_SENTENCES = (4, 8)

_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "r", "s",
           "st", "t", "th", "v", "w", "z", "sh", "cl", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou", "ei", "y")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "m", "nd", "rk", "sk")
_PLACE_ENDINGS = ("moor", "ford", "wick", "dale", "holm", "stead", "mere", "gate", "burn",
                  "thorpe", "vale", "crest", "by", "haven")

_NUMERIC_ATTRIBUTES = ("vault code", "gate number", "ledger mark", "harbor toll", "seal number",
                       "archive shelf", "signal count", "grain tithe", "bridge weight",
                       "lantern count", "well depth", "tower height", "mill quota", "cellar key")
_NAME_ATTRIBUTES = ("keeper", "warden", "scribe", "envoy")

_INTRO_LEADS = ("It is recorded that {core}.", "A new entry says that {core}.",
                "Note that {core}.", "The clerk adds that {core}.")
_RESTATE_LEADS = ("As noted earlier, {core}.", "Recall that {core}.",
                  "The register still says that {core}.", "{person} checks the ledger: {core}.",
                  "As written above, {core}.", "Once more, {core}.")

# The filler grammar: people and places come from each document's own cast.
_ROLES = ("the miller", "a traveller", "the old ferryman", "the smith", "a shepherd",
          "the council", "the baker", "a merchant", "the night watch", "the weaver",
          "the carter", "a young clerk", "a fisherman", "the innkeeper")
_ACTIONS = ("walks along the river", "waits by the east gate", "counts the sacks of grain",
            "mends the torn nets", "sweeps the stone steps", "loads the cart with wool",
            "sings an old song", "reads the notices on the wall", "lights the lamps",
            "feeds the goats", "carries water up the hill", "trades salt for cloth",
            "repairs the broken fence", "watches the boats come in", "sharpens the tools",
            "writes a letter home", "tells a long story", "bakes bread for the market",
            "argues about the weather", "leads the horses to the field")
_TIMES = ("in the morning", "before the rain", "after the bells", "at noon", "late at night",
          "at first light", "in the evening", "during the fair", "while the fog lifts",
          "on market day", "when the tide turns", "after supper")
_SPOTS = ("at the edge of the market", "near the old mill", "behind the chapel",
          "by the harbor wall", "under the great oak", "in the square", "on the north road",
          "beside the well", "at the ford", "outside the granary")
_WEATHER = ("The wind", "A cold rain", "The mist", "A warm breeze", "The snow", "The sun")
_WEATHER_VERBS = ("moves over", "settles on", "sweeps across", "lingers over", "returns to")
_FEELINGS = ("glad", "tired", "worried", "proud", "quiet", "restless", "patient", "cheerful")


@dataclass(frozen=True)
class Fact:
    attribute: str  # "vault code"
    entity: str  # "Aldermoor" (unique within a document)
    value: str  # "48213", or a name for the person-valued attributes

    @property
    def core(self) -> str:
        """The words stated and restated verbatim."""
        return f"the {self.attribute} of {self.entity} is {self.value}"


@dataclass(frozen=True)
class Restatement:
    fact: int  # index into `LongDocument.facts`
    value_start: int  # byte offset of the value in the text
    value_end: int
    distance: int  # bytes back to the value of the fact's nearest earlier mention


@dataclass(frozen=True)
class LongDocument:
    text: str
    facts: tuple[Fact, ...]
    restatements: tuple[Restatement, ...]

    def token_ids(self) -> np.ndarray:
        """int32 ``[BOS, text bytes..., EOS]``: byte offset i is token i + 1."""
        return np.asarray(ByteTokenizer().encode(self.text, add_bos=True, add_eos=True), np.int32)

    def restated_value_targets(self, *, min_distance: int = 0) -> np.ndarray:
        """Token positions (into `token_ids`) of restated values at least `min_distance` back."""
        spans = [np.arange(r.value_start, r.value_end) + 1 for r in self.restatements
                 if r.distance >= min_distance]
        return np.concatenate(spans) if spans else np.zeros(0, np.int64)


class _Writer:
    """Composes one document, keeping the offsets of every fact's mentions."""

    def __init__(self, rng: random.Random, target_bytes: int, paragraph_sentences: tuple[int, int]):
        self.rng, self.target_bytes = rng, target_bytes
        self.paragraph_sentences = paragraph_sentences
        # Longer documents hold more facts and wait longer before restating one
        # (266 bytes at the 4000-byte minimum, 533 at 8000).
        self.min_gap = target_bytes // 15
        fewest = max(3, target_bytes // 1000)
        n_facts = rng.randint(fewest, max(fewest, min(14, target_bytes // 550)))
        self.parts: list[str] = []
        self.length = 0
        self.last_mention: dict[int, int] = {}  # fact -> value offset of its latest mention
        self.restatements: list[Restatement] = []
        self.people = sorted(self._unique(lambda: self._word(2).capitalize(), 6))
        self.place = self._place()
        entities = sorted(self._unique(self._place, n_facts, taken={self.place}))
        self.facts = [self._fact(entity) for entity in entities]
        rng.shuffle(self.facts)

    def _unique(self, make, n: int, taken: set[str] = frozenset()) -> set[str]:
        found: set[str] = set()
        while len(found) < n:
            if (word := make()) not in taken:
                found.add(word)
        return found

    def _word(self, syllables: int) -> str:
        r = self.rng
        return "".join(r.choice(_ONSETS) + r.choice(_VOWELS) + r.choice(_CODAS) for _ in range(syllables))

    def _place(self) -> str:
        return (self._word(self.rng.randint(1, 2)) + self.rng.choice(_PLACE_ENDINGS)).capitalize()

    def _fact(self, entity: str) -> Fact:
        r = self.rng
        if r.random() < 0.2:
            return Fact(r.choice(_NAME_ATTRIBUTES), entity, self._word(2).capitalize())
        return Fact(r.choice(_NUMERIC_ATTRIBUTES), entity, str(r.randint(100, 99999)))

    def write(self, text: str) -> None:
        self.parts.append(text)
        self.length += len(text)

    def fits(self, text: str) -> bool:
        return self.length + len(text) <= self.limit

    def mention(self, index: int, lead: str, *, prefix: str = "", capitalize: bool = False) -> bool:
        """Writes fact `index` inside `lead` when it fits, recording the value's offset."""
        fact = self.facts[index]
        core = fact.core[0].upper() + fact.core[1:] if capitalize else fact.core
        sentence = prefix + lead.format(core=core, person=self.rng.choice(self.people))
        if not self.fits(sentence):
            return False
        value_start = self.length + sentence.index(core) + len(core) - len(fact.value)
        if index in self.last_mention:
            self.restatements.append(Restatement(index, value_start, value_start + len(fact.value),
                                                 value_start - self.last_mention[index]))
        self.last_mention[index] = value_start
        self.write(sentence)
        return True

    def filler_sentence(self) -> str:
        r = self.rng
        who = r.choice(_ROLES + tuple(self.people))
        kind = r.random()
        if kind < 0.35:
            text = f"{who} {r.choice(_ACTIONS)} {r.choice(_TIMES)}."
        elif kind < 0.55:
            text = f"{r.choice(_TIMES)}, {who} {r.choice(_ACTIONS)} {r.choice(_SPOTS)}."
        elif kind < 0.7:
            text = f"{r.choice(_WEATHER)} {r.choice(_WEATHER_VERBS)} {self.place} {r.choice(_TIMES)}."
        elif kind < 0.85:
            text = f"{who} is {r.choice(_FEELINGS)} and {r.choice(_ACTIONS)}."
        else:
            text = f"{r.choice(self.people)} says that {who} {r.choice(_ACTIONS)} {r.choice(_SPOTS)}."
        return text[0].upper() + text[1:]

    def restatable(self) -> list[int]:
        return [i for i, at in self.last_mention.items() if self.length - at >= self.min_gap]

    def compose(self) -> LongDocument:
        r = self.rng
        closing = f"\nEnd of the register of {self.place}."
        self.limit = self.target_bytes - len(closing)  # the text never exceeds target_bytes
        self.write(f"Register of {self.place}.\n")
        opening = max(3, (len(self.facts) * 3) // 5)
        for index in range(opening):
            self.mention(index, "{core}.\n", capitalize=True)
        later = list(range(opening, len(self.facts)))  # introduced in the first third
        full = False
        while not full:
            sentences = r.randint(*self.paragraph_sentences)
            inserts = {r.randrange(sentences) for _ in range(r.choice((1, 2, 2)))}
            for s in range(sentences):
                text = ("\n" if s == 0 else " ") + self.filler_sentence()
                if full := not self.fits(text):
                    break
                self.write(text)
                if s not in inserts:
                    continue
                if later and (self.length > self.target_bytes / 3 or r.random() < 0.4):
                    if self.mention(later[0], r.choice(_INTRO_LEADS), prefix=" "):
                        later.pop(0)
                elif candidates := self.restatable():
                    self.mention(r.choice(candidates), r.choice(_RESTATE_LEADS), prefix=" ")
        self.write(closing)
        return LongDocument("".join(self.parts), tuple(self.facts), tuple(self.restatements))


def _document_rng(namespace: str, seed: int, index: int) -> random.Random:
    return random.Random(f"longctx/{namespace}/{seed}/{index}")  # str seeds hash with sha512


@lru_cache(maxsize=4096)
def _document(namespace: str, seed: int, index: int, min_bytes: int, max_bytes: int,
              paragraph_sentences: tuple[int, int] = PARAGRAPH_SENTENCES) -> LongDocument:
    rng = _document_rng(namespace, seed, index)
    return _Writer(rng, rng.randint(min_bytes, max_bytes), paragraph_sentences).compose()


def _check(min_bytes: int, max_bytes: int, paragraph_sentences: tuple[int, int]) -> None:
    if not SHORTEST_BYTES <= min_bytes <= max_bytes:
        raise ValueError(f"need {SHORTEST_BYTES} <= {min_bytes=} <= {max_bytes=}; shorter documents "
                         "leave no room for restatements away from their facts")
    fewest, most = paragraph_sentences
    if not 1 <= fewest <= most:
        raise ValueError(f"paragraph_sentences={paragraph_sentences} must be (fewest, most) with "
                         "1 <= fewest <= most")


def training_document(index: int, *, seed: int = 0, min_bytes: int = MIN_BYTES, max_bytes: int = MAX_BYTES,
                      paragraph_sentences: tuple[int, int] = PARAGRAPH_SENTENCES) -> LongDocument:
    """Training document `index`: a pure function of its arguments."""
    _check(min_bytes, max_bytes, paragraph_sentences)
    return _document("train", seed, index, min_bytes, max_bytes, tuple(paragraph_sentences))


def heldout_documents(count: int, *, seed: int = 0, min_bytes: int = MIN_BYTES, max_bytes: int = MAX_BYTES,
                      paragraph_sentences: tuple[int, int] = PARAGRAPH_SENTENCES) -> list[LongDocument]:
    """`count` evaluation documents, from seeds no training document uses."""
    _check(min_bytes, max_bytes, paragraph_sentences)
    return [_document("heldout", seed, i, min_bytes, max_bytes, tuple(paragraph_sentences))
            for i in range(count)]


class LongContextBatches:
    """Training windows of ``seq_len + 1`` tokens, each from the start of a fresh document.

    Sample ``g = step * batch_size + j`` reads training document g (then g's successors
    in a separate stream, when one document is shorter than the window) from its BOS, so
    every window holds a fact register and the restatements that follow it. There are no
    epochs: each sample is a new document, and `batch(step)` is a pure function of
    (seed, step), which keeps resumed runs exact as `jaxsys.train` expects.
    """

    def __init__(self, seq_len: int, batch_size: int, *, seed: int = 0,
                 min_bytes: int = MIN_BYTES, max_bytes: int = MAX_BYTES,
                 paragraph_sentences: tuple[int, int] = PARAGRAPH_SENTENCES):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"need seq_len >= 1 and batch_size >= 1, got {seq_len=}, {batch_size=}")
        _check(min_bytes, max_bytes, paragraph_sentences)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.min_bytes, self.max_bytes = min_bytes, max_bytes
        self.paragraph_sentences = tuple(paragraph_sentences)

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    def window(self, sample: int) -> np.ndarray:
        """int32 ``[seq_len + 1]`` for sample `sample`."""
        if sample < 0:
            raise ValueError(f"{sample=} must be >= 0")
        pieces, have, extra = [], 0, 0
        while have < self.seq_len + 1:
            # Continuations come from their own namespace: no window starts with them.
            namespace, index = ("train", sample) if extra == 0 else ("train-next", sample * 8 + extra)
            doc = _document(namespace, self.seed, index, self.min_bytes, self.max_bytes,
                            self.paragraph_sentences)
            pieces.append(doc.token_ids())
            have += len(pieces[-1])
            extra += 1
        return np.concatenate(pieces)[:self.seq_len + 1]

    def batch(self, step: int) -> np.ndarray:
        """int32 ``[batch_size, seq_len + 1]``; a pure function of (seed, step)."""
        if step < 0:
            raise ValueError(f"{step=} must be >= 0")
        first = step * self.batch_size
        return np.stack([self.window(first + j) for j in range(self.batch_size)])

    def __repr__(self) -> str:
        return (f"LongContextBatches(seq_len={self.seq_len}, batch_size={self.batch_size}, "
                f"seed={self.seed}, bytes={self.min_bytes}..{self.max_bytes}, "
                f"paragraph_sentences={self.paragraph_sentences})")



class CopyDrillBatches:
    """Windows of one random string repeated to the end: a warm-up in which copying forms.

    A small model trained on `LongContextBatches` alone learns the local grammar long
    before it learns to copy, since copying pays off on a few percent of its tokens (in
    our runs, hundreds of steps gave no gain on restated values at all). Here everything
    after the first repeat is predictable only by copying, so induction heads (Olsson et
    al. 2022) form within several hundred steps, and training then goes on with the
    corpus. Random letters leave no bigram statistics to fall back on, and a random
    string length per window rules out copying from a fixed offset. `batch(step)` is a
    pure function of (seed, step), like `LongContextBatches`.
    """

    def __init__(self, seq_len: int, batch_size: int, *, seed: int = 0,
                 string_bytes: tuple[int, int] = (8, 40)):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"need seq_len >= 1 and batch_size >= 1, got {seq_len=}, {batch_size=}")
        if not 1 <= string_bytes[0] <= string_bytes[1]:
            raise ValueError(f"string_bytes={string_bytes} must be (shortest, longest) with "
                             "1 <= shortest <= longest")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.string_bytes = tuple(string_bytes)

    def window(self, sample: int) -> np.ndarray:
        """int32 ``[seq_len + 1]``: BOS, then one random lowercase string over and over."""
        rng = np.random.default_rng([self.seed, sample])
        length = int(rng.integers(self.string_bytes[0], self.string_bytes[1] + 1))
        string = rng.integers(ord("a"), ord("z") + 1, length)
        repeats = np.tile(string, self.seq_len // length + 1)
        return np.concatenate([[ByteTokenizer.bos_id], repeats])[:self.seq_len + 1].astype(np.int32)

    def batch(self, step: int) -> np.ndarray:
        """int32 ``[batch_size, seq_len + 1]``; a pure function of (seed, step)."""
        if step < 0:
            raise ValueError(f"{step=} must be >= 0")
        first = step * self.batch_size
        return np.stack([self.window(first + j) for j in range(self.batch_size)])


class MixedBatches:
    """The rows of several step-indexed sources stacked into one batch, in order."""

    def __init__(self, *sources):
        if not sources:
            raise ValueError("MixedBatches needs at least one source")
        lengths = {s.seq_len for s in sources}
        if len(lengths) > 1:
            raise ValueError(f"sources must share seq_len, got {sorted(lengths)}")
        self.sources = sources
        self.seq_len = lengths.pop()
        self.batch_size = sum(s.batch_size for s in sources)

    def batch(self, step: int) -> np.ndarray:
        """int32 ``[batch_size, seq_len + 1]``; a pure function of step, like its sources."""
        return np.concatenate([s.batch(step) for s in self.sources])
