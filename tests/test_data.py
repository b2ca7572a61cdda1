"""jaxsys.data: the corpus and its verifier, tokenizers, token datasets (numpy only, fast)."""
import json
import re

import numpy as np
import pytest

from jaxsys.data import (
    ByteTokenizer,
    HFTokenizer,
    TokenDataset,
    WordTokenizer,
    check_solution,
    corpus_dataset,
    count_steps,
    extract_answer,
    format_example,
    format_prompt,
    generate_problems,
    load_documents,
    load_tokenizer,
    solve,
    verify,
)
from jaxsys.data.corpus import FEMALE_NAMES, ITEMS, MALE_NAMES


@pytest.fixture(scope="module")
def problems():
    return generate_problems(400, seed=3)


# --- corpus ------------------------------------------------------------------------------

def test_generator_is_a_pure_function_of_its_seed():
    a, b = generate_problems(60, seed=11), generate_problems(60, seed=11)
    assert a == b
    assert generate_problems(20, seed=11) == a[:20]  # a longer run extends a shorter one
    assert generate_problems(60, seed=12) != a


def test_generator_varies_people_items_verbs_and_question_kinds(problems):
    questions = [p.question for p in problems]
    assert len(set(questions)) >= len(questions) - 2
    text = " ".join(questions)
    assert len({n for n in FEMALE_NAMES + MALE_NAMES if n in text}) >= 25
    assert len({i for i in ITEMS if f" {i}" in text}) >= 15
    for phrase in ("buys", "finds", "gets", "eats", "sells", "gives", "doubles", "triples",
                   " of ", "equally among", "half of", "more", "fewer", "as many",
                   "does each friend get?", "together", "How many more", " from "):
        assert phrase in text, phrase
    assert {p.steps for p in problems} == {1, 2, 3}


def test_every_generated_problem_verifies_and_its_solution_checks(problems):
    for p in problems + generate_problems(100, seed=4, min_steps=3, max_steps=6):
        assert verify(p.question) == p.answer, p.question
        assert count_steps(p.question) == p.steps
        assert p.solution.splitlines()[-1] == f"Answer: {p.answer}"
        assert check_solution(p.question, p.solution)
        # the operations the solution writes are the steps it claims
        assert len(re.findall(r"\d [-+*/] \d+ = \d", p.solution)) == p.steps
    assert all(3 <= p.steps <= 6 for p in generate_problems(50, seed=5, min_steps=3,
                                                            max_steps=6))


def test_training_text_format():
    p = generate_problems(1, seed=0)[0]
    text = format_example(p)
    assert text.startswith(format_prompt(p.question) + " ")
    assert text == f"Question: {p.question}\nSolution: {p.solution}"
    assert extract_answer(text) == p.answer


@pytest.mark.parametrize("question", [
    "This is not a word problem.",
    "",
    "Mia has 12 apples. She buys 5 more apples.",  # no question sentence
    "Mia has 12 apples. She buys 5 more apples. How many apples does Mia have now",
    "Mia has 12 widgets. She buys 5 more widgets. How many widgets does Mia have?",
    "Mia has 12 apples. How many pears does Mia have?",  # her pears were never given
    "Mia has 12 apples. Leo eats 3 apples. How many apples does Mia have?",  # unknown Leo
    "Mia has 12 apples. She gives 3 apples to Leo. How many apples does Leo have?",
    "Mia has 5 apples. She sells 7 apples. How many apples does Mia have?",  # negative
    "Mia has 5 apples. Leo has 7 fewer apples than Mia. How many apples does Leo have?",
    "Mia has 3 apples. Leo has 8 apples. How many more apples does Mia have than Leo?",
    "Mia has 10 apples. She shares her apples equally among 3 friends. "
    "How many apples does each friend get?",  # 10 / 3 is not exact
    "Mia has 7 apples. She eats half of her apples. How many apples does Mia have?",
    "Mia has 5 apples. He buys 2 more apples. How many apples does Mia have?",
    "Mia has 5 apples. Leo has 3 apples. She buys 2 more apples. "
    "How many apples does Mia have?",  # 'She' follows Leo's sentence
    "Mia has 5 apples. Mia has 6 apples. How many apples does Mia have?",
    "Mia has 5 pencils. She eats 2 pencils. How many pencils does Mia have?",
    "Mia has 5 apples. How many apples does Mia have? How many apples does Mia have?",
    "Mia has 8 apples. How many apples does each friend get?",  # nothing was shared
    "Mia has 2.5 apples. How many apples does Mia have?",
    "Mia has 5 apples. She doubles his apples. How many apples does Mia have?",
    "Mia has 5 apples. She gives 2 apples to Mia. How many apples does Mia have?",
])
def test_verifier_rejects(question):
    assert verify(question) is None
    assert count_steps(question) is None
    assert not check_solution(question, "Answer: 0")


