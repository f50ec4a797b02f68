"""Shared, once-per-session fixtures of the data tests: the embedded corpus and a small vocab trained on it."""

import atexit
import functools
import shutil
import tempfile

from mobiledistill.data import embedded_corpus, trained_tokenizer

VOCAB_SIZE = 4000


@functools.lru_cache(maxsize=1)
def corpus():
    return embedded_corpus()


@functools.lru_cache(maxsize=1)
def vocab_dir() -> str:
    path = tempfile.mkdtemp(prefix="mobiledistill-vocab-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.lru_cache(maxsize=1)
def tokenizer():
    c = corpus()
    return trained_tokenizer(c.texts(), vocab_dir(), corpus_name=c.name, vocab_size=VOCAB_SIZE)
