"""jaxsys.data.longctx: the long-context corpus of the speculative-decoding benchmark (numpy only)."""
import re

import numpy as np
import pytest

from jaxsys.data import ByteTokenizer
from jaxsys.data.longctx import (
    MAX_BYTES,
    MIN_BYTES,
    CopyDrillBatches,
    LongContextBatches,
    MixedBatches,
    heldout_documents,
    training_document,
)
from jaxsys.data import longctx


@pytest.fixture(scope="module")
def train_docs():
    return [training_document(i) for i in range(60)]


def test_documents_are_a_pure_function_of_seed_and_index():
    fresh = longctx._document.__wrapped__  # bypass the cache: generate twice for real
    a = fresh("train", 0, 7, MIN_BYTES, MAX_BYTES)
    assert a == fresh("train", 0, 7, MIN_BYTES, MAX_BYTES) == training_document(7)
    assert a.text != training_document(8).text
    assert a.text != training_document(7, seed=1).text


def test_heldout_documents_share_nothing_with_training_documents(train_docs):
    heldout = heldout_documents(20)
    assert heldout == heldout_documents(20)
    train_lines = {line for d in train_docs for line in d.text.splitlines() if line}
    train_entities = {f.entity for d in train_docs for f in d.facts}
    for doc in heldout:
        assert not train_lines & {line for line in doc.text.splitlines() if line}
        # random names: an entity of one document is (almost) never another's
        assert len({f.entity for f in doc.facts} & train_entities) <= 1


def test_lengths_and_text_stay_within_bounds(train_docs):
    lengths = [len(d.text) for d in train_docs]
    assert max(lengths) <= MAX_BYTES and min(lengths) >= MIN_BYTES - 200
    assert max(lengths) - min(lengths) > 2000  # lengths vary across the range
    for doc in train_docs:
        assert doc.text.isascii()  # byte offsets are character offsets
        assert doc.text.startswith("Register of ")


def test_facts_are_restated_verbatim_far_from_their_last_mention(train_docs):
    distances = []
    for doc in train_docs:
        assert len(doc.restatements) >= 5
        for r in doc.restatements:
            fact = doc.facts[r.fact]
            assert doc.text[r.value_start:r.value_end] == fact.value
            assert doc.text[:r.value_end].endswith(fact.core)
            earlier = r.value_start - r.distance  # the nearest earlier mention of the same fact
            assert doc.text[earlier:earlier + len(fact.value)] == fact.value
            assert doc.text[:earlier + len(fact.value)].lower().endswith(fact.core.lower())
            between = doc.text[earlier + len(fact.value):r.value_start]
            assert fact.core not in between
            distances.append(r.distance)
    distances = np.array(distances)
    assert distances.min() >= MIN_BYTES // 15  # never right after the previous mention
    assert np.mean(distances > 512) > 0.8
    assert np.mean(distances > 2000) > 0.2 and distances.max() > 4000


def test_fact_values_are_random_across_documents(train_docs):
    values = [f.value for d in train_docs for f in d.facts]
    assert len(set(values)) > 0.95 * len(values)
    numbers = [v for v in values if v.isdigit()]
    assert 0.6 < len(numbers) / len(values) < 0.95  # mostly numbers, some names


def test_restated_value_targets_point_at_the_value_tokens(train_docs):
    doc = train_docs[0]
    ids = doc.token_ids()
    assert ids[0] == ByteTokenizer.bos_id and ids[-1] == ByteTokenizer.eos_id
    targets = doc.restated_value_targets(min_distance=512)
    assert len(targets) > 0
    text = bytes(ids[targets].tolist()).decode()
    far = [doc.facts[r.fact].value for r in doc.restatements if r.distance >= 512]
    assert text == "".join(far)


def test_batches_are_deterministic_windows_from_document_starts():
    data = LongContextBatches(seq_len=800, batch_size=3, seed=0, min_bytes=500, max_bytes=700)
    batch = data.batch(2)
    assert batch.shape == (3, 801) and batch.dtype == np.int32
    assert np.array_equal(batch, LongContextBatches(800, 3, min_bytes=500, max_bytes=700).batch(2))
    assert not np.array_equal(batch, data.batch(3))
    assert 0 <= batch.min() and batch.max() < ByteTokenizer.vocab_size
    for j, row in enumerate(batch):
        first = training_document(2 * 3 + j, min_bytes=500, max_bytes=700).token_ids()
        assert row[0] == ByteTokenizer.bos_id
        assert np.array_equal(row[:len(first)], first)  # the sample's own document, from BOS
        assert row[len(first)] == ByteTokenizer.bos_id  # then another one, to fill the window
    with pytest.raises(ValueError, match="min_bytes"):
        LongContextBatches(64, 2, min_bytes=100)


def test_denser_paragraphs_mention_facts_more_often():
    sparse = [training_document(i, min_bytes=2000, max_bytes=2000) for i in range(20)]
    dense = [training_document(i, min_bytes=2000, max_bytes=2000, paragraph_sentences=(1, 2))
             for i in range(20)]
    assert sum(len(d.restatements) for d in dense) > 2 * sum(len(d.restatements) for d in sparse)
    with pytest.raises(ValueError, match="paragraph_sentences"):
        training_document(0, paragraph_sentences=(3, 2))


def test_copy_drill_repeats_one_random_string_per_window():
    drill = CopyDrillBatches(seq_len=200, batch_size=4, seed=0)
    batch = drill.batch(1)
    assert batch.shape == (4, 201) and batch.dtype == np.int32
    assert np.array_equal(batch, CopyDrillBatches(200, 4).batch(1))
    periods = set()
    for row in batch:
        assert row[0] == ByteTokenizer.bos_id
        text = row[1:]
        assert ((text >= ord("a")) & (text <= ord("z"))).all()
        period = next(p for p in range(8, 41) if np.array_equal(text[p:], text[:-p]))
        periods.add(period)
    assert len(periods) > 1  # no fixed offset to copy from


def test_mixed_batches_stack_their_sources_rows_in_order():
    drill, corpus = CopyDrillBatches(128, 2, seed=0), LongContextBatches(128, 3, seed=0)
    mixed = MixedBatches(drill, corpus)
    assert (mixed.seq_len, mixed.batch_size) == (128, 5)
    batch = mixed.batch(3)
    assert np.array_equal(batch[:2], drill.batch(3)) and np.array_equal(batch[2:], corpus.batch(3))
    with pytest.raises(ValueError, match="seq_len"):
        MixedBatches(drill, CopyDrillBatches(64, 2))
    with pytest.raises(ValueError, match="at least one"):
        MixedBatches()


def test_benchmark_pair_is_shaped_for_triforce():
    from experiments.spec_models import DRAFT, TARGET, distinct_token_ratio, kv_weight_ratio

    assert kv_weight_ratio(TARGET, 4096) >= 2  # the KV cache, not the weights, dominates
    assert 8 <= TARGET.num_params / DRAFT.num_params <= 12
    assert TARGET.max_seq_len >= 8192 and TARGET.vocab_size == DRAFT.vocab_size
    loop = [1, 2, 3, 4] * 50
    varied = ByteTokenizer().encode(training_document(0).text[:400], add_bos=False)
    assert distinct_token_ratio(loop) < 0.05 < 0.8 < distinct_token_ratio(varied)
    assert re.fullmatch(r"[ -~\n]+", training_document(1).text)
