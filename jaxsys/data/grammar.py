"""The grammar of the embedded arithmetic word problems: its vocabulary and sentence patterns.

`jaxsys.data.solver` reads questions with these patterns and `jaxsys.data.corpus` writes
them; both take their names, items and verbs from here.

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
"""
from __future__ import annotations

import re

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


def _noun(n: int, item: str) -> str:
    return ITEMS[item][0] if n == 1 else item


def _count(n: int, item: str) -> str:
    return f"{n} {_noun(n, item)}"


def _int(text: str) -> int:
    return int(text.replace(",", ""))
