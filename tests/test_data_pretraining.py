"""Pre-training examples: BERT's masking and NSP statistics, whole-word masking, truncation, determinism."""

import numpy as np
import pytest
from _data_helpers import corpus, tokenizer

from mobiledistill.data import (
    DataError,
    ExampleBuilder,
    InMemoryCorpus,
    PretrainingConfig,
    PretrainingIterator,
)
from mobiledistill.data.pretraining import _truncate_pair, split_sentences


def _stream(n_examples, config=None, seed=0, batch=100):
    it = PretrainingIterator(
        corpus(), tokenizer(), global_batch_size=batch, config=config, seed=seed, process_index=0, process_count=1
    )
    batches = [it.next_numpy() for _ in range(n_examples // batch)]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@pytest.fixture(scope="module")
def examples_10k():
    return _stream(10_000)


def test_shapes_and_dtypes(examples_10k):
    b = examples_10k
    assert b["input_ids"].shape == b["token_type_ids"].shape == b["attention_mask"].shape == (10_000, 128)
    assert b["masked_lm_positions"].shape == b["masked_lm_ids"].shape == b["masked_lm_weights"].shape == (10_000, 20)
    assert b["next_sentence_labels"].shape == (10_000,)
    for k, v in b.items():
        assert v.dtype == (np.float32 if k == "masked_lm_weights" else np.int32), k


def test_layout_cls_a_sep_b_sep_then_padding(examples_10k):
    tok = tokenizer()
    ids, types, mask = examples_10k["input_ids"], examples_10k["token_type_ids"], examples_10k["attention_mask"]
    lengths = mask.sum(1)
    assert np.all(np.diff(mask, axis=1) <= 0), "attention_mask must be 1s then 0s"
    assert np.all(ids[:, 0] == tok.cls_id)
    rows = np.arange(len(ids))
    assert np.all(ids[rows, lengths - 1] == tok.sep_id)
    assert np.all(ids[mask == 0] == tok.pad_id) and np.all(types[mask == 0] == 0)
    num_a = (types[:, :] == 0).sum(1) - (128 - lengths)  # [CLS] A [SEP]
    assert np.all(ids[rows, num_a - 1] == tok.sep_id)
    assert np.all((ids == tok.sep_id).sum(1) == 2) and np.all((ids == tok.cls_id).sum(1) == 1)
    assert np.all(num_a >= 3) and np.all(lengths - num_a >= 2), "A and B each hold at least one token"


def test_masking_rate_is_15_percent_of_maskable_tokens_within_the_cap(examples_10k):
    b = examples_10k
    maskable = b["attention_mask"].sum(1) - 3
    selected = b["masked_lm_weights"].sum(1)
    expected = np.minimum(20, np.maximum(1, np.round(maskable * 0.15)))
    np.testing.assert_array_equal(selected, expected)
    assert abs(selected.sum() / maskable.sum() - 0.15) < 0.005
    assert selected.max() <= 20


def test_80_10_10_and_specials_never_masked(examples_10k):
    tok = tokenizer()
    b = examples_10k
    ids, pos, w = b["input_ids"], b["masked_lm_positions"], b["masked_lm_weights"] > 0
    rows = np.broadcast_to(np.arange(len(ids))[:, None], pos.shape)
    now = ids[rows, pos][w]
    target = b["masked_lm_ids"][w]
    masked, kept = now == tok.mask_id, now == target
    randomised = ~masked & ~kept
    assert abs(masked.mean() - 0.8) < 0.01
    assert abs(kept.mean() - 0.1) < 0.01
    assert abs(randomised.mean() - 0.1) < 0.01
    structural = np.isin(ids, [tok.cls_id, tok.sep_id]) | (b["attention_mask"] == 0)
    assert not structural[rows[w], pos[w]].any(), "[CLS], [SEP] or padding selected for prediction"
    assert not np.isin(target, tok.special_ids[tok.special_ids != tok.unk_id]).any()
    assert not np.isin(now[randomised], tok.special_ids).any(), "random replacements exclude special tokens"
    # padding prediction slots are zeros with weight 0; real positions are distinct and increasing
    assert np.all(pos[~w] == 0) and np.all(b["masked_lm_ids"][~w] == 0)
    for r in range(200):
        p = pos[r][w[r]]
        assert np.all(np.diff(p) > 0)


def test_next_sentence_labels_are_balanced(examples_10k):
    nsp = examples_10k["next_sentence_labels"]
    assert set(np.unique(nsp)) == {0, 1}
    assert abs(nsp.mean() - 0.5) < 0.02


def test_short_sequences_appear_at_about_short_seq_prob(examples_10k):
    lengths = examples_10k["attention_mask"].sum(1)
    assert 0.02 < np.mean(lengths < 64) < 0.5
    assert np.mean(lengths == 128) > 0.4


def test_labels_are_the_original_tokens():
    tok = tokenizer()
    builder = ExampleBuilder(tok, PretrainingConfig(max_seq_length=128))
    rng = np.random.default_rng(0)
    a = np.arange(100, 160, dtype=np.int32)
    b = np.arange(200, 250, dtype=np.int32)
    inst = builder._masked(a, b, 1, rng)
    original = np.concatenate([[tok.cls_id], a, [tok.sep_id], b, [tok.sep_id]])
    np.testing.assert_array_equal(inst.labels, original[inst.positions])
    unchanged = np.setdiff1d(np.arange(len(original)), inst.positions)
    np.testing.assert_array_equal(inst.input_ids[unchanged], original[unchanged])
    assert inst.num_a == 62 and inst.next_sentence_label == 1 and len(inst.positions) == round(110 * 0.15)


def test_whole_word_masking_selects_whole_words():
    tok = tokenizer()
    b = _stream(2000, PretrainingConfig(whole_word_masking=True))
    cont = tok.is_continuation
    checked = 0
    for r in range(len(b["input_ids"])):
        w = b["masked_lm_weights"][r] > 0
        pos = set(b["masked_lm_positions"][r][w].tolist())
        labels = dict(zip(b["masked_lm_positions"][r][w].tolist(), b["masked_lm_ids"][r][w].tolist()))
        length = b["attention_mask"][r].sum()
        original = b["input_ids"][r].copy()
        for p, t in labels.items():
            original[p] = t
        for p in pos:
            if cont[original[p]] and original[p - 1] not in (tok.sep_id, tok.cls_id):
                assert p - 1 in pos, "a word piece was masked without its head"
            if p + 1 < length and cont[original[p + 1]]:
                assert p + 1 in pos, "a word head was masked without its continuation"
                checked += 1
    assert checked > 100, "the corpus should contain multi-piece words"
    assert b["masked_lm_weights"].sum(1).max() <= 20


def test_truncate_pair_trims_the_longer_segment_to_fit():
    rng = np.random.default_rng(1)
    a, b = np.arange(300), np.arange(1000, 1010)
    ta, tb = _truncate_pair(a, b, 125, rng)
    assert len(ta) + len(tb) == 125 and len(tb) == 10
    assert np.all(np.diff(ta) == 1) and 0 < ta[0] < 300 - 115, "cut from both ends, contiguous"
    ta, tb = _truncate_pair(np.arange(80), np.arange(90), 100, rng)
    assert (len(ta), len(tb)) == (50, 50)


def test_same_seed_same_stream_other_seed_other_stream():
    a, b, c = _stream(300, seed=5), _stream(300, seed=5), _stream(300, seed=6)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["input_ids"], c["input_ids"])


def test_seq_512_uses_80_predictions():
    b = _stream(64, PretrainingConfig(max_seq_length=512), batch=32)
    assert b["input_ids"].shape == (64, 512) and b["masked_lm_positions"].shape == (64, 80)
    maskable = b["attention_mask"].sum(1) - 3
    np.testing.assert_array_equal(b["masked_lm_weights"].sum(1), np.minimum(80, np.round(maskable * 0.15)))
    assert b["attention_mask"].sum(1).max() == 512


def test_sentence_splitting():
    text = 'First one. Second "quoted." Third?\nstill third! Fourth\n\nNew paragraph e.g. lower case.'
    sentences, cut = split_sentences(text)
    assert sentences == [
        "First one.",
        'Second "quoted."',
        "Third? still third!",
        "Fourth",
        "New paragraph e.g. lower case.",
    ]
    assert cut == 0
    long, cut = split_sentences("word " * 1000, max_sentence_chars=500)
    assert cut == 1 and all(len(s) <= 500 for s in long) and sum(len(s.split()) for s in long) == 1000


def test_over_long_documents_are_split_and_counted():
    paragraph = "A sentence about nothing in particular. " * 30
    docs = [("\n\n".join([paragraph] * 10)), "A short document. It has two sentences."]
    it = PretrainingIterator(
        InMemoryCorpus("long", docs),
        tokenizer(),
        global_batch_size=8,
        config=PretrainingConfig(max_document_chars=2000),
        process_index=0,
        process_count=1,
    )
    for _ in range(20):
        it.next_numpy()
    assert it.report.counts["long_documents_split"] >= 1
    assert "long_documents_split" in it.report.summary()


def test_a_corpus_that_tokenises_to_nothing_is_a_clear_error():
    it = PretrainingIterator(
        InMemoryCorpus("blank", ["\x00\x01", "\u200b"]),
        tokenizer(),
        global_batch_size=2,
        process_index=0,
        process_count=1,
    )
    with pytest.raises(DataError, match="no document .* gives an example"):
        it.next_numpy()


def test_config_is_validated():
    with pytest.raises(DataError, match="masked_lm_prob"):
        PretrainingConfig(masked_lm_prob=1.5).validate()
    with pytest.raises(DataError, match="max_predictions_per_seq"):
        PretrainingConfig(max_seq_length=16, max_predictions_per_seq=40).validate()
    assert PretrainingConfig().max_predictions == 20
    assert PretrainingConfig(max_seq_length=512).max_predictions == 80


def test_the_stream_does_not_depend_on_the_document_cache():
    def run(cache):
        it = PretrainingIterator(
            corpus(),
            tokenizer(),
            global_batch_size=50,
            seed=11,
            process_index=0,
            process_count=1,
            document_cache_size=cache,
        )
        if cache:  # every random-next segment then comes from cached tokens, not from freshly tokenised sentences
            it.warm_cache()
        return [it.next_numpy() for _ in range(6)]

    for uncached, cached in zip(run(0), run(10_000)):
        for k in cached:
            np.testing.assert_array_equal(uncached[k], cached[k])