def test_verifier_solves_a_new_combination_of_sentences():
    # Two items on one person, a stranger's name (Zed) outside the name tables, a fraction
    # given to a known person, a container purchase by the second person, and a comparison.
    question = ("Grace has 7 marbles and 30 stickers. Pablo has 4 fewer stickers than Grace. "
                "Grace gives a third of her stickers to Pablo. Pablo buys 2 jars of 9 stickers "
                "each. He gives 26 stickers to Zed. Grace collects 5 more marbles. "
                "How many more stickers does Pablo have than Grace?")
    # stickers: Grace 30, Pablo 26; a third of 30 = 10 -> Grace 20, Pablo 36; +18 -> 54;
    # -26 -> 28; 28 - 20 = 8.
    assert verify(question) == 8
    assert count_steps(question) == 9
    problem = solve(question)
    assert check_solution(question, problem.solution)
    assert not check_solution(question, problem.solution.replace("Answer: 8", "Answer: 9"))
    assert verify("Mia has 3 apples, 4 pears, and 5 plums. She eats 2 pears. "
                  "How many pears does she have?") == 2
    assert verify("Zed has 4 cards. He triples his cards. He gets 3 cards from Mia. "
                  "How many cards does he have left?") == 15
    assert verify("Ruth has 24 cookies. She splits her cookies into 4 equal groups and keeps "
                  "one group. Ruth shares 4 cookies equally among 2 friends, keeping none. "
                  "How many cookies does each friend get?") == 2


def test_answer_extraction_and_solution_checking():
    assert extract_answer("no answer here") is None
    assert extract_answer("x\nAnswer: 1,200") == 1200
    # a generation that runs on into a new example: the first answer counts
    assert extract_answer("a\nAnswer: 42\nQuestion: ...\nSolution: b\nAnswer: 7") == 42
    question = "Mia has 12 apples. She buys 5 more apples. How many apples does Mia have?"
    assert check_solution(question, "Mia buys 5 apples: 12 + 5 = 17 apples.\nAnswer: 17")
    assert check_solution(question, "Answer: 17")
    assert not check_solution(question, "Mia buys 5 apples: 12 + 5 = 18 apples.\nAnswer: 17")
    assert not check_solution(question, "Mia buys 5 apples: 12 + 5 = 17 apples.\nAnswer: 16")


# --- tokenizers --------------------------------------------------------------------------

def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "Héllo, 世界 🙂\nAnswer: 7"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id == 257 and ids[-1] == tok.eos_id == 258
    assert ids[1:-1] == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=False) == list(text.encode("utf-8"))
    assert tok.decode([72, 300, 105, 1000]) == "Hi"  # ids past the vocabulary: nothing
    assert tok.decode([0xE4, 72]) == "\ufffdH"  # invalid UTF-8 is replaced
    assert tok.decode([257, 72, 258], skip_special=False) == "<bos>H<eos>"
    assert (tok.vocab_size, tok.pad_id, tok.eos_ids) == (259, 256, (258,))


