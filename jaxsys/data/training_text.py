"""Training text of the corpus: how a question and its solution are written, and read back.

Training text (`format_example`)::

    Question: Mia has 12 apples. She buys 5 more apples. How many apples does Mia have now?
    Solution: Mia buys 5 apples: 12 + 5 = 17 apples.
    Mia has 17 apples now.
    Answer: 17
"""
from __future__ import annotations

import re

from jaxsys.data.grammar import _NUM, _int
from jaxsys.data.solver import Problem, verify

_EQUATION = re.compile(rf"({_NUM}) ([-+*/]) ({_NUM}) = ({_NUM})")
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
