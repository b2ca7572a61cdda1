"""The stages of the pipeline, in order, over one run folder (see the package docstring)."""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from jaxsys.config import ModelConfig
from jaxsys.data.corpus import generate_problems
from jaxsys.data.tokenizer import ByteTokenizer, Tokenizer, WordTokenizer
from jaxsys.data.training_text import format_example, format_question_solution
from jaxsys.train import TrainConfig

from experiments.scalequest import filters, qpo
from experiments.scalequest.models import (
    Sampler, accuracy, load_params, question_document, sample_questions, save_params, solve_questions, train_lm)
from experiments.scalequest.stages import Stages

log = logging.getLogger("scalequest")
STUDENTS = ("seeds_only", "more_generator_data", "unfiltered", "full", "full_no_qpo")
TEST_SETS = ("in_dist", "harder")


@dataclass(frozen=True)
class PipelineConfig:
    model: ModelConfig  # its vocab_size is set to the tokenizer's (rounded up to 64)
    # "word": the seeds' words as single ids, digits one by one, other text as bytes
    # (`jaxsys.data.tokenizer.WordTokenizer`, fit on the seeds); "byte": UTF-8 bytes.
    tokenizer: str = "word"
    seeds: int = 1000
    seed_steps: tuple[int, int] = (1, 3)  # operations per seed (and in_dist test) problem
    harder_steps: tuple[int, int] = (4, 6)
    tests: int = 200  # problems per test set
    # 256 word tokens hold a whole example of 1-3 operations (as 512 bytes do for all but 0.5%).
    # `small` at 3e-3 ended at loss 0.80 where the 0.9M quick model reached 0.37 (README).
    solver: TrainConfig = TrainConfig(steps=600, batch_size=16, seq_len=256, learning_rate=1e-3,
                                      warmup_steps=30, log_every=50, ckpt_every=200, keep_last=1)
    # Every student gets this budget: the same steps, batch and sequence length (a fresh init).
    student: TrainConfig = TrainConfig(steps=600, batch_size=16, seq_len=256, learning_rate=1e-3,
                                       warmup_steps=30, log_every=50, ckpt_every=200, keep_last=1)
    qft: TrainConfig = TrainConfig(steps=100, batch_size=16, seq_len=128, learning_rate=1e-3,
                                   warmup_steps=10, log_every=50, ckpt_every=100, keep_last=1)
    qpo: qpo.QPOConfig = qpo.QPOConfig()
    # Sampled by each question model. With 4,096 the full run kept 90 QFT questions (its solver
    # answers 0.08 of in_dist problems): 90 beside 1,000 seeds, where --quick had 401 beside 600.
    questions: int = 16384
    question_temperature: float = 1.0
    k: int = 4  # solver samples per question (difficulty and responses)
    solve_temperature: float = 0.8
    filters: filters.FilterConfig = filters.FilterConfig()
    sample_batch: int = 64
    question_len: int = 128  # the question sampler's cache (tokens)
    solution_len: int = 320  # the solution sampler's cache: prompt + solution
    solution_tokens: int = 160  # new tokens per solution of a test problem (greedy evaluation)
    attempt_tokens: int = 160  # new tokens per sampled solution of a synthetic question
    seed: int = 0
    students: tuple[str, ...] = field(default=STUDENTS)

    def student_tc(self) -> TrainConfig:
        return dataclasses.replace(self.student, seed=self.seed + 1)


def problem_record(problem) -> dict:
    return dataclasses.asdict(problem)