def test_word_tokenizer_keeps_words_whole_digits_apart_and_round_trips_any_text():
    docs = [format_example(p) for p in generate_problems(50, seed=0)]
    tok = WordTokenizer.fit(docs)
    assert tok.vocab_size == 259 + len(tok.words) and (tok.bos_id, tok.eos_id, tok.pad_id) == (257, 258, 256)
    ids = tok.encode("Question: Mia has 12 apples.", add_bos=False)
    pieces = [tok.decode([i]) for i in ids]
    assert pieces == ["Question", ":", " Mia", " has", " 1", "2", " apples", "."]
    assert all(i >= 259 for i in tok.encode(" has apples", add_bos=False))
    mean_bytes = np.mean([len(d.encode()) for d in docs])
    assert np.mean([len(tok.encode(d)) for d in docs]) < mean_bytes / 3  # what makes it worth having
    for text in docs[:5] + ["Zorblax has 7 qux.", "Héllo, 世界 🙂\n  two  spaces\tTab", ""]:
        assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == text
    unknown = tok.encode("Zorblax", add_bos=False)  # not in the vocabulary: its bytes
    assert unknown == list(b"Zorblax")
    assert tok.decode([257, *ids, 258], skip_special=False) == "<bos>Question: Mia has 12 apples.<eos>"
    assert tok.decode([tok.vocab_size + 5]) == ""
    assert WordTokenizer(tok.words).encode(docs[0]) == tok.encode(docs[0])  # the words are all it keeps
    with pytest.raises(ValueError, match="longer than one byte"):
        WordTokenizer([" has", "a"])


def _build_hf_folder(folder, *, with_configs=True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<eot>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([format_example(p) for p in generate_problems(30, seed=0)], trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", bos)])
    folder.mkdir(exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if with_configs:
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False},
             "eos_token": "</s>", "pad_token": "<pad>"}))
        (folder / "config.json").write_text(json.dumps(
            {"eos_token_id": [tok.token_to_id("</s>"), tok.token_to_id("<eot>")]}))
    return tok


def test_hf_tokenizer_round_trip_and_special_ids_from_config_files(tmp_path):
    raw = _build_hf_folder(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    assert isinstance(tok, HFTokenizer)
    assert tok.bos_id == raw.token_to_id("<s>")
    assert tok.eos_ids == (raw.token_to_id("</s>"), raw.token_to_id("<eot>"))
    assert tok.eos_id == raw.token_to_id("</s>")
    assert tok.pad_id == raw.token_to_id("<pad>")
    text = "Question: Mia has 12 apples. Ünïcode too?"
    ids = tok.encode(text, add_eos=True)
    # the post-processor adds <s> too, but BOS appears exactly once
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1 and ids[-1] == tok.eos_id
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.vocab_size + 5]) == text
    assert tok.encode(text, add_bos=False) == ids[1:-1]
    assert tok.encode_batch([text, "b"], add_eos=True) == [ids, tok.encode("b", add_eos=True)]


def test_hf_tokenizer_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    _build_hf_folder(tmp_path / "tok")
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    tok = load_tokenizer(tmp_path / "tok")
    for text in ["Question: Ava has 3 pears.\nSolution: Answer: 3", "héllo  wörld 🙂"]:
        assert tok.encode(text) == reference(text)["input_ids"]
        assert tok.decode(tok.encode(text)) == reference.decode(tok.encode(text),
                                                                skip_special_tokens=True)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (
        reference.bos_token_id, reference.eos_token_id, reference.pad_token_id)


def test_hf_tokenizer_without_configs_finds_bos_from_its_post_processor(tmp_path):
    raw = _build_hf_folder(tmp_path / "bare", with_configs=False)
    tok = HFTokenizer(tmp_path / "bare")
    assert tok.bos_id == raw.token_to_id("<s>") and tok.post_processor_adds_bos
    assert tok.eos_id is None and tok.eos_ids == () and tok.pad_id == 0
    assert tok.encode("hi", add_eos=True)[0] == tok.bos_id


