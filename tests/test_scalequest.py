"""The pieces of experiments/scalequest: DPO, filters, the verifier's choice, resumable stages."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.scalequest import filters, qpo
from experiments.scalequest.models import DocumentWindows
from experiments.scalequest.stages import Stages, read_jsonl
from jaxsys.config import get_preset
from jaxsys.data.corpus import generate_problems
from jaxsys.data.tokenizer import ByteTokenizer, WordTokenizer
from jaxsys.model import ModelDef
from jaxsys.preference import dpo_loss, sequence_logprobs

TINY = get_preset("tiny")
BYTES = ByteTokenizer()


def test_sequence_logprobs_equal_a_float64_sum_over_the_masked_targets():
    model = ModelDef(TINY)
    params = model.init(3)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 259, size=(3, 9)).astype(np.int32)
    mask = (rng.random((3, 8)) < 0.6).astype(np.float32)
    got = np.asarray(sequence_logprobs(model, params, jnp.asarray(tokens), jnp.asarray(mask)))
    logits = np.asarray(model.apply(params, jnp.asarray(tokens[:, :-1]))[0]).astype(np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0] - log_z
    np.testing.assert_allclose(got, (picked * mask).sum(-1), rtol=1e-5, atol=1e-4)


def test_dpo_loss_and_gradient_match_the_float64_formula():
    rng = np.random.default_rng(1)
    pc, pr, rc, rr = (rng.normal(-20, 5, size=6) for _ in range(4))
    beta = 0.3
    margin = beta * ((pc - rc) - (pr - rr))
    expected = np.mean(np.log1p(np.exp(-margin)))  # -log sigmoid(m)
    loss, metrics = dpo_loss(*(jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr)), beta=beta)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["pair_accuracy"]), np.mean(margin > 0))
    grad_chosen, grad_rejected = jax.grad(
        lambda c, r: dpo_loss(c, r, jnp.asarray(rc, jnp.float32), jnp.asarray(rr, jnp.float32), beta=beta)[0],
        argnums=(0, 1))(jnp.asarray(pc, jnp.float32), jnp.asarray(pr, jnp.float32))
    weight = beta / (1 + np.exp(margin)) / len(pc)  # beta * sigmoid(-m) / n
    np.testing.assert_allclose(np.asarray(grad_chosen), -weight, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(grad_rejected), weight, rtol=1e-4)
    assert (np.asarray(grad_chosen) < 0).all() and (np.asarray(grad_rejected) > 0).all()  # descent raises chosen
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*(jnp.zeros(2),) * 4, beta=0.0)


def test_dpo_training_moves_the_policy_toward_chosen_questions():
    problems = generate_problems(4, seed=5)
    pairs = [{"chosen": problems[i].question, "rejected": "How many Zed do?"} for i in range(2)]
    config = qpo.QPOConfig(steps=3, pairs_per_step=2, learning_rate=1e-2, beta=0.5, nll_weight=0.5, seq_len=192)
    model = ModelDef(TINY)
    reference = jax.device_get(model.init(0))
    policy, rows = qpo.train_dpo(TINY, BYTES, reference, pairs, config)
    assert len(rows) == 3 and rows[-1]["loss"] < rows[0]["loss"]
    chosen, chosen_mask = qpo.encode_questions([p["chosen"] for p in pairs], BYTES, config.seq_len)
    rejected, rejected_mask = qpo.encode_questions([p["rejected"] for p in pairs], BYTES, config.seq_len)
    lp = lambda params, t, m: np.asarray(sequence_logprobs(model, params, jnp.asarray(t), jnp.asarray(m)))  # noqa: E731
    margin = (lp(policy, chosen, chosen_mask) - lp(reference, chosen, chosen_mask)) - (
        lp(policy, rejected, rejected_mask) - lp(reference, rejected, rejected_mask))
    assert (margin > 0).all()
    # Step 1 is scored at the reference: DPO loss log 2, plus nll_weight x the chosen per-token NLL.
    nll = -np.mean(lp(reference, chosen, chosen_mask) / chosen_mask.sum(-1))
    assert rows[0]["dpo_loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert rows[0]["chosen_nll"] == pytest.approx(nll, rel=1e-5)
    assert rows[0]["loss"] == pytest.approx(np.log(2) + config.nll_weight * nll, rel=1e-5)


def test_encode_questions_scores_the_question_and_eos_only():
    tokens, mask = qpo.encode_questions(["Mia has 2 apples. How many apples does Mia have?"], BYTES, 80)
    prefix = len("Question:") + 1  # BOS + prefix
    scored = tokens[0, 1:][mask[0] == 1]
    assert bytes(scored[:-1].tolist()).decode() == " Mia has 2 apples. How many apples does Mia have?"
    assert scored[-1] == 258 and mask[0, :prefix - 1].sum() == 0


def test_static_filters_drop_malformed_unsolvable_duplicate_and_contaminated_questions():
    seed, test, new, other = (p.question for p in generate_problems(4, seed=11, min_steps=2, max_steps=3))
    near_copy = _change_first_number(new)
    contaminated = _change_first_number(test)
    questions = [new, "mia has 3 apples. how many?", "Mia has 2 apples. How many apples does Leo have?",
                 new, near_copy, seed, contaminated, other, "Mia has 2 apples!"]
    records, counts = filters.static_filters(questions, seeds=[seed], tests=[test], config=filters.FilterConfig())
    assert [r["dropped_by"] for r in records] == [
        None, "format", "solvable", "dedup_exact", "dedup_ngram", "dedup_exact", "decontaminated", None, "format"]
    assert counts == {"sampled": 9, "after_format": 7, "after_solvable": 6, "after_dedup_exact": 4,
                      "after_dedup_ngram": 3, "after_decontaminated": 2}
    assert records[0]["answer"] == generate_problems(4, seed=11, min_steps=2, max_steps=3)[2].answer


def test_ngram_index_tells_near_copies_from_other_problems():
    index = filters.NgramIndex(3, 0.7)
    problems = generate_problems(30, seed=2, min_steps=2, max_steps=3)
    index.add(problems[0].question)
    assert index.match(problems[0].question.lower()) == "exact"
    assert index.match(_change_first_number(problems[0].question)) == "ngram"
    assert all(index.match(p.question) is None for p in problems[1:])


def test_the_verifier_selects_the_shortest_right_sample_and_never_writes_one():
    problem = generate_problems(1, seed=3, min_steps=2, max_steps=2)[0]
    right = problem.solution
    longer = right.replace("\nAnswer:", "\nSo that is the count.\nAnswer:")
    wrong_answer = right.rsplit("Answer:", 1)[0] + f"Answer: {problem.answer + 1}"
    bad_equation = "1 + 1 = 3\n" + right
    attempts = [wrong_answer, longer, bad_equation, right]
    assert filters.select_best(problem.question, attempts) == right
    assert filters.select_best(problem.question, [wrong_answer, bad_equation]) is None
    record = filters.attempt_record(problem.question, attempts)
    assert record["correct"] == 2 and record["failure_rate"] == 0.5 and record["best"] == right
    assert filters.difficulty_keep(record, problem.steps, filters.FilterConfig()) is None
    assert filters.difficulty_keep({**record, "correct": 0, "failure_rate": 1.0}, 3,
                                   filters.FilterConfig()) == "unanswered"
    assert filters.difficulty_keep({**record, "correct": 2, "failure_rate": 0.0}, 1,
                                   filters.FilterConfig()) == "trivial"


def test_qpo_labels_and_pairs():
    kept = {"question": "q", "dropped_by": None, "steps": 3}
    assert qpo.label({"dropped_by": "solvable"}, None, min_steps=2) == "rejected"
    assert qpo.label({**kept, "steps": 1}, {"failure_rate": 0.5}, min_steps=2) == "rejected"
    assert qpo.label(kept, {"failure_rate": 0.0}, min_steps=2) == "rejected"
    assert qpo.label(kept, {"failure_rate": 0.25}, min_steps=2) == "chosen"
    assert qpo.label(kept, {"failure_rate": 1.0}, min_steps=2) is None  # never answered
    assert qpo.label({**kept, "dropped_by": "dedup_ngram"}, None, min_steps=2) is None
    pairs = qpo.make_pairs(["a", "b", "c"], ["x", "y"], seed=0)
    assert [p["chosen"] for p in pairs] == ["a", "b", "c"] and {p["rejected"] for p in pairs} == {"x", "y"}
    assert qpo.make_pairs(["a"], [], seed=0) == []


def test_every_training_window_starts_with_a_whole_document():
    docs = [p.question for p in generate_problems(5, seed=4)]
    words = WordTokenizer.fit(docs)
    data = DocumentWindows(docs, words, seq_len=80, batch_size=3, seed=1)
    encoded = [words.encode(d, add_bos=True, add_eos=True) for d in docs]
    seen = []
    for step in range(4):  # 12 windows: two epochs of 5 documents, and two more
        batch = data.batch(step)
        assert batch.shape == (3, 81) and batch.dtype == np.int32
        for window in batch:
            (doc,) = [i for i, ids in enumerate(encoded) if window[:len(ids)].tolist() == ids]
            seen.append(doc)
    assert sorted(seen[:5]) == sorted(seen[5:10]) == list(range(5))  # each document once per epoch
    np.testing.assert_array_equal(data.batch(2), DocumentWindows(docs, words, seq_len=80, batch_size=3, seed=1).batch(2))


def test_the_tokenizer_stage_reads_back_the_tokenizer_it_fit():
    from experiments.scalequest import pipeline

    docs = [p.question for p in generate_problems(20, seed=6)]
    records, counts = pipeline._fit_tokenizer("word", docs)
    again = pipeline._tokenizer(json.loads(json.dumps(records)))  # as the stage file holds them
    assert again.encode(docs[0]) == WordTokenizer.fit(docs).encode(docs[0])
    assert counts["vocab_size"] == again.vocab_size > 259 and counts["seed_tokens_max"] < max(map(len, docs))
    assert isinstance(pipeline._tokenizer(pipeline._fit_tokenizer("byte", docs)[0]), ByteTokenizer)
    with pytest.raises(ValueError, match="'word' or 'byte'"):
        pipeline._fit_tokenizer("bpe", docs)


def test_a_training_cut_off_by_sigterm_is_not_recorded_as_a_finished_stage(tmp_path, monkeypatch):
    from experiments.scalequest import models
    from jaxsys.train import TrainConfig, TrainResult

    def stopped(*args, **kwargs):
        return TrainResult(state={"params": {}}, losses=[1.0], start_step=0, end_step=3, stopped_by_signal=True,
                           tokens_per_s=1.0, ckpt_dir=tmp_path)
    monkeypatch.setattr(models, "train", stopped)
    calls = []

    def stage():
        calls.append(1)
        models.train_lm(tmp_path / "m", TINY, BYTES, ["Question: a"], TrainConfig(steps=10, seq_len=16), None)
        return [{"done": True}], {}
    with pytest.raises(SystemExit, match="step 3 of 10"):
        Stages(tmp_path).run("solver", stage)
    assert not Stages(tmp_path).done("solver") and calls == [1]


def test_finished_stages_are_read_back_and_cut_off_ones_rerun(tmp_path):
    calls = []

    def stage():
        calls.append(1)
        return [{"question": "Q", "n": len(calls)}], {"kept": 1}

    first = Stages(tmp_path).run("filter", stage)
    again = Stages(tmp_path)
    assert again.run("filter", stage) == first and len(calls) == 1
    assert again.skipped == ["filter"] and again.counts["filter"] == {"kept": 1, "seconds": 0}
    (tmp_path / "cut.jsonl").write_text(json.dumps({"partial": True}) + "\n")  # no counts: cut off
    assert again.run("cut", stage) == [{"question": "Q", "n": 2}] and len(calls) == 2


def test_a_run_cut_off_and_resumed_sums_its_sittings_and_read_back_reruns_add_none(tmp_path):
    st = Stages(tmp_path)
    st.log_sitting(wall_s=50, cpu_s=90, finished=True)  # an earlier run
    st.run("solver", lambda: ([], {}))  # this run: two sittings
    st.log_sitting(wall_s=100, cpu_s=180, finished=False)
    st.log_sitting(wall_s=200, cpu_s=390, finished=True)
    assert [s["wall_s"] for s in st.run_sittings()] == [100, 200]
    again = Stages(tmp_path)
    again.run("solver", lambda: ([], {}))  # read back: runs no stage
    again.log_sitting(wall_s=3, cpu_s=3, finished=True)
    assert again.skipped == ["solver"] and [s["wall_s"] for s in again.run_sittings()] == [100, 200]
    assert [s["stages_run"] for s in read_jsonl(tmp_path / "sittings.jsonl")] == [0, 1, 1, 0]


def _change_first_number(question: str) -> str:
    import re
    return re.sub(r"\d+", lambda m: str(int(m.group()) + 1), question, count=1)