def run(pc: PipelineConfig, st: Stages, mesh) -> dict:
    """Runs (or reads back) every stage under `st`; student -> test set -> accuracy."""
    root = st.root
    lo, hi = pc.seed_steps
    seeds = st.run("seeds", lambda: _problems(pc.seeds, pc.seed + 100, lo, hi))
    tests = {"in_dist": st.run("test_in_dist", lambda: _problems(pc.tests, pc.seed + 200, lo, hi)),
             "harder": st.run("test_harder", lambda: _problems(pc.tests, pc.seed + 300, *pc.harder_steps))}
    seed_questions = [p["question"] for p in seeds]
    test_questions = [p["question"] for t in tests.values() for p in t]
    seed_docs = [format_example(_as_problem(p)) for p in seeds]
    tok = _tokenizer(st.run("tokenizer", lambda: _fit_tokenizer(pc.tokenizer, seed_docs)))
    pc = dataclasses.replace(pc, model=dataclasses.replace(pc.model, vocab_size=-(-tok.vocab_size // 64) * 64))

    # 1. The solver.
    solver_params = _train_stage(st, "solver", pc.model, tok, seed_docs, pc.solver, mesh)
    question_sampler = Sampler(pc.model, tok, batch=pc.sample_batch, max_len=pc.question_len)
    solution_sampler = Sampler(pc.model, tok, batch=pc.sample_batch, max_len=pc.solution_len)
    # The solver's own greedy accuracy: the level the synthetic responses are drawn from.
    st.run("solver_accuracy", lambda: _evaluate("solver", solver_params, tests, solution_sampler, pc))

    # 2. QFT: the solver fine-tuned on questions alone, then sampled from an empty user turn.
    qft_params = _train_stage(st, "qft", pc.model, tok, [question_document(q) for q in seed_questions], pc.qft,
                              mesh, init_params=solver_params)
    qft_questions = st.run("qft_questions", lambda: _sample(question_sampler, qft_params, pc, pc.seed + 1))

    def pipeline(tag: str, questions: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
        statics = st.run(f"filter_{tag}", lambda: filters.static_filters(
            [q["question"] for q in questions], seeds=seed_questions, tests=test_questions, config=pc.filters))
        kept = [r for r in statics if r["dropped_by"] is None]
        attempts = st.run(f"attempts_{tag}", lambda: _attempts(solution_sampler, solver_params, kept, pc))
        responses = st.run(f"responses_{tag}", lambda: _responses(kept, attempts, pc))
        return statics, attempts, responses

    statics_qft, attempts_qft, responses_qft = pipeline("qft", qft_questions)

    # 3. QPO: preference pairs from the QFT samples' labels, DPO, and new samples.
    pairs = st.run("qpo_pairs", lambda: _pairs(statics_qft, attempts_qft, pc))
    qpo_path = root / "models" / "qpo.npz"
    if not qpo_path.exists():
        t0 = time.perf_counter()
        if pairs:
            params, rows = qpo.train_dpo(pc.model, tok, qft_params, pairs, pc.qpo)
        else:
            log.warning("no preference pairs (no chosen or no rejected question): QPO keeps the QFT model")
            params, rows = qft_params, []
        st.run("qpo_train", lambda: (rows, {"steps": len(rows), "pairs": len(pairs),
                                            "last_loss": rows[-1]["loss"] if rows else None,
                                            "seconds": time.perf_counter() - t0}))
        save_params(qpo_path, params)
    qpo_params = load_params(qpo_path, pc.model)
    qpo_questions = st.run("qpo_questions", lambda: _sample(question_sampler, qpo_params, pc, pc.seed + 2))
    _, _, responses_qpo = pipeline("qpo", qpo_questions)

    # 6. Students with one budget; synthetic sets capped at the full pipeline's size.
    n_syn = len(responses_qpo)
    unfiltered = st.run("unfiltered", lambda: _unfiltered(solution_sampler, solver_params,
                                                          qpo_questions[:n_syn], pc))
    extra = {
        "seeds_only": [],
        "more_generator_data": [format_example(_as_problem(p)) for p in
                                st.run("generator_extra", lambda: _problems(n_syn, pc.seed + 400, lo, hi))[0:n_syn]],
        "unfiltered": [format_question_solution(r["question"], r["solution"]) for r in unfiltered],
        "full": [format_question_solution(r["question"], r["solution"]) for r in responses_qpo],
        "full_no_qpo": [format_question_solution(r["question"], r["solution"]) for r in responses_qft[:n_syn]],
    }
    results = {}
    for name in pc.students:
        docs = seed_docs + extra[name]
        random.Random(pc.seed).shuffle(docs)
        rows = st.run(f"student_{name}", lambda: _student(name, docs, pc, tok, root, mesh, tests, solution_sampler))
        results[name] = {r["test_set"]: r["accuracy"] for r in rows}
    return results


def _as_problem(record: dict):
    from jaxsys.data.solver import Problem
    return Problem(**record)


def _problems(n: int, seed: int, lo: int, hi: int) -> tuple[list[dict], dict]:
    problems = [problem_record(p) for p in generate_problems(n, seed=seed, min_steps=lo, max_steps=hi)]
    return problems, {"problems": len(problems)}


def _fit_tokenizer(kind: str, docs: list[str]) -> tuple[list[dict], dict]:
    if kind == "byte":
        tokenizer: Tokenizer = ByteTokenizer()
        records = [{"kind": "byte"}]
    elif kind == "word":
        tokenizer = WordTokenizer.fit(docs)
        records = [{"kind": "word", "words": tokenizer.words}]
    else:
        raise ValueError(f"PipelineConfig.tokenizer={kind!r}: use 'word' or 'byte'")
    lengths = [len(ids) for ids in tokenizer.encode_batch(docs, add_bos=True, add_eos=True)]
    return records, {"kind": kind, "vocab_size": tokenizer.vocab_size, "seed_tokens_mean": sum(lengths) / len(lengths),
                     "seed_tokens_max": max(lengths)}


def _tokenizer(records: list[dict]) -> Tokenizer:
    return WordTokenizer(records[0]["words"]) if records[0]["kind"] == "word" else ByteTokenizer()


def _train_stage(st: Stages, name: str, config, tokenizer, docs, tc, mesh, init_params=None):
    ckpt = st.root / "models" / name
    params, summary = train_lm(ckpt, config, tokenizer, docs, tc, mesh, init_params=init_params)
    st.run(name, lambda: ([summary], {"documents": len(docs), "steps": summary["steps"],
                                      "last_loss": summary["last_loss"], "seconds": summary["wall_s"]}))
    return params


def _sample(sampler, params, pc: PipelineConfig, seed: int) -> tuple[list[dict], dict]:
    questions = sample_questions(sampler, params, pc.questions, temperature=pc.question_temperature, seed=seed)
    return [{"question": q} for q in questions], {"sampled": len(questions)}


def _attempts(sampler, params, kept: list[dict], pc: PipelineConfig) -> tuple[list[dict], dict]:
    questions = [r["question"] for r in kept]
    solutions = solve_questions(sampler, params, questions, k=pc.k, temperature=pc.solve_temperature,
                                seed=pc.seed + 7, max_new_tokens=pc.attempt_tokens)
    records = [{**filters.attempt_record(q, s), "attempts": s} for q, s in zip(questions, solutions)]
    return records, {"questions": len(records), "samples": len(records) * pc.k,
                     "correct_samples": sum(r["correct"] for r in records)}


def _responses(kept: list[dict], attempts: list[dict], pc: PipelineConfig) -> tuple[list[dict], dict]:
    responses, counts = [], {"questions": len(kept), "unanswered": 0, "trivial": 0}
    for static, attempt in zip(kept, attempts):
        reason = filters.difficulty_keep(attempt, static["steps"], pc.filters)
        if reason is not None:
            counts[reason] += 1
            continue
        responses.append({"question": static["question"], "solution": attempt["best"], "answer": static["answer"],
                          "steps": static["steps"], "failure_rate": attempt["failure_rate"]})
    counts["kept"] = len(responses)
    return responses, counts


def _pairs(statics: list[dict], attempts: list[dict], pc: PipelineConfig) -> tuple[list[dict], dict]:
    by_question = {a["question"]: a for a in attempts}
    labels = [(r["question"], qpo.label(r, by_question.get(r["question"]) if r["dropped_by"] is None else None,
                                        min_steps=pc.filters.min_steps)) for r in statics]
    chosen = [q for q, lab in labels if lab == "chosen"]
    rejected = [q for q, lab in labels if lab == "rejected"]
    pairs = qpo.make_pairs(chosen, rejected, seed=pc.seed)
    return pairs, {"chosen": len(chosen), "rejected": len(rejected), "pairs": len(pairs)}


def _unfiltered(sampler, params, questions: list[dict], pc: PipelineConfig) -> tuple[list[dict], dict]:
    """One solver sample per raw question, unverified; questions too long to prompt are cut."""
    texts = [q["question"][:400] for q in questions]
    solutions = solve_questions(sampler, params, texts, k=1, temperature=pc.solve_temperature, seed=pc.seed + 9,
                                max_new_tokens=pc.attempt_tokens) if texts else []
    records = [{"question": q, "solution": s[0]} for q, s in zip(texts, solutions)]
    return records, {"examples": len(records)}


def _evaluate(name, params, tests, sampler, pc: PipelineConfig) -> tuple[list[dict], dict]:
    rows = [{"model": name, "test_set": t, "accuracy": accuracy(sampler, params, tests[t],
                                                                max_new_tokens=pc.solution_tokens)}
            for t in TEST_SETS]
    return rows, {r["test_set"]: r["accuracy"] for r in rows}


def _student(name, docs, pc: PipelineConfig, tokenizer, root: Path, mesh, tests, sampler) -> tuple[list[dict], dict]:
    params, summary = train_lm(root / "models" / f"student_{name}", pc.model, tokenizer, docs, pc.student_tc(), mesh)
    rows, scores = _evaluate(name, params, tests, sampler, pc)
    rows = [{"student": name, "test_set": r["test_set"], "accuracy": r["accuracy"], "documents": len(docs),
             **{k: summary[k] for k in ("steps", "last_loss", "wall_s", "cpu_s")}} for r in rows]
    return rows, {"documents": len(docs), **scores}
