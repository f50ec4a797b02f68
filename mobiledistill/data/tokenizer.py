"""WordPiece tokenisers: from a vocab.txt, a tokenizer.json, a Hub name, or trained on the corpus and cached.

Everything runs on Hugging Face `tokenizers` (Rust, fast, with character offsets). A `WordPiece` object carries the
backend tokenizer, the special-token ids the pipeline needs, and a transformers wrapper for pair/window encoding.
Training is offline and cheap (seconds on the embedded corpus) but not bit-reproducible across runs: the trainer
breaks ties between equally frequent merges in hash order. The cached vocab is therefore what makes a run
reproducible, it is re-used whenever present, and on several hosts process 0's vocab is broadcast to all.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Mapping

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from mobiledistill.data.errors import DataError, log

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
VOCAB_FILE = "vocab.txt"
META_FILE = "tokenizer_meta.json"


def validate_vocab(vocab: Mapping[str, int], source: str) -> None:
    """Raises DataError unless `vocab` is non-empty and holds every BERT special token."""
    if not vocab:
        raise DataError(f"{source}: the vocabulary is empty; a WordPiece vocab lists one token per line")
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise DataError(
            f"{source}: vocabulary lacks special token(s) {', '.join(missing)}; "
            f"a BERT WordPiece vocab needs all of {', '.join(SPECIAL_TOKENS)}"
        )


def _infer_lowercase(vocab: Mapping[str, int]) -> bool:
    """Uncased vocabs (bert-base-uncased, ours) hold (almost) no A-Z outside [BRACKETED] specials; cased ones many.

    'Almost': bert-base-uncased keeps a few symbols such as 'ℝ', so the test is on ASCII capitals and a 1% share.
    """
    words = [t for t in vocab if not (t.startswith("[") and t.endswith("]"))]
    capitalised = sum(1 for t in words if any("A" <= c <= "Z" for c in t))
    return capitalised <= 0.01 * max(len(words), 1)


def _bert_wordpiece(vocab: Mapping[str, int], lowercase: bool) -> Tokenizer:
    """The BERT pipeline around a WordPiece vocab: BertNormalizer, BertPreTokenizer, [CLS] A [SEP] B [SEP]."""
    tok = Tokenizer(models.WordPiece(dict(vocab), unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


class WordPiece:
    """A WordPiece tokenizer plus the ids the data pipeline needs.

    backend: the `tokenizers.Tokenizer`; source: where it came from (for messages).
    """

    def __init__(self, backend: Tokenizer, source: str):
        vocab = backend.get_vocab(with_added_tokens=True)
        validate_vocab(vocab, source)
        self.backend = backend
        self.source = source
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (vocab[t] for t in SPECIAL_TOKENS)
        self.special_ids = np.array(sorted({vocab[t] for t in SPECIAL_TOKENS}), dtype=np.int32)
        self._vocab = vocab

    @functools.cached_property
    def is_continuation(self) -> np.ndarray:
        """bool[vocab_size]: the token continues a word ('##' prefix), for whole-word masking."""
        mask = np.zeros(self.vocab_size, dtype=bool)
        for token, idx in self._vocab.items():
            if token.startswith("##") and idx < self.vocab_size:
                mask[idx] = True
        return mask

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the id-ordered vocabulary: equal fingerprints mean interchangeable token ids."""
        ordered = sorted(self._vocab.items(), key=lambda kv: kv[1])
        return hashlib.sha256("\n".join(t for t, _ in ordered).encode("utf-8")).hexdigest()[:16]

    @functools.cached_property
    def plain(self) -> Tokenizer:
        """A copy of the backend without truncation or padding that reads "[MASK]", "[SEP]"... in text as text."""
        tok = Tokenizer.from_str(self.backend.to_str())
        tok.no_truncation()
        tok.no_padding()
        tok.encode_special_tokens = True
        return tok

    def encode_texts(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids (int32, no [CLS]/[SEP]) of each text; special-token strings in the text stay plain text."""
        if not texts:
            return []
        encodings = self.plain.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    @functools.cached_property
    def hf(self):
        """The transformers fast tokenizer around the same backend (pair encoding, windows, offset mappings)."""
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(self.backend.to_str()),  # its truncation settings stay its own
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )

    def vocab_text(self) -> str:
        ordered = sorted(self._vocab.items(), key=lambda kv: kv[1])
        return "".join(t + "\n" for t, _ in ordered)

    def __repr__(self) -> str:
        return f"WordPiece(source={self.source!r}, vocab_size={self.vocab_size}, fingerprint={self.fingerprint})"


def _read_vocab_file(path: str) -> dict[str, int]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read vocab file ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: vocab file is not UTF-8 (byte {e.start}); expected one token per line") from None
    vocab: dict[str, int] = {}
    for line in text.splitlines():
        token = line.rstrip("\r\n")
        if token and token not in vocab:
            vocab[token] = len(vocab)
    return vocab


def load_vocab_file(path: str, lowercase: bool | None = None) -> WordPiece:
    """A BERT WordPiece tokenizer from a vocab.txt; `lowercase=None` infers it from the vocab (cased or not)."""
    vocab = _read_vocab_file(path)
    validate_vocab(vocab, path)
    if lowercase is None:
        lowercase = _infer_lowercase(vocab)
    return WordPiece(_bert_wordpiece(vocab, lowercase), source=path)


def load_tokenizer(name_or_path: str, lowercase: bool | None = None) -> WordPiece:
    """From a vocab.txt, a tokenizer.json, a directory holding either, or a Hugging Face Hub name (needs internet)."""
    if os.path.isfile(name_or_path):
        if name_or_path.endswith(".json"):
            try:
                backend = Tokenizer.from_file(name_or_path)
            except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on malformed files
                raise DataError(f"{name_or_path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
            return WordPiece(backend, source=name_or_path)
        return load_vocab_file(name_or_path, lowercase)
    if os.path.isdir(name_or_path):
        for fname in ("tokenizer.json", VOCAB_FILE):
            candidate = os.path.join(name_or_path, fname)
            if os.path.isfile(candidate):
                return load_tokenizer(candidate, lowercase)
        raise DataError(f"{name_or_path}: directory has neither tokenizer.json nor {VOCAB_FILE}")
    return _load_from_hub(name_or_path)


def _load_from_hub(name: str) -> WordPiece:
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - network, missing repo, gated model: all end here
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(
            f"tokenizer {name!r} is not a local vocab.txt/tokenizer.json/directory and could not be loaded from the "
            f"Hugging Face Hub ({first})"
        ) from None
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"tokenizer {name!r} has no fast (tokenizers) backend; give its vocab.txt instead")
    return WordPiece(Tokenizer.from_str(backend.to_str()), source=name)


def train_wordpiece(
    texts: Iterable[str],
    *,
    vocab_size: int = 30522,
    lowercase: bool = True,
    min_frequency: int = 2,
    limit_alphabet: int = 1000,
) -> WordPiece:
    """Trains a BERT-style WordPiece vocab ([PAD]=0, [UNK], [CLS], [SEP], [MASK] first) on `texts`."""
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        limit_alphabet=limit_alphabet,
        continuing_subword_prefix="##",
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    trained = backend.get_vocab()
    validate_vocab(trained, "trained vocabulary")
    # The trainer numbers tokens in hash-map order, which changes from process to process; WordPiece encoding is
    # longest-match and does not depend on ids, so a canonical order makes the same corpus give the same ids.
    rest = sorted(set(trained) - set(SPECIAL_TOKENS), key=lambda t: (t.startswith("##"), len(t), t))
    vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + rest)}
    return WordPiece(_bert_wordpiece(vocab, lowercase), source="trained")


def _atomic_write(path: str, text: str) -> None:
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _process_info() -> tuple[int, int]:
    import jax

    return jax.process_index(), jax.process_count()


def _broadcast_text(text: str | None) -> str:
    """Process 0's `text` on every process (multi-host vocab agreement)."""
    import jax
    from jax.experimental import multihost_utils

    data = np.frombuffer(text.encode("utf-8"), np.uint8) if jax.process_index() == 0 else np.zeros(0, np.uint8)
    n = int(multihost_utils.broadcast_one_to_all(np.int64(data.size)))
    buf = np.zeros(n, np.uint8)
    if jax.process_index() == 0:
        buf[:] = data
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))).decode("utf-8")


