"""The exact verifier of the word-problem grammar (`jaxsys.data.grammar`): a parser that solves.

The ScaleQuest-style question synthesis in `experiments/scalequest/` has a small model write
NEW questions in the grammar, and `verify` decides whether each one is solvable and what its
single exact answer is. So the verifier is a real parser: it reads a question sentence by
sentence, tracks every person's count of every item, and rejects anything outside the
grammar, unknown people or items, negative counts, uneven division, and ambiguity.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from jaxsys.data.grammar import (
    _CONTAINER_WORDS,
    _GENDER,
    _ITEM_BY_WORD,
    _NAME,
    _QTY_NUMBER,
    _QTY_PART,
    _QUESTIONS,
    _RESERVED,
    _STATEMENTS,
    AS_MANY,
    FRACTIONS,
    FROM_VERBS,
    ITEMS,
    MULTIPLY_VERBS,
    _count,
    _int,
    _noun,
)


@dataclass(frozen=True)
class Problem:
    """One word problem: question text, worked solution ending in ``Answer: N``, answer, ops."""
    question: str
    solution: str
    answer: int
    steps: int


class _Unsolvable(Exception):
    """Raised inside the parser; `solve` turns it into None."""


class _Solver:
    """Reads one question sentence by sentence, tracking counts[person][item]."""

    def __init__(self):
        self.counts: dict[str, dict[str, int]] = {}
        self.mentioned: set[tuple[str, str]] = set()  # (person, item) pairs seen anywhere
        self.shares: dict[str, list[int]] = {}  # item -> amount per friend, one per share
        self.last_subject: str | None = None
        self.lines: list[str] = []
        self.steps = 0

    # -- helpers
    def op(self, a: int, symbol: str, b: int) -> tuple[int, str]:
        if symbol == "+":
            c = a + b
        elif symbol == "-":
            c = a - b
        elif symbol == "*":
            c = a * b
        else:
            if b == 0 or a % b:
                raise _Unsolvable(f"{a} / {b} is not exact")
            c = a // b
        if c < 0:
            raise _Unsolvable(f"{a} {symbol} {b} is negative")
        self.steps += 1
        return c, f"{a} {symbol} {b} = {c}"

    def item(self, word: str) -> str:
        if word not in _ITEM_BY_WORD:
            raise _Unsolvable(f"unknown item {word!r}")
        return _ITEM_BY_WORD[word]

    def name(self, word: str) -> str:
        if not re.fullmatch(_NAME, word) or word in _RESERVED:
            raise _Unsolvable(f"{word!r} is not a name")
        return word

    def subject(self, word: str) -> str:
        if word.lower() in ("he", "she"):
            if self.last_subject is None:
                raise _Unsolvable("pronoun with nobody to refer to")
            self.check_gender(self.last_subject, "m" if word.lower() == "he" else "f")
            return self.last_subject
        return self.name(word)

    def check_gender(self, person: str, gender: str) -> None:
        if _GENDER.get(person, gender) != gender:
            raise _Unsolvable(f"pronoun does not match {person}")

    def check_possessive(self, person: str, pos: str) -> None:
        self.check_gender(person, "m" if pos == "his" else "f")

    def known(self, person: str, item: str) -> int:
        if item not in self.counts.get(person, {}):
            raise _Unsolvable(f"{person}'s {item} are not known")
        return self.counts[person][item]

    def tracked(self, person: str, item: str) -> bool:
        return item in self.counts.get(person, {})

    def introduce(self, person: str, item: str, n: int) -> None:
        if (person, item) in self.mentioned:
            raise _Unsolvable(f"{person}'s {item} are introduced twice or after use")
        self.mentioned.add((person, item))
        self.counts.setdefault(person, {})[item] = n

    def amount(self, person: str, qty: str, verb: str) -> tuple[str, int]:
        """Resolves a QTY phrase for `person` to (item, number), writing any division."""
        if m := _QTY_NUMBER.match(qty):
            item, n = self.item(m["item"]), _int(m["n"])
            if n == 0:
                raise _Unsolvable("an action on zero items")
            self.known(person, item)
            return item, n
        if m := _QTY_PART.match(qty):
            self.check_possessive(person, m["pos"])
            item = self.item(m["item"])
            have = self.known(person, item)
            if m["frac"] in (None, "all"):
                return item, have
            n, eq = self.op(have, "/", FRACTIONS[m["frac"]])
            self.lines.append(f"{m['frac'].capitalize()} of {person}'s {_count(have, item)} "
                              f"is {eq} {_noun(n, item)}.")
            return item, n
        raise _Unsolvable(f"cannot read the amount {qty!r} after {verb!r}")

    def take(self, person: str, item: str, n: int, what: str) -> None:
        """Removes n items from a person, writing the subtraction (or 'none left')."""
        have = self.counts[person][item]
        if n == have:
            self.lines.append(f"{what}, so {person} has 0 {item} left.")
            self.counts[person][item] = 0
            return
        left, eq = self.op(have, "-", n)
        self.counts[person][item] = left
        self.lines.append(f"{what}: {eq} {_noun(left, item)}.")

    def receive(self, person: str, item: str, n: int) -> None:
        """Adds n to a recipient's known count; an unknown recipient is outside the problem."""
        if self.tracked(person, item):
            c, eq = self.op(self.counts[person][item], "+", n)
            self.counts[person][item] = c
            self.lines.append(f"{person} has {eq} {_noun(c, item)}.")
        else:
            self.mentioned.add((person, item))

    # -- sentences
    def statement(self, sentence: str) -> None:
        for kind, pattern in _STATEMENTS:
            if m := pattern.match(sentence):
                subject = self.subject(m["subj"])
                getattr(self, kind)(subject, m)
                self.last_subject = subject
                return
        raise _Unsolvable(f"not in the grammar: {sentence!r}")

    def intro(self, who: str, m: re.Match) -> None:
        for part in re.split(r",? and |, ", m["list"]):
            p = _QTY_NUMBER.match(part)
            if not p:
                raise _Unsolvable(f"cannot read {part!r}")
            self.introduce(who, self.item(p["item"]), _int(p["n"]))

    def compare(self, who: str, m: re.Match) -> None:
        other, item = self.name(m["other"]), self.item(m["item"])
        if other == who:
            raise _Unsolvable("compared with oneself")
        base = self.known(other, item)
        c, eq = self.op(base, "+" if m["dir"] == "more" else "-", _int(m["n"]))
        self.introduce(who, item, c)
        self.lines.append(f"{who} has {m['n']} {m['dir']} {item} than {other}: "
                          f"{eq} {_noun(c, item)}.")

    def times(self, who: str, m: re.Match) -> None:
        other, item = self.name(m["other"]), self.item(m["item"])
        if other == who:
            raise _Unsolvable("compared with oneself")
        base = self.known(other, item)
        if m["times"] == "half":
            c, eq = self.op(base, "/", 2)
        else:
            c, eq = self.op(base, "*", AS_MANY[m["times"]])
        self.introduce(who, item, c)
        self.lines.append(f"{who} has {m['times']} as many {item} as {other}: "
                          f"{eq} {_noun(c, item)}.")

    def gain(self, who: str, m: re.Match) -> None:
        item, n = self.item(m["item"]), _int(m["n"])
        have = self.known(who, item)
        if n == 0:
            raise _Unsolvable("an action on zero items")
        source = m["source"]
        if source is not None:
            source = self.name(source)
            if m["verb"] not in FROM_VERBS or source == who:
                raise _Unsolvable(f"cannot {m['verb']} from {source}")
            if self.tracked(source, item):
                left, eq = self.op(self.counts[source][item], "-", n)
                self.counts[source][item] = left
                self.lines.append(f"{source} has {eq} {_noun(left, item)} left.")
            else:
                self.mentioned.add((source, item))
        c, eq = self.op(have, "+", n)
        self.counts[who][item] = c
        self.lines.append(f"{who} {m['verb']} {_count(n, item)}: {eq} {_noun(c, item)}.")

    def boxes(self, who: str, m: re.Match) -> None:
        if m["box"] not in _CONTAINER_WORDS:
            raise _Unsolvable(f"unknown container {m['box']!r}")
        item, boxes, each = self.item(m["item"]), _int(m["n"]), _int(m["m"])
        have = self.known(who, item)
        if boxes == 0 or each == 0:
            raise _Unsolvable("an action on zero items")
        n, eq = self.op(boxes, "*", each)
        self.lines.append(f"{m['n']} {m['box']} of {_count(each, item)} is {eq} {_noun(n, item)}.")
        c, eq = self.op(have, "+", n)
        self.counts[who][item] = c
        self.lines.append(f"{who} {m['verb']} {_count(n, item)}: {eq} {_noun(c, item)}.")

    def loss(self, who: str, m: re.Match) -> None:
        item, n = self.amount(who, m["qty"], m["verb"])
        if m["verb"] == "eats" and not ITEMS[item][1]:
            raise _Unsolvable(f"{item} cannot be eaten")
        self.take(who, item, n, f"{who} {m['verb']} {_count(n, item)}")

    def give(self, who: str, m: re.Match) -> None:
        target = self.name(m["target"])
        if target == who:
            raise _Unsolvable("gives to oneself")
        item, n = self.amount(who, m["qty"], "gives")
        self.take(who, item, n, f"{who} gives {_count(n, item)} to {target}")
        self.receive(target, item, n)

    def multiply(self, who: str, m: re.Match) -> None:
        self.check_possessive(who, m["pos"])
        item = self.item(m["item"])
        c, eq = self.op(self.known(who, item), "*", MULTIPLY_VERBS[m["verb"]])
        self.counts[who][item] = c
        self.lines.append(f"{who} {m['verb']} {m['pos']} {item}: {eq} {_noun(c, item)}.")

    def split(self, who: str, m: re.Match) -> None:
        self.check_possessive(who, m["pos"])
        item, piles = self.item(m["item"]), _int(m["n"])
        if piles < 2:
            raise _Unsolvable("splitting into fewer than 2 piles")
        have = self.known(who, item)
        c, eq = self.op(have, "/", piles)
        self.counts[who][item] = c
        self.lines.append(f"{who} splits {_count(have, item)} into {piles} equal piles and "
                          f"keeps one: {eq} {_noun(c, item)}.")

    def share(self, who: str, m: re.Match) -> None:
        friends = _int(m["n"])
        if friends < 2:
            raise _Unsolvable("sharing among fewer than 2 friends")
        item, n = self.amount(who, m["qty"], "shares")
        each, eq = self.op(n, "/", friends)
        self.shares.setdefault(item, []).append(each)
        self.lines.append(f"{who} shares {_count(n, item)} equally among {friends} friends: "
                          f"{eq} {_noun(each, item)} each.")
        self.take(who, item, n, f"{who} gives away {_count(n, item)}")

    # -- the question
    def question(self, sentence: str) -> int:
        for kind, pattern in _QUESTIONS:
            if m := pattern.match(sentence):
                return getattr(self, kind)(m)
        raise _Unsolvable(f"not a question of the grammar: {sentence!r}")

    def ask_has(self, m: re.Match) -> int:
        who, item = self.subject(m["a"]), self.item(m["item"])
        have = self.known(who, item)
        self.lines.append(f"{who} has {_count(have, item)} now.")
        return have

    def ask_together(self, m: re.Match) -> int:
        a, b, item = self.name(m["a"]), self.name(m["b"]), self.item(m["item"])
        if a == b:
            raise _Unsolvable("the same person twice")
        total, eq = self.op(self.known(a, item), "+", self.known(b, item))
        self.lines.append(f"Together {a} and {b} have {eq} {_noun(total, item)}.")
        return total

    def ask_more(self, m: re.Match) -> int:
        a, b, item = self.subject(m["a"]), self.name(m["b"]), self.item(m["item"])
        if a == b:
            raise _Unsolvable("the same person twice")
        diff, eq = self.op(self.known(a, item), "-", self.known(b, item))
        self.lines.append(f"{a} has {eq} more {item} than {b}.")
        return diff

    def ask_each(self, m: re.Match) -> int:
        item = self.item(m["item"])
        if len(self.shares.get(item, [])) != 1:
            raise _Unsolvable(f"'each friend' needs exactly one share of {item}")
        each = self.shares[item][0]
        self.lines.append(f"Each friend gets {_count(each, item)}.")
        return each


