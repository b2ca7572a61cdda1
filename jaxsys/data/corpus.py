"""Embedded arithmetic word problems: a seeded generator and an exact verifier for one grammar.

The corpus is the default training data (nothing is downloaded) and the language of the
ScaleQuest-style question synthesis in `experiments/scalequest/`: a small model writes NEW
questions in this grammar and `verify` decides whether each one is solvable and what its
single exact answer is. So the verifier is a real parser: it reads a question sentence by
sentence, tracks every person's count of every item, and rejects anything outside the
grammar, unknown people or items, negative counts, uneven division, and ambiguity. The
generator composes the same sentences while tracking its own counts, and every problem it
emits is re-solved by the parser, so the two are checked against each other.

The pieces, one module each: `jaxsys.data.grammar` (vocabulary and sentence patterns),
`jaxsys.data.solver` (the parser: `solve`, `verify`, `count_steps`) and
`jaxsys.data.training_text` (``Question: ... Solution: ... Answer: N``). This module holds
the generator and re-exports the rest, so ``corpus.verify`` and friends keep working.
"""
from __future__ import annotations

import random

from jaxsys.data.grammar import (
    _GENDER,
    AS_MANY,
    CONTAINERS,
    FEMALE_NAMES,
    FRACTIONS,
    FROM_VERBS,
    GAIN_VERBS,
    ITEMS,
    LOSS_VERBS,
    MALE_NAMES,
    MULTIPLY_VERBS,
    _count,
    _noun,
)
from jaxsys.data.solver import Problem, count_steps, solve, verify
from jaxsys.data.training_text import (
    check_solution,
    extract_answer,
    format_example,
    format_prompt,
    format_question_solution,
)

__all__ = [
    "AS_MANY", "CONTAINERS", "FEMALE_NAMES", "FRACTIONS", "FROM_VERBS", "GAIN_VERBS", "ITEMS",
    "LOSS_VERBS", "MALE_NAMES", "MULTIPLY_VERBS", "Problem", "check_solution", "count_steps",
    "extract_answer", "format_example", "format_prompt", "format_question_solution",
    "generate_problems", "solve", "verify",
]


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