def test_load_tokenizer_kinds_and_errors(tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    assert load_tokenizer(tmp_path) is None  # a model folder without a tokenizer
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad/tokenizer\.json"):
        load_tokenizer(bad)
    _build_hf_folder(tmp_path / "cfg")
    (tmp_path / "cfg" / "config.json").write_text("[1,")
    with pytest.raises(ValueError, match=r"cfg/config\.json"):
        load_tokenizer(tmp_path / "cfg")
    with pytest.raises(ValueError, match="byte"):
        load_tokenizer(tmp_path / "missing")


# --- datasets ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus_ds():
    return corpus_dataset(ByteTokenizer(), seq_len=64, batch_size=4, seed=1, num_problems=300)


def test_batches_are_a_pure_function_of_seed_and_step(corpus_ds):
    again = corpus_dataset(ByteTokenizer(), seq_len=64, batch_size=4, seed=1, num_problems=300)
    assert corpus_ds.batch(0).shape == (4, 65) and corpus_ds.batch(0).dtype == np.int32
    for step in (0, 5, 1000):
        np.testing.assert_array_equal(corpus_ds.batch(step), again.batch(step))
    assert not np.array_equal(corpus_ds.batch(0), corpus_ds.batch(1))
    other_seed = TokenDataset(corpus_ds.tokens, seq_len=64, batch_size=4, seed=2)
    assert not np.array_equal(corpus_ds.batch(0), other_seed.batch(0))


def test_resumed_run_sees_the_batches_of_a_straight_run(corpus_ds):
    straight = [corpus_ds.batch(s) for s in range(30)]
    resumed = TokenDataset(corpus_ds.tokens.copy(), seq_len=64, batch_size=4, seed=1)
    for step in range(17, 30):
        np.testing.assert_array_equal(resumed.batch(step), straight[step])


def test_each_epoch_reads_every_window_once_and_windows_lie_in_the_stream():
    seq_len, windows = 8, 12
    ds = TokenDataset(np.arange(seq_len * windows + 3), seq_len=seq_len, batch_size=5, seed=0)
    assert ds.num_windows == windows and ds.tokens_per_batch == 40
    rows = np.concatenate([ds.batch(s) for s in range(12)])  # 60 samples = 5 epochs
    # every row is a contiguous slice starting on a window boundary
    np.testing.assert_array_equal(rows - rows[:, :1], np.broadcast_to(np.arange(9), rows.shape))
    starts = rows[:, 0]
    assert np.all(starts % seq_len == 0) and np.all(rows[:, -1] < len(ds.tokens))
    epochs = starts.reshape(5, windows)
    for epoch in epochs:
        assert sorted(epoch) == list(range(0, seq_len * windows, seq_len))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
    big = TokenDataset(np.arange(20), seq_len=4, batch_size=11, seed=0)  # batch > epoch
    assert big.batch(3).shape == (11, 5)


def test_documents_are_bos_text_eos_concatenated():
    tok = ByteTokenizer()
    ds = TokenDataset.from_documents(["ab", "c"], tok, seq_len=2, batch_size=1)
    np.testing.assert_array_equal(ds.tokens, [257, 97, 98, 258, 257, 99, 258])
    with pytest.raises(ValueError, match=r"data has 7 tokens, need at least seq_len\+1=9; "
                                         r"add data or lower --seq-len"):
        TokenDataset.from_documents(["ab", "c"], tok, seq_len=8, batch_size=1)


def test_load_documents_sources(tmp_path):
    corpus = load_documents(None, seed=2, num_problems=5)
    assert corpus == load_documents("corpus", seed=2, num_problems=5)
    assert corpus == [format_example(p) for p in generate_problems(5, seed=2)]
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\nline two\n\n\n  \nsecond doc\n")
    assert load_documents(str(txt)) == ["first doc\nline two", "second doc"]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "hello"}\n\n{"question": "Q?", "solution": "Answer: 3"}\n'
                     '{"other": 1}\n')
    assert load_documents(jsonl) == ["hello", "Question: Q?\nSolution: Answer: 3"]


@pytest.mark.parametrize("name, content, error, message", [
    ("missing.txt", None, FileNotFoundError, "not found; use --data corpus"),
    ("empty.txt", "\n \n", ValueError, "is empty"),
    ("empty.jsonl", "", ValueError, "is empty"),
    ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', ValueError, "line 2 is not valid JSON"),
    ("list.jsonl", '[1, 2]\n', ValueError, "line 1 should be a JSON object"),
    ("fields.jsonl", '{"title": "x"}\n', ValueError, "no usable documents"),
    ("data.csv", "a,b\n", ValueError, "unknown extension '.csv'"),
    ("latin.txt", "caf\xe9\n".encode("latin-1"), ValueError, "is not UTF-8 text"),
])
def test_load_documents_errors_say_what_was_wrong(tmp_path, name, content, error, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(error, match=re.escape(message)):
        load_documents(str(path))