def _split_sentences(text: str) -> list[str] | None:
    text = " ".join(text.split())
    sentences = re.findall(r"[^.?!]+[.?!]", text)
    if not sentences or "".join(sentences).replace(" ", "") != text.replace(" ", ""):
        return None
    return [s.strip() for s in sentences]


def solve(question: str) -> Problem | None:
    """Parses a question of the grammar and returns it with its worked solution, or None.

    None means the text is outside the grammar, mentions an unknown item or a person whose
    count is not known, goes negative, divides unevenly, or is otherwise ambiguous.
    """
    sentences = _split_sentences(question)
    if sentences is None or not sentences[-1].endswith("?"):
        return None
    if any(not s.endswith(".") for s in sentences[:-1]):
        return None  # a second question, or an exclamation
    solver = _Solver()
    try:
        for sentence in sentences[:-1]:
            solver.statement(sentence)
        answer = solver.question(sentences[-1])
    except _Unsolvable:
        return None
    solution = "\n".join([*solver.lines, f"Answer: {answer}"])
    return Problem(" ".join(sentences), solution, answer, solver.steps)


def verify(question: str) -> int | None:
    """The exact answer of a question of the grammar, or None if it has no single answer."""
    problem = solve(question)
    return None if problem is None else problem.answer


def count_steps(question: str) -> int | None:
    """Number of arithmetic operations the worked solution needs, or None if unsolvable."""
    problem = solve(question)
    return None if problem is None else problem.steps
