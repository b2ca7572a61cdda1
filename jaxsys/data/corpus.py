"""Embedded arithmetic word problems: a seeded generator and an exact verifier for one grammar.

The corpus is the default training data (nothing is downloaded) and the language of the
ScaleQuest-style question synthesis in `experiments/scalequest/`: a small model writes NEW
questions in this grammar and `verify` decides whether each one is solvable and what its
single exact answer is. So the verifier is a real parser: it reads a question sentence by
sentence, tracks every person's count of every item, and rejects anything outside the
grammar, unknown people or items, negative counts, uneven division, and ambiguity. The
generator composes the same sentences while tracking its own counts, and every problem it
emits is re-solved by the parser, so the two are checked against each other.

Grammar (``N``, ``M``: non-negative integers written in digits, ``1,200`` allowed; ``NAME``:
one capitalised word; ``He``/``She`` refer to the subject of the previous sentence, and
``his``/``her`` must match it; ``ITEM``: one of `ITEMS`, singular or plural; ``QTY``:
``N ITEM`` | ``his/her ITEM`` (all of them) | ``half/a third/a quarter/all of his/her ITEM``)::

    NAME has N ITEM [and M ITEM ...].              introduce counts (first mention only)
    NAME has N more|fewer ITEM than NAME.          introduce relative to a known count
    NAME has twice|three times|four times|half as many ITEM as NAME.
    S buys|finds|gets|collects|wins|receives N [more] ITEM.
    S buys|gets|receives N [more] ITEM from NAME.  NAME loses them if their count is known
    S buys|gets N boxes|bags|packs|jars of M ITEM [each].
    S eats|loses|sells|uses|gives away QTY.        eats: food items only
    S gives QTY to NAME.                           NAME gains them if their count is known
    S doubles|triples his/her ITEM.
    S splits his/her ITEM into N equal piles|groups and keeps one [pile|group].
    S shares QTY equally among N friends[, keeping none].

and exactly one final question::

    How many ITEM does NAME|he|she have [now|left|in the end]?
    How many ITEM do NAME and NAME have together|altogether|in total?
    How many more ITEM does NAME|he|she have than NAME?
    How many ITEM does each friend get?            after exactly one share of ITEM

A person's count of an item is known only from a ``has`` sentence; people who only receive
or give (``to Leo``, ``from Leo`` without an introduction) are outside the problem, and asking
about them is unsolvable. ``steps`` counts the arithmetic operations (``a + b = c`` lines) of
the worked solution, including the bookkeeping of a known recipient's count.

Training text (`format_example`)::

    Question: Mia has 12 apples. She buys 5 more apples. How many apples does Mia have now?
    Solution: Mia buys 5 apples: 12 + 5 = 17 apples.
    Mia has 17 apples now.
    Answer: 17
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

FEMALE_NAMES = ("Mia", "Emma", "Ava", "Zoe", "Lily", "Nora", "Ruth", "Ines", "Maya", "Sara",
                "Chloe", "Grace", "Hana", "Julia", "Lucy", "Olivia", "Amara", "Elena")
MALE_NAMES = ("Leo", "Omar", "Ben", "Jack", "Liam", "Noah", "Ravi", "Ivan", "Theo", "Hugo",
              "Kai", "Marco", "Felix", "Diego", "Tom", "Yusuf", "Arjun", "Pablo")
_GENDER = {**{n: "f" for n in FEMALE_NAMES}, **{n: "m" for n in MALE_NAMES}}

# plural -> (singular, edible)
ITEMS = {
    "apples": ("apple", True), "pears": ("pear", True), "oranges": ("orange", True),
    "cookies": ("cookie", True), "cupcakes": ("cupcake", True), "candies": ("candy", True),
    "bananas": ("banana", True), "plums": ("plum", True), "marbles": ("marble", False),
    "pencils": ("pencil", False), "stickers": ("sticker", False), "books": ("book", False),
    "stamps": ("stamp", False), "cards": ("card", False), "shells": ("shell", False),
    "coins": ("coin", False), "balloons": ("balloon", False), "crayons": ("crayon", False),
}
_ITEM_BY_WORD = {**{p: p for p in ITEMS}, **{s: p for p, (s, _) in ITEMS.items()}}

GAIN_VERBS = ("buys", "finds", "gets", "collects", "wins", "receives")
FROM_VERBS = ("buys", "gets", "receives")
LOSS_VERBS = ("eats", "loses", "sells", "uses", "gives away")
CONTAINERS = {"boxes": "box", "bags": "bag", "packs": "pack", "jars": "jar"}
_CONTAINER_WORDS = set(CONTAINERS) | set(CONTAINERS.values())
MULTIPLY_VERBS = {"doubles": 2, "triples": 3}
AS_MANY = {"twice": 2, "three times": 3, "four times": 4}
FRACTIONS = {"half": 2, "a third": 3, "a quarter": 4}
_RESERVED = {"He", "She", "His", "Her", "They", "It", "The", "How", "Each", "Question",
             "Solution", "Answer"}


@dataclass(frozen=True)
class Problem:
    """One word problem: question text, worked solution ending in ``Answer: N``, answer, ops."""
    question: str
    solution: str
    answer: int
    steps: int


# --- the parser / verifier -------------------------------------------------------------

_NUM = r"\d{1,3}(?:,\d{3})+|\d+"
_NAME = r"[A-Z][a-z]+"
_W = r"[a-z]+"


def _alt(words) -> str:
    return "|".join(re.escape(w) for w in words)


_STATEMENTS = [(kind, re.compile(p)) for kind, p in (
    ("compare", rf"^(?P<subj>\S+) has (?P<n>{_NUM}) (?P<dir>more|fewer) (?P<item>{_W}) "
                rf"than (?P<other>\S+)\.$"),
    ("times", rf"^(?P<subj>\S+) has (?P<times>{_alt(AS_MANY)}|half) as many (?P<item>{_W}) "
              rf"as (?P<other>\S+)\.$"),
    ("intro", r"^(?P<subj>\S+) has (?P<list>.+)\.$"),
    ("boxes", rf"^(?P<subj>\S+) (?P<verb>buys|gets) (?P<n>{_NUM}) (?P<box>{_W}) of "
              rf"(?P<m>{_NUM}) (?P<item>{_W})(?: each)?\.$"),
    ("gain", rf"^(?P<subj>\S+) (?P<verb>{_alt(GAIN_VERBS)}) (?P<n>{_NUM}) (?:more )?"
             rf"(?P<item>{_W})(?: from (?P<source>\S+))?\.$"),
    ("loss", rf"^(?P<subj>\S+) (?P<verb>{_alt(LOSS_VERBS)}) (?P<qty>.+)\.$"),
    ("give", r"^(?P<subj>\S+) gives (?P<qty>.+) to (?P<target>\S+)\.$"),
    ("multiply", rf"^(?P<subj>\S+) (?P<verb>{_alt(MULTIPLY_VERBS)}) (?P<pos>his|her) "
                 rf"(?P<item>{_W})\.$"),
    ("split", rf"^(?P<subj>\S+) splits (?P<pos>his|her) (?P<item>{_W}) into (?P<n>{_NUM}) "
              rf"equal (?:piles|groups) and keeps one(?: pile| group)?\.$"),
    ("share", rf"^(?P<subj>\S+) shares (?P<qty>.+?) equally among (?P<n>{_NUM}) "
              rf"friends(?:, keeping none)?\.$"),
)]
_QUESTIONS = [(kind, re.compile(p)) for kind, p in (
    ("ask_has", rf"^How many (?P<item>{_W}) does (?P<a>\S+) have(?: now| left| in the end)?\?$"),
    ("ask_together", rf"^How many (?P<item>{_W}) do (?P<a>\S+) and (?P<b>\S+) have "
                     r"(?:together|altogether|in total)\?$"),
    ("ask_more", rf"^How many more (?P<item>{_W}) does (?P<a>\S+) have than (?P<b>\S+)\?$"),
    ("ask_each", rf"^How many (?P<item>{_W}) does each friend get\?$"),
)]
_QTY_NUMBER = re.compile(rf"^(?P<n>{_NUM}) (?P<item>{_W})$")  # also one part of an intro
_QTY_PART = re.compile(rf"^(?:(?P<frac>{_alt(FRACTIONS)}|all) of )?(?P<pos>his|her) "
                       rf"(?P<item>{_W})$")
_EQUATION = re.compile(rf"({_NUM}) ([-+*/]) ({_NUM}) = ({_NUM})")


class _Unsolvable(Exception):
    """Raised inside the parser; `solve` turns it into None."""


def _noun(n: int, item: str) -> str:
    return ITEMS[item][0] if n == 1 else item


def _count(n: int, item: str) -> str:
    return f"{n} {_noun(n, item)}"


def _int(text: str) -> int:
    return int(text.replace(",", ""))


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


_ANSWER = re.compile(rf"^\s*Answer:\s*(-?(?:{_NUM}))\s*\.?\s*$", re.MULTILINE)


def extract_answer(text: str) -> int | None:
    """The number on the first ``Answer: N`` line of a solution text, or None.

    The first one, not the last: a model generating past its answer often runs on into a
    new ``Question:``/``Answer:`` pair, and the first answer is the one it gave.
    """
    m = _ANSWER.search(text)
    return None if m is None else _int(m.group(1))


def check_solution(question: str, solution_text: str) -> bool:
    """True when the question is solvable, the text's answer is the exact answer, and every
    ``a op b = c`` equation the text writes before its answer is arithmetically right."""
    answer = verify(question)
    if answer is None or extract_answer(solution_text) != answer:
        return False
    body = solution_text[:_ANSWER.search(solution_text).start()]
    for a, symbol, b, c in _EQUATION.findall(body):
        a, b, c = _int(a), _int(b), _int(c)
        exact = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[symbol]
        if exact != c:
            return False
    return True


def format_prompt(question: str) -> str:
    """The text before the solution: what a model is given to write a solution."""
    return f"Question: {question}\nSolution:"


def format_question_solution(question: str, solution: str) -> str:
    """Training text for any (question, solution) pair, in the corpus format."""
    return f"{format_prompt(question)} {solution}"


def format_example(problem: Problem) -> str:
    """Training text: ``Question: Q\\nSolution: line\\n...\\nAnswer: N`` (see module doc)."""
    return format_question_solution(problem.question, problem.solution)


# --- the generator ---------------------------------------------------------------------

class _Composer:
    """Writes one problem with an exact operation budget, tracking counts independently of
    the parser so that `generate_problems` can check one against the other."""

    def __init__(self, rng: random.Random, steps: int):
        self.rng, self.budget = rng, steps
        people = rng.sample(FEMALE_NAMES + MALE_NAMES, 4)
        self.main, self.friend, self.bystander, self.outsider = people
        self.item, self.other_item = rng.sample(list(ITEMS), 2)
        self.counts: dict[str, int] = {}  # person -> count of self.item
        self.sentences: list[str] = []
        self.last: str | None = None
        self.steps = 0

    def say(self, subject: str, text: str) -> None:
        use_pronoun = subject == self.last and self.rng.random() < 0.8
        word = ("She" if _GENDER[subject] == "f" else "He") if use_pronoun else subject
        self.sentences.append(f"{word} {text}.")
        self.last = subject

    def pos(self, person: str) -> str:
        return "her" if _GENDER[person] == "f" else "his"

    def n_items(self, n: int, item: str | None = None) -> str:
        return _count(n, item or self.item)

    def compose(self) -> tuple[str, int] | None:
        rng, item = self.rng, self.item
        ask = rng.choice(["has", "has", "has", "together", "more", "each"])
        ask_cost = 1 if ask in ("together", "more", "each") else 0
        start = rng.choice([rng.randint(2, 30), 12 * rng.randint(1, 4), 10 * rng.randint(1, 6)])
        self.counts[self.main] = start
        if rng.random() < 0.2:
            self.say(self.main, f"has {self.n_items(start)} and "
                                f"{self.n_items(rng.randint(2, 20), self.other_item)}")
        else:
            self.say(self.main, f"has {self.n_items(start)}")
        if rng.random() < 0.2:
            self.say(self.bystander, f"has {self.n_items(rng.randint(2, 40), self.other_item)}")
        if ask in ("together", "more") or rng.random() < 0.35:
            self.introduce_friend(allow_ops=self.budget - ask_cost >= 1)
        while self.steps < self.budget - ask_cost:
            if not self.event(self.budget - ask_cost - self.steps):
                return None
        if ask == "each":
            return self.share_question()
        if ask == "has":
            who = rng.choice([p for p in self.counts])
            tail = rng.choice(["", " now", " left", " in the end"])
            word = who if who != self.last or rng.random() < 0.5 else (
                "she" if _GENDER[who] == "f" else "he")
            self.sentences.append(f"How many {item} does {word} have{tail}?")
            return " ".join(self.sentences), self.counts[who]
        a, b = self.main, self.friend
        if ask == "together":
            self.sentences.append(f"How many {item} do {a} and {b} have "
                                  f"{rng.choice(['together', 'altogether', 'in total'])}?")
            self.steps += 1
            return " ".join(self.sentences), self.counts[a] + self.counts[b]
        if self.counts[a] < self.counts[b]:
            a, b = b, a
        self.sentences.append(f"How many more {item} does {a} have than {b}?")
        self.steps += 1
        return " ".join(self.sentences), self.counts[a] - self.counts[b]

    def introduce_friend(self, allow_ops: bool) -> None:
        rng, base = self.rng, self.counts[self.main]
        choice = rng.choice(["plain", "more", "fewer", "times"]) if allow_ops else "plain"
        if choice == "more":
            n = rng.randint(1, 15)
            self.say(self.friend, f"has {n} more {_noun(n, self.item)} than {self.main}")
            value = base + n
        elif choice == "fewer" and base > 1:
            n = rng.randint(1, base - 1)
            self.say(self.friend, f"has {n} fewer {_noun(n, self.item)} than {self.main}")
            value = base - n
        elif choice == "times" and base <= 40:
            word = rng.choice(list(AS_MANY) + (["half"] if base % 2 == 0 else []))
            self.say(self.friend, f"has {word} as many {self.item} as {self.main}")
            value = base // 2 if word == "half" else base * AS_MANY[word]
        else:
            value = rng.randint(0, 30)
            self.say(self.friend, f"has {self.n_items(value)}")
            choice = "plain"
        self.steps += choice != "plain"
        self.counts[self.friend] = value

    def event(self, room: int) -> bool:
        """Appends one event costing at most `room` operations; False if none fits."""
        rng, item = self.rng, self.item
        who = self.main if self.friend not in self.counts or rng.random() < 0.75 else self.friend
        other = self.friend if who == self.main else self.main
        have, tracked_other = self.counts[who], other in self.counts
        options = ["gain", "gain"]
        if room >= 2:
            options += ["boxes"]
        if have > 0:
            options += ["loss", "loss", "give"]
            if tracked_other and room >= 2:
                options += ["give_known"]
            if have <= 60:
                options += ["multiply"]
            if any(have % d == 0 for d in range(2, 7)):
                options += ["split"]
            if room >= 2 and any(have % d == 0 for d in FRACTIONS.values()):
                options += ["fraction"]
        if tracked_other and self.counts[other] > 0 and room >= 2:
            options += ["from_known"]
        kind = rng.choice(options)
        if kind == "gain":
            n = rng.randint(1, 20)
            verb = rng.choice(GAIN_VERBS)
            if rng.random() < 0.2 and verb in FROM_VERBS:
                self.say(who, f"{verb} {self.n_items(n)} from {self.outsider}")
            else:
                self.say(who, f"{verb} {n} more {_noun(n, item)}")
            self.counts[who] += n
            self.steps += 1
        elif kind == "boxes":
            boxes, each = rng.randint(2, 6), rng.randint(2, 12)
            box = rng.choice(list(CONTAINERS))
            self.say(who, f"{rng.choice(['buys', 'gets'])} {boxes} {box} of "
                          f"{self.n_items(each)}{rng.choice(['', ' each'])}")
            self.counts[who] += boxes * each
            self.steps += 2
        elif kind == "loss":
            n = rng.randint(1, have)
            verbs = [v for v in LOSS_VERBS if v != "eats" or ITEMS[item][1]]
            self.say(who, f"{rng.choice(verbs)} {self.n_items(n)}")
            self.counts[who] -= n
            self.steps += n != have
        elif kind in ("give", "give_known"):
            n = rng.randint(1, have)
            target = other if kind == "give_known" else self.outsider
            self.say(who, f"gives {self.n_items(n)} to {target}")
            self.counts[who] -= n
            self.steps += (n != have) + (kind == "give_known")
            if kind == "give_known":
                self.counts[other] += n
        elif kind == "from_known":
            n = rng.randint(1, self.counts[other])
            self.say(who, f"{rng.choice(FROM_VERBS)} {self.n_items(n)} from {other}")
            self.counts[other] -= n
            self.counts[who] += n
            self.steps += 2
        elif kind == "multiply":
            verb = rng.choice(list(MULTIPLY_VERBS))
            self.say(who, f"{verb} {self.pos(who)} {item}")
            self.counts[who] *= MULTIPLY_VERBS[verb]
            self.steps += 1
        elif kind == "split":
            piles = rng.choice([d for d in range(2, 7) if have % d == 0])
            self.say(who, f"splits {self.pos(who)} {item} into {piles} equal "
                          f"{rng.choice(['piles', 'groups'])} and keeps one")
            self.counts[who] //= piles
            self.steps += 1
        elif kind == "fraction":
            word = rng.choice([w for w, d in FRACTIONS.items() if have % d == 0])
            part = have // FRACTIONS[word]
            self.steps += 1 + (part != have)  # the division, then the subtraction
            if rng.random() < 0.5:
                self.say(who, f"gives {word} of {self.pos(who)} {item} to {self.outsider}")
            else:
                verbs = [v for v in LOSS_VERBS if v != "eats" or ITEMS[item][1]]
                self.say(who, f"{rng.choice(verbs)} {word} of {self.pos(who)} {item}")
            self.counts[who] -= part
        return True

    def share_question(self) -> tuple[str, int] | None:
        who, item = self.main, self.item
        have = self.counts[who]
        divisors = [d for d in range(2, 7) if have % d == 0 and have > 0]
        if not divisors:
            return None
        friends = self.rng.choice(divisors)
        self.say(who, f"shares {self.pos(who)} {item} equally among {friends} friends"
                      f"{self.rng.choice(['', ', keeping none'])}")
        self.sentences.append(f"How many {item} does each friend get?")
        self.steps += 1
        return " ".join(self.sentences), have // friends


def generate_problems(n: int, *, seed: int, min_steps: int = 1,
                      max_steps: int = 3) -> list[Problem]:
    """`n` problems, a pure function of the arguments; the first k of n equal
    ``generate_problems(k, ...)``. Each has between min_steps and max_steps operations."""
    if n < 0 or not 0 <= min_steps <= max_steps:
        raise ValueError(f"need n >= 0 and 0 <= min_steps <= max_steps, got {n=}, "
                         f"{min_steps=}, {max_steps=}")
    rng = random.Random(seed)
    problems: list[Problem] = []
    while len(problems) < n:
        composer = _Composer(rng, rng.randint(min_steps, max_steps))
        composed = composer.compose()
        if composed is None or composer.steps != composer.budget:
            continue  # the drawn events could not fit the budget exactly; draw again
        question, answer = composed
        problem = solve(question)
        if problem is None or problem.answer != answer or problem.steps != composer.steps:
            raise RuntimeError(f"generator and verifier disagree on {question!r}: "
                               f"generator says {answer} in {composer.steps} steps, "
                               f"verifier says {problem}")
        problems.append(problem)
    return problems
