"""The question filters of the pipeline, and the verifier's choice among sampled solutions.

ScaleQuest filters synthetic questions for language, solvability and difficulty with
models; here the domain has an exact verifier (`jaxsys.data.solver`), so solvability is
decided by parsing, and difficulty by how often the solver model fails a question.
De-duplication and decontamination compare word n-grams (Jaccard similarity), which
catches the copies a question model writes with a number or a name changed.
The verifier only judges: it never writes a solution (`select_best` picks one of the
solver's own samples, or none).
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from dataclasses import dataclass

from jaxsys.data.solver import solve
from jaxsys.data.training_text import check_solution

ALLOWED_CHARS = frozenset(string.ascii_letters + string.digits + " .,?")
_WORD = re.compile(r"[a-z]+|\d[\d,]*|[.?]")


def well_formed(question: str, *, min_chars: int = 20, max_chars: int = 400) -> bool:
    """Format and charset: one line of letters, digits, spaces and ``.,?``, a capital first
    letter, sentences ending in ``.``, and one question mark, at the end."""
    return (min_chars <= len(question) <= max_chars and set(question) <= ALLOWED_CHARS
            and question[0].isupper() and question.endswith("?") and question.count("?") == 1
            and "  " not in question)


def word_ngrams(text: str, n: int) -> frozenset[tuple[str, ...]]:
    """Lower-cased word n-grams (numbers and sentence marks count as words)."""
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return frozenset([tuple(words)])
    return frozenset(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class NgramIndex:
    """Texts indexed by their word n-grams, to find near-duplicates without comparing all pairs."""

    def __init__(self, n: int, threshold: float):
        if not 0 < threshold <= 1:
            raise ValueError(f"{threshold=} must lie in (0, 1]")
        self.n, self.threshold = n, threshold
        self._grams: list[frozenset] = []
        self._postings: dict[tuple, list[int]] = defaultdict(list)
        self._exact: set[str] = set()

    def add(self, text: str) -> None:
        grams = word_ngrams(text, self.n)
        for g in grams:
            self._postings[g].append(len(self._grams))
        self._grams.append(grams)
        self._exact.add(normalize(text))

    def match(self, text: str) -> str | None:
        """"exact", "ngram" (Jaccard >= threshold with some indexed text) or None."""
        if normalize(text) in self._exact:
            return "exact"
        grams = word_ngrams(text, self.n)
        shared: dict[int, int] = defaultdict(int)
        for g in grams:
            for i in self._postings.get(g, ()):
                shared[i] += 1
        for i, common in shared.items():
            if common / (len(grams) + len(self._grams[i]) - common) >= self.threshold:
                return "ngram"
        return None


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


@dataclass(frozen=True)
class FilterConfig:
    ngram: int = 3
    dedup_threshold: float = 0.7  # Jaccard of word 3-grams: one number or name changed in a kept question
    contamination_threshold: float = 0.6  # stricter against test problems
    min_steps: int = 2  # fewer verifier steps is trivial when the solver also never fails


def static_filters(questions: list[str], *, seeds: list[str], tests: list[str],
                   config: FilterConfig) -> tuple[list[dict], dict]:
    """Format, solvability, de-duplication (against seeds and earlier questions), then
    decontamination against every test problem. Returns one record per question (with
    ``dropped_by``: None if kept) and the count left after each filter (``after_NAME``)."""
    kept_index = NgramIndex(config.ngram, config.dedup_threshold)
    for q in seeds:
        kept_index.add(q)
    test_index = NgramIndex(config.ngram, config.contamination_threshold)
    for q in tests:
        test_index.add(q)
    records, counts = [], {"sampled": len(questions)}
    for q in questions:
        record = {"question": q, "dropped_by": None}
        if not well_formed(q):
            record["dropped_by"] = "format"
        elif (problem := solve(q)) is None:
            record["dropped_by"] = "solvable"
        else:
            record.update(answer=problem.answer, steps=problem.steps)
            duplicate = kept_index.match(q)
            if duplicate is not None:
                record["dropped_by"] = f"dedup_{duplicate}"
            elif test_index.match(q) is not None:
                record["dropped_by"] = "decontaminated"
        if record["dropped_by"] is None:
            kept_index.add(q)
        records.append(record)
    order = ["format", "solvable", "dedup_exact", "dedup_ngram", "decontaminated"]
    left = len(questions)
    for name in order:
        left -= sum(r["dropped_by"] == name for r in records)
        counts[f"after_{name}"] = left
    return records, counts


def attempt_record(question: str, attempts: list[str]) -> dict:
    """The verifier's reading of k sampled solutions: which are right, and the best one."""
    correct = [check_solution(question, a) for a in attempts]
    best = select_best(question, attempts)
    return {"question": question, "k": len(attempts), "correct": sum(correct),
            "failure_rate": 1 - sum(correct) / len(attempts), "best": best}


def select_best(question: str, attempts: list[str]) -> str | None:
    """The shortest of the sampled solutions that the verifier accepts (exact answer and
    every written equation right), or None: the verifier picks, it never writes."""
    accepted = [a for a in attempts if check_solution(question, a)]
    return min(accepted, key=len) if accepted else None


def difficulty_keep(record: dict, steps: int, config: FilterConfig) -> str | None:
    """Why a question fails the difficulty filter, or None: "unanswered" when no sample was
    right (no response to keep), "trivial" when every sample was right on a question of
    fewer than `min_steps` operations."""
    if record["correct"] == 0:
        return "unanswered"
    if record["failure_rate"] == 0 and steps < config.min_steps:
        return "trivial"
    return None
