"""MLM + NSP pre-training examples, following BERT's `create_pretraining_data.py`.

A document is split into sentences, tokenised, and cut into chunks of about `target_seq_length` tokens (the full
`max_seq_length - 3`, or with probability `short_seq_prob` a random shorter target, chosen once per document).
Each chunk gives segment A (its first 1..n-1 sentences) and segment B: the rest of the chunk (IsNext, label 0) or,
with probability 0.5, sentences from a random other document (label 1; the unused sentences are put back). The pair
is truncated to fit, randomly from the front or back, then `masked_lm_prob` (15%) of its maskable tokens (all but
[CLS], [SEP] and padding) are selected, capped by `max_predictions_per_seq`; each selected token becomes [MASK] (80%),
a random token (10%) or stays (10%). Whole-word masking selects whole words ('##' continuations with their head).

Deliberate differences from the original script, each with its reason:
- The 15% is taken of the maskable tokens, not of all tokens including [CLS]/[SEP] (as Hugging Face does), so the
  rate on real tokens is 15% rather than ~15.4% at length 128.
- A chunk of one sentence with an IsNext draw is split inside that sentence (A = a prefix, B = the rest) instead of
  being forced to a random next segment; the original makes such chunks always negative, which skews NSP towards
  "random" on corpora with long sentences. Positives stay at 50%.
- Random replacement tokens are drawn from the vocabulary without the five special tokens.
- Documents over `max_document_chars` characters are cut into pieces at paragraph/line/space boundaries, and
  sentences over `max_sentence_chars` at spaces, so no single input can stall tokenisation; both are counted.
- A random next segment starts at a random sentence of the other document counted before tokenisation, and only
  the sentences it needs are tokenised: on a corpus too large to cache, this is what makes random-next cheap.
- Pair truncation removes the right number of tokens from each end at once (binomially distributed, as the
  original's per-token coin flips) instead of looping token by token.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from mobiledistill.data.errors import DataError, SkipReport
from mobiledistill.data.tokenizer import WordPiece

# Google's released settings: 20 predictions at length 128, 80 at 512.
MAX_PREDICTIONS_PER_SEQ = {128: 20, 512: 80}

# A sentence end: punctuation (and closing quotes/brackets), white space, then something that starts a sentence.
_SENTENCE_END = re.compile(r"([.!?][\"')\]]*)\s+(?=[\"'(\[]?[A-Z0-9])")
_PARAGRAPH = re.compile(r"\n[ \t]*\n")


@dataclasses.dataclass(frozen=True)
class PretrainingConfig:
    """How examples are cut and masked (defaults: BERT's recipe at sequence length 128)."""

    max_seq_length: int = 128
    max_predictions_per_seq: int | None = None  # None: MAX_PREDICTIONS_PER_SEQ, else ceil(length * prob)
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1
    whole_word_masking: bool = False
    max_document_chars: int = 1_000_000

    @property
    def max_predictions(self) -> int:
        if self.max_predictions_per_seq is not None:
            return self.max_predictions_per_seq
        default = math.ceil(self.max_seq_length * self.masked_lm_prob)
        return MAX_PREDICTIONS_PER_SEQ.get(self.max_seq_length, default)

    @property
    def max_sentence_chars(self) -> int:
        # ~4 characters per WordPiece token; a sentence past 8x the sequence is cut anyway by truncation.
        return 32 * self.max_seq_length

    def validate(self) -> None:
        if self.max_seq_length < 8:
            raise DataError(f"max_seq_length={self.max_seq_length}; it must be at least 8")
        if not 0.0 < self.masked_lm_prob < 1.0:
            raise DataError(f"masked_lm_prob={self.masked_lm_prob}; valid: 0 < p < 1")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise DataError(f"short_seq_prob={self.short_seq_prob}; valid: 0 <= p <= 1")
        if not 1 <= self.max_predictions <= self.max_seq_length - 3:
            raise DataError(
                f"max_predictions_per_seq={self.max_predictions}; valid: 1..{self.max_seq_length - 3} "
                f"for max_seq_length={self.max_seq_length}"
            )
        if self.max_document_chars < 1000:
            raise DataError(f"max_document_chars={self.max_document_chars}; it must be at least 1000")


class Instance(NamedTuple):
    """One example before padding: masked ids ([CLS] A [SEP] B [SEP]), len([CLS] A [SEP]), MLM targets, NSP label."""

    input_ids: np.ndarray
    num_a: int
    positions: np.ndarray
    labels: np.ndarray
    next_sentence_label: int


def _cut(text: str, max_chars: int, separators: Sequence[str]) -> list[str]:
    """Pieces of `text` of at most `max_chars`, cut at the last separator that fits (else hard)."""
    pieces = []
    while len(text) > max_chars:
        window = text[: max_chars + 1]
        at = -1
        for sep in separators:
            at = window.rfind(sep)
            if at > 0:
                break
        if at <= 0:
            at = max_chars
        pieces.append(text[:at])
        text = text[at:].lstrip()
    if text:
        pieces.append(text)
    return pieces


def split_sentences(text: str, max_sentence_chars: int = 4096) -> tuple[list[str], int]:
    """Sentences of `text` (paragraphs at blank lines, lines joined, split after . ! ?), and how many were cut."""
    sentences: list[str] = []
    cut = 0
    for paragraph in _PARAGRAPH.split(text):
        joined = " ".join(line.strip() for line in paragraph.splitlines() if line.strip())
        if not joined:
            continue
        start = 0
        for m in _SENTENCE_END.finditer(joined):
            sentences.append(joined[start : m.end(1)])
            start = m.end()
        sentences.append(joined[start:])
    out = []
    for s in sentences:
        if len(s) > max_sentence_chars:
            cut += 1
            out.extend(_cut(s, max_sentence_chars, (" ",)))
        elif s:
            out.append(s)
    return out, cut


def _truncate_pair(a: np.ndarray, b: np.ndarray, max_tokens: int, rng: np.random.Generator):
    """BERT's truncate_seq_pair: trim the longer segment, each token from the front or back with probability 1/2."""
    while len(a) + len(b) > max_tokens:
        excess = len(a) + len(b) - max_tokens
        trim_a = len(a) > len(b)
        d = min(excess, max(1, abs(len(a) - len(b))))
        front = int(rng.binomial(d, 0.5))
        back = d - front
        if trim_a:
            a = a[front : len(a) - back]
        else:
            b = b[front : len(b) - back]
    return a, b


class ExampleBuilder:
    """Turns tokenised documents into `Instance`s and pads them into batches."""

    def __init__(self, tokenizer: WordPiece, config: PretrainingConfig):
        config.validate()
        self.tokenizer = tokenizer
        self.config = config
        special = np.zeros(tokenizer.vocab_size, dtype=bool)
        special[tokenizer.special_ids] = True
        self._random_pool = np.flatnonzero(~special).astype(np.int32)
        self._is_continuation = tokenizer.is_continuation

    def sentences(self, text: str, report: SkipReport | None = None) -> list[list[str]]:
        """A document as pieces (documents over `max_document_chars` are cut), each a non-empty list of sentences."""
        cfg = self.config
        pieces = [text]
        if len(text) > cfg.max_document_chars:
            pieces = _cut(text, cfg.max_document_chars, ("\n\n", "\n", " "))
            if report is not None:
                report.add("long_documents_split", f"{len(text)} chars -> {len(pieces)} pieces")
        out = []
        for piece in pieces:
            sentences, cut = split_sentences(piece, cfg.max_sentence_chars)
            if report is not None and cut:
                report.add("long_sentences_split", n=cut)
            if sentences:
                out.append(sentences)
        return out

    def tokenize(self, text: str, report: SkipReport | None = None) -> list[list[np.ndarray]]:
        """Token ids of `sentences(text)`, aligned with it (a sentence that tokenises to nothing is an empty array)."""
        sentence_lists = self.sentences(text, report)
        encoded = iter(self.tokenizer.encode_texts([s for ss in sentence_lists for s in ss]))
        out = [[next(encoded) for _ in ss] for ss in sentence_lists]
        if report is not None and not any(len(e) for piece in out for e in piece):
            report.add("empty_documents")
        return out

    def segment_from(
        self, sentences: Sequence[str], start: int, target: int, encoded: Sequence[np.ndarray] | None = None
    ) -> np.ndarray:
        """Tokens of sentences[start:], whole sentences, until at least `target` tokens (or the end).

        `encoded`: the sentences' token ids if already known. Otherwise only the sentences needed are tokenised
        (a few, not the whole random document), in chunks sized by a generous characters-per-token estimate; the
        result is the same either way.
        """
        parts: list[np.ndarray] = []
        got = 0
        i = start
        while i < len(sentences) and (got < target or not parts):
            if encoded is not None:
                batch, i = [encoded[i]], i + 1
            else:
                end, chars = i, 0
                while end < len(sentences) and (chars < 6 * max(target - got, 1) or end == i):
                    chars += len(sentences[end])
                    end += 1
                batch = self.tokenizer.encode_texts(list(sentences[i:end]))
            for j, ids in enumerate(batch):
                if len(ids):
                    parts.append(ids)
                    got += len(ids)
                if got >= target and parts:
                    if encoded is None:
                        i += j + 1
                    break
            else:
                if encoded is None:
                    i += len(batch)
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)

    def instances(
        self,
        document: list[np.ndarray],
        rng: np.random.Generator,
        random_segment: Callable[[np.random.Generator, int], np.ndarray],
    ) -> list[Instance]:
        """All instances of one document piece (BERT's create_instances_from_document).

        random_segment(rng, target): at least one and about `target` tokens from a random other document.
        """
        cfg = self.config
        max_num_tokens = cfg.max_seq_length - 3
        target = max_num_tokens
        if rng.random() < cfg.short_seq_prob:
            target = int(rng.integers(2, max_num_tokens + 1))
        out: list[Instance] = []
        chunk: list[np.ndarray] = []
        length = 0
        i = 0
        while i < len(document):
            chunk.append(document[i])
            length += len(document[i])
            if i == len(document) - 1 or length >= target:
                a_end = 1 if len(chunk) < 2 else int(rng.integers(1, len(chunk)))
                tokens_a = np.concatenate(chunk[:a_end])
                random_next = bool(rng.random() < 0.5)
                if not random_next and len(chunk) == 1:
                    if len(tokens_a) >= 2:
                        split = int(rng.integers(1, len(tokens_a)))
                        tokens_a, tokens_b = tokens_a[:split], tokens_a[split:]
                    else:
                        random_next = True
                elif not random_next:
                    tokens_b = np.concatenate(chunk[a_end:])
                if random_next:
                    tokens_b = random_segment(rng, target - len(tokens_a))
                    i -= len(chunk) - a_end  # the unused sentences of this chunk start the next one
                tokens_a, tokens_b = _truncate_pair(tokens_a, tokens_b, max_num_tokens, rng)
                out.append(self._masked(tokens_a, tokens_b, int(random_next), rng))
                chunk, length = [], 0
            i += 1
        return out

    def _masked(self, a: np.ndarray, b: np.ndarray, nsp_label: int, rng: np.random.Generator) -> Instance:
        tok = self.tokenizer
        cfg = self.config
        n_a, n_b = len(a), len(b)
        ids = np.empty(n_a + n_b + 3, dtype=np.int32)
        ids[0] = tok.cls_id
        ids[1 : n_a + 1] = a
        ids[n_a + 1] = tok.sep_id
        ids[n_a + 2 : n_a + n_b + 2] = b
        ids[-1] = tok.sep_id
        maskable = np.concatenate([np.arange(1, n_a + 1), np.arange(n_a + 2, n_a + n_b + 2)]).astype(np.int32)
        k = min(cfg.max_predictions, max(1, round(len(maskable) * cfg.masked_lm_prob)))
        if cfg.whole_word_masking:
            positions = self._whole_words(ids, maskable, k, rng)
        else:
            positions = np.sort(maskable[rng.permutation(len(maskable))[:k]])
        labels = ids[positions].copy()
        u = rng.random(len(positions))
        ids[positions[u < 0.8]] = tok.mask_id
        replace = positions[u >= 0.9]
        ids[replace] = self._random_pool[rng.integers(len(self._random_pool), size=len(replace))]
        return Instance(ids, n_a + 2, positions, labels, nsp_label)

    def _whole_words(self, ids: np.ndarray, maskable: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        """Positions of whole words, added in random order while they fit in `k` (BERT's loop skips, not stops)."""
        cont = self._is_continuation[ids[maskable]]
        new_word = ~cont
        new_word[0] = True
        new_word[1:] |= np.diff(maskable) > 1  # a '##' right after [SEP] still starts a group
        group = np.cumsum(new_word) - 1
        sizes = np.bincount(group)
        starts = np.flatnonzero(new_word)
        chosen, count = [], 0
        for g in rng.permutation(len(sizes)):
            if count + sizes[g] > k:
                continue
            chosen.append(maskable[starts[g] : starts[g] + sizes[g]])
            count += sizes[g]
            if count >= k:
                break
        return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int32)

    def batch(self, instances: Sequence[Instance]) -> dict[str, np.ndarray]:
        """Padded arrays: [batch, max_seq_length] ids/segments/mask, [batch, max_predictions] MLM slots, [batch] NSP."""
        cfg = self.config
        n, length, slots = len(instances), cfg.max_seq_length, cfg.max_predictions
        out = {
            "input_ids": np.full((n, length), self.tokenizer.pad_id, np.int32),
            "token_type_ids": np.zeros((n, length), np.int32),
            "attention_mask": np.zeros((n, length), np.int32),
            "masked_lm_positions": np.zeros((n, slots), np.int32),
            "masked_lm_ids": np.zeros((n, slots), np.int32),
            "masked_lm_weights": np.zeros((n, slots), np.float32),
            "next_sentence_labels": np.zeros((n,), np.int32),
        }
        for r, inst in enumerate(instances):
            t = len(inst.input_ids)
            k = len(inst.positions)
            out["input_ids"][r, :t] = inst.input_ids
            out["token_type_ids"][r, inst.num_a : t] = 1
            out["attention_mask"][r, :t] = 1
            out["masked_lm_positions"][r, :k] = inst.positions
            out["masked_lm_ids"][r, :k] = inst.labels
            out["masked_lm_weights"][r, :k] = 1.0
            out["next_sentence_labels"][r] = inst.next_sentence_label
        return out