def _with_checksum(settings: dict, vocab_text: str) -> dict:
    return {**settings, "sha256": hashlib.sha256(vocab_text.encode("utf-8")).hexdigest()}


def _cached_vocab(vocab_path: str, meta_path: str, settings: dict, lowercase: bool):
    """(tokenizer, '', None) from a complete cache, else (None, what is wrong, the sha256 a retrained vocab must
    have to be the one the cache held, or None when anything goes).

    The metadata (with the vocab's checksum) is written after the vocab: without it the cache was never finished
    and nothing used it. A cache trained with other settings raises DataError: it belongs to another experiment.
    """
    meta_name, vocab_name = os.path.basename(meta_path), os.path.basename(vocab_path)
    with open(vocab_path, "rb") as f:
        vocab_sha = hashlib.sha256(f.read()).hexdigest()
    if not os.path.isfile(meta_path):
        return None, f"{meta_name} is missing: the cache was not finished", None
    try:
        with open(meta_path, encoding="utf-8") as f:
            cached = json.load(f)
        if not isinstance(cached, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"{meta_name} is not valid JSON ({type(e).__name__})", vocab_sha
    checksum = cached.pop("sha256", None)
    if cached != settings:
        raise DataError(
            f"{vocab_path} was trained with {cached}, not {settings}; use another cache directory or delete it to "
            "retrain"
        )
    if checksum is not None and vocab_sha != checksum:
        return None, f"{vocab_name} does not match the checksum in {meta_name}", checksum
    try:
        return load_vocab_file(vocab_path, lowercase=lowercase), "", None
    except DataError as e:
        return None, str(e), checksum


def _retrain_cache(texts, cache_dir, vocab_path, meta_path, settings, why, must_be, **train_kw) -> WordPiece:
    """Trains an unusable cache again; accepted only when it can be the vocab the cache held (checksum `must_be`).

    WordPiece training breaks frequency ties in hash order, so a retrained vocab is not always the same: one that
    differs from the recorded checksum is refused (the models in the workdir were trained with the old one).
    """
    if texts is None:
        raise DataError(f"tokenizer cache {cache_dir} cannot be used ({why}) and no corpus was given to train it again")
    tok = train_wordpiece(texts, **train_kw)
    text = tok.vocab_text()
    if must_be is not None and hashlib.sha256(text.encode("utf-8")).hexdigest() != must_be:
        raise DataError(f"tokenizer cache {cache_dir} cannot be used ({why}) and training it again gave another vocab "
                        f"(sha256 {must_be[:12]}... expected); restore {VOCAB_FILE} and {META_FILE} from a copy, or "
                        f"start a new workdir")
    for p in (vocab_path, meta_path):
        if os.path.isfile(p):
            os.replace(p, p + ".unreadable")
    _atomic_write(vocab_path, text)
    _atomic_write(meta_path, json.dumps(_with_checksum(settings, text), indent=1) + "\n")
    print(f"warning: tokenizer cache {cache_dir} cannot be used ({why}): trained it again"
          f"{' (same checksum)' if must_be else ''}; the old files are kept as *.unreadable", file=sys.stderr,
          flush=True)
    return load_vocab_file(vocab_path, lowercase=train_kw["lowercase"])


def trained_tokenizer(
    texts: Iterable[str] | None,
    cache_dir: str,
    *,
    corpus_name: str = "corpus",
    vocab_size: int = 30522,
    lowercase: bool = True,
    min_frequency: int = 2,
) -> WordPiece:
    """The vocab cached in `cache_dir`, or one trained on `texts` and cached there.

    A cache trained with other settings is refused (never overwritten). With several JAX processes, process 0
    loads or trains and broadcasts its vocab, so every host tokenises identically.
    """
    settings = {"vocab_size": vocab_size, "lowercase": lowercase, "min_frequency": min_frequency, "corpus": corpus_name}
    vocab_path = os.path.join(cache_dir, VOCAB_FILE)
    meta_path = os.path.join(cache_dir, META_FILE)
    index, count = _process_info()
    multi = count > 1
    if index == 0:
        tok = None
        if os.path.isfile(vocab_path):
            tok, why, must_be = _cached_vocab(vocab_path, meta_path, settings, lowercase)
            if tok is not None:
                log.info("re-using cached vocab %s (%d tokens)", vocab_path, tok.vocab_size)
            else:
                tok = _retrain_cache(texts, cache_dir, vocab_path, meta_path, settings, why, must_be,
                                     vocab_size=vocab_size, lowercase=lowercase, min_frequency=min_frequency)
        if tok is None:
            if texts is None:
                raise DataError(f"{vocab_path} does not exist and no corpus was given to train a vocabulary on")
            tok = train_wordpiece(texts, vocab_size=vocab_size, lowercase=lowercase, min_frequency=min_frequency)
            os.makedirs(cache_dir, exist_ok=True)
            _atomic_write(vocab_path, tok.vocab_text())
            _atomic_write(meta_path, json.dumps(_with_checksum(settings, tok.vocab_text()), indent=1) + "\n")
            tok = load_vocab_file(vocab_path, lowercase=lowercase)
            log.info("trained a %d-token vocab on %s, cached in %s", tok.vocab_size, corpus_name, vocab_path)
        if not multi:
            return tok
        _broadcast_text(tok.vocab_text())
        return tok
    text = _broadcast_text(None)
    vocab = {t: i for i, t in enumerate(text.splitlines())}
    if not os.path.isfile(vocab_path):
        os.makedirs(cache_dir, exist_ok=True)
        _atomic_write(vocab_path, text)
        _atomic_write(meta_path, json.dumps(_with_checksum(settings, text), indent=1) + "\n")
    return WordPiece(_bert_wordpiece(vocab, lowercase), source=f"{vocab_path} (from process 0)")
