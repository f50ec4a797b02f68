"""Per-host, checkpointable batch iterators, and global `jax.Array` batches on a mesh.

Why a plain Python/NumPy iterator rather than grain or tf.data: example creation is Python (BERT's recipe) over
random-access documents, and what training needs from the input side is (1) exact resume from a tiny JSON state
saved in each checkpoint, (2) a fixed, seed-determined stream that does not depend on worker timing, and (3) no
TensorFlow. A deterministic iterator whose whole position is a few integers gives all three in code that is
easy to test; tf.data would add TensorFlow and opaque iterator checkpoints, and grain's multiprocess workers would
add a dependency and worker processes that the load does not need: one core makes ~2,500 examples/s at length 128
with every document tokenised afresh (benchmarks/input_pipeline.py), while a 2-core CPU trains MobileBERT at ~4/s and
each host of a v3-512 pod takes 64 examples per step. On accelerators, `prefetch` overlaps it with the step.

Sharding: every process derives the same seed-determined permutation of each source per epoch and takes every
`process_count`-th entry from `process_index` on, so shards are disjoint and together cover the data. Each process
then yields its local batch (global batch / process count); `to_global` assembles the global array with
`jax.make_array_from_process_local_data` under the caller's batch sharding (e.g. PartitionSpec(('data', 'fsdp'))).
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from mobiledistill.data.errors import DataError, SkipReport
from mobiledistill.data.pretraining import ExampleBuilder, Instance, PretrainingConfig
from mobiledistill.data.sources import Corpus
from mobiledistill.data.tokenizer import WordPiece

STATE_VERSION = 1
_MIX_BLOCK = 1024


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} is outside [0, process_count={process_count})")
    return process_index, process_count


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size < 1 or global_batch_size % process_count:
        raise DataError(
            f"global_batch_size={global_batch_size} must be a positive multiple of process_count={process_count}"
        )
    return global_batch_size // process_count


def to_global(batch: Mapping[str, np.ndarray], sharding) -> dict[str, Any]:
    """Process-local numpy batch -> global jax.Arrays, split along the batch axis by `sharding`."""
    import jax

    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def _check_state(state: Mapping[str, Any], kind: str, process_index: int, process_count: int) -> None:
    if state.get("kind") != kind or state.get("version") != STATE_VERSION:
        raise DataError(
            f"iterator state is of kind {state.get('kind')!r} version {state.get('version')!r}; "
            f"this iterator needs kind {kind!r} version {STATE_VERSION}"
        )
    if (state["process_index"], state["process_count"]) != (process_index, process_count):
        raise DataError(
            f"iterator state was saved by process {state['process_index']} of {state['process_count']}; this is "
            f"process {process_index} of {process_count} (resume with the same number of hosts)"
        )


class PretrainingIterator(Iterator[dict[str, Any]]):
    """Endless MLM+NSP batches from one or more weighted corpora, sharded per process, resumable exactly.

    corpora: a Corpus, or a sequence of Corpus or (Corpus, weight); documents are drawn from source s with
    probability weight_s / sum(weights). Each document of each epoch is turned into examples with its own RNG seeded
    by (seed, source, epoch, document index), so the stream depends only on the seed, the data and the shard.
    sharding: if given, batches are global jax.Arrays (see `to_global`); else per-process numpy arrays.
    """

    def __init__(
        self,
        corpora: Corpus | Sequence[Corpus | tuple[Corpus, float]],
        tokenizer: WordPiece,
        *,
        global_batch_size: int,
        config: PretrainingConfig | None = None,
        seed: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
        sharding=None,
        document_cache_size: int = 4096,
    ):
        if isinstance(corpora, Corpus):
            corpora = [corpora]
        pairs = [(c, 1.0) if isinstance(c, Corpus) else (c[0], float(c[1])) for c in corpora]
        if not pairs:
            raise DataError("PretrainingIterator: no corpus given")
        weights = np.array([w for _, w in pairs], dtype=np.float64)
        if np.any(weights <= 0) or not np.all(np.isfinite(weights)):
            raise DataError(f"corpus weights must be positive numbers, got {weights.tolist()}")
        self.corpora = [c for c, _ in pairs]
        self.weights = weights / weights.sum()
        self.process_index, self.process_count = _process(process_index, process_count)
        for c in self.corpora:
            if len(c) < self.process_count:
                raise DataError(f"{c.name}: {len(c)} documents cannot be sharded over {self.process_count} processes")
        self.local_batch_size = _local_batch_size(global_batch_size, self.process_count)
        self.config = config or PretrainingConfig()
        self.builder = ExampleBuilder(tokenizer, self.config)
        self.tokenizer = tokenizer
        self.sharding = sharding
        self.report = SkipReport("pretraining examples")
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._cache_size = document_cache_size
        self._shards: dict[tuple[int, int], np.ndarray] = {}
        self._mix_block: tuple[int, np.ndarray] | None = None
        self._reset(seed)

    # ---- state ---------------------------------------------------------------------------------------------

    def _reset(self, seed: int) -> None:
        self.seed = int(seed)
        self._doc_step = 0
        self._source_pos = [[0, 0] for _ in self.corpora]  # [epoch, position in this process's shard]
        self._current: tuple[int, int, int] | None = None
        self._pending: list[Instance] = []
        self._instance_in_doc = 0
        self._idle_docs = 0
        self.examples = 0
        self.batches = 0

    def _corpus_signature(self) -> list[list]:
        return [[c.name, len(c)] for c in self.corpora]

    def get_state(self) -> dict[str, Any]:
        """A JSON-able dict from which `set_state` resumes at exactly the next batch."""
        return {
            "kind": "pretraining",
            "version": STATE_VERSION,
            "seed": self.seed,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "corpora": self._corpus_signature(),
            "doc_step": self._doc_step,
            "sources": [list(p) for p in self._source_pos],
            "current": list(self._current) if self._current is not None else None,
            "instance_in_doc": self._instance_in_doc,
            "examples": self.examples,
            "batches": self.batches,
            "report": self.report.as_dict(),
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        _check_state(state, "pretraining", self.process_index, self.process_count)
        if [list(x) for x in state["corpora"]] != self._corpus_signature():
            raise DataError(
                f"iterator state was saved for corpora {state['corpora']}, this iterator reads "
                f"{self._corpus_signature()}"
            )
        self._reset(state["seed"])
        self._doc_step = int(state["doc_step"])
        self._source_pos = [[int(e), int(p)] for e, p in state["sources"]]
        self.examples = int(state["examples"])
        self.batches = int(state["batches"])
        self.report = SkipReport("pretraining examples")
        self.report.counts.update(state.get("report", {}))
        if state["current"] is not None:
            s, epoch, idx = (int(v) for v in state["current"])
            self._current = (s, epoch, idx)
            self._pending = self._document_instances(s, epoch, idx, SkipReport("replay"))
            self._instance_in_doc = int(state["instance_in_doc"])

    # ---- documents -----------------------------------------------------------------------------------------

    def shard(self, source: int, epoch: int) -> np.ndarray:
        """This process's document indices of `source` in `epoch`, in reading order."""
        key = (source, epoch)
        if key not in self._shards:
            n = len(self.corpora[source])
            perm = np.random.default_rng([self.seed, source, epoch, 0x5EED]).permutation(n)
            self._shards = {k: v for k, v in self._shards.items() if k[0] != source}
            self._shards[key] = perm[self.process_index :: self.process_count]
        return self._shards[key]

    def _shard_size(self, source: int) -> int:
        return len(range(self.process_index, len(self.corpora[source]), self.process_count))

    def documents_per_epoch(self) -> int:
        """Documents of this process's shards, all sources together: one pass over its share of the data."""
        return sum(self._shard_size(s) for s in range(len(self.corpora)))

    def _source_for_step(self, step: int) -> int:
        if len(self.corpora) == 1:
            return 0
        block = step // _MIX_BLOCK
        if self._mix_block is None or self._mix_block[0] != block:
            rng = np.random.default_rng([self.seed, block, 0x4D1C])
            self._mix_block = (block, rng.choice(len(self.corpora), size=_MIX_BLOCK, p=self.weights))
        return int(self._mix_block[1][step % _MIX_BLOCK])

    def _cached(self, kind: str, source: int, idx: int, make):
        key = (kind, source, idx)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        value = make()
        self._cache[key] = value
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return value

    def _tokenized(self, source: int, idx: int, report: SkipReport) -> list[list[np.ndarray]]:
        return self._cached("tokens", source, idx, lambda: self.builder.tokenize(self.corpora[source][idx], report))

    def _sentences(self, source: int, idx: int) -> list[list[str]]:
        return self._cached("sentences", source, idx, lambda: self.builder.sentences(self.corpora[source][idx]))

    def warm_cache(self) -> None:
        """Tokenises this process's documents into the document cache now (worth it for corpora that fit in it)."""
        for s in range(len(self.corpora)):
            for idx in sorted(self.shard(s, 0).tolist())[: self._cache_size]:
                self._tokenized(s, idx, SkipReport("warm cache"))

    def _document_instances(self, source: int, epoch: int, idx: int, report: SkipReport) -> list[Instance]:
        pieces = [[ids for ids in piece if len(ids)] for piece in self._tokenized(source, idx, report)]
        pieces = [piece for piece in pieces if piece]
        if not pieces:
            return []
        rng = np.random.default_rng([self.seed, source, epoch, int(idx)])
        shard = self.shard(source, epoch)

        def random_segment(r: np.random.Generator, target: int) -> np.ndarray:
            """About `target` tokens from a random start sentence of a random other document of this shard."""
            for _ in range(10):
                other = int(shard[r.integers(len(shard))])
                if other == idx and len(shard) > 1:
                    continue
                # Tokens if this document is cached anyway, else its sentences (cheap), tokenised as needed.
                encoded = self._cache.get(("tokens", source, other))
                sentences = encoded if encoded is not None else self._sentences(source, other)
                if not sentences:
                    continue
                p = int(r.integers(len(sentences)))
                start = int(r.integers(len(sentences[p])))
                tokens = self.builder.segment_from(
                    sentences[p], start, target, encoded=None if encoded is None else encoded[p]
                )
                if len(tokens):
                    return tokens
            piece = pieces[int(r.integers(len(pieces)))]  # a shard of empty documents: fall back to this one
            return piece[int(r.integers(len(piece)))]

        out: list[Instance] = []
        for piece in pieces:
            out.extend(self.builder.instances(piece, rng, random_segment))
        return out

    def _next_document(self) -> None:
        s = self._source_for_step(self._doc_step)
        pos = self._source_pos[s]
        if pos[1] >= len(self.shard(s, pos[0])):
            pos[0], pos[1] = pos[0] + 1, 0
        idx = int(self.shard(s, pos[0])[pos[1]])
        pos[1] += 1
        self._doc_step += 1
        self._current = (s, pos[0], idx)
        self._pending = self._document_instances(s, pos[0], idx, self.report)
        self._instance_in_doc = 0
        self._idle_docs = self._idle_docs + 1 if not self._pending else 0
        if self._idle_docs > sum(self._shard_size(i) for i in range(len(self.corpora))):
            raise DataError(
                f"no document of this process's shard gives an example ({self.report.summary()}); "
                "the corpus is empty after tokenisation"
            )

    # ---- iteration -----------------------------------------------------------------------------------------

    def next_numpy(self) -> dict[str, np.ndarray]:
        """The next process-local batch as numpy arrays."""
        instances: list[Instance] = []
        while len(instances) < self.local_batch_size:
            if self._instance_in_doc >= len(self._pending):
                self._next_document()
                continue
            take = min(self.local_batch_size - len(instances), len(self._pending) - self._instance_in_doc)
            instances.extend(self._pending[self._instance_in_doc : self._instance_in_doc + take])
            self._instance_in_doc += take
        self.examples += len(instances)
        self.batches += 1
        return self.builder.batch(instances)

    def __next__(self) -> dict[str, Any]:
        batch = self.next_numpy()
        return to_global(batch, self.sharding) if self.sharding is not None else batch

    def __iter__(self):
        return self


class ArrayIterator(Iterator[dict[str, Any]]):
    """Batches of in-memory feature arrays (GLUE/SQuAD), shuffled per epoch, sharded per process, resumable.

    Training (drop_remainder=True): each epoch every process takes the same number of whole batches from its shard.
    Evaluation (drop_remainder=False, shuffle=False): every example is yielded once; the last batches are padded by
    repeating a row, and `example_mask` (1 real, 0 padding) says which rows count. num_epochs=None repeats forever.
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        global_batch_size: int,
        *,
        shuffle: bool = True,
        drop_remainder: bool = True,
        num_epochs: int | None = None,
        seed: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
        sharding=None,
    ):
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        sizes = {k: len(v) for k, v in self.arrays.items()}
        if not sizes or len(set(sizes.values())) != 1:
            raise DataError(f"feature arrays must be non-empty and of one length, got {sizes}")
        self.num_examples = next(iter(sizes.values()))
        if self.num_examples == 0:
            raise DataError("no examples to iterate over (the feature arrays are empty)")
        self.process_index, self.process_count = _process(process_index, process_count)
        self.local_batch_size = _local_batch_size(global_batch_size, self.process_count)
        self.shuffle, self.drop_remainder, self.num_epochs = shuffle, drop_remainder, num_epochs
        self.sharding = sharding
        if drop_remainder:
            self.steps_per_epoch = (self.num_examples // self.process_count) // self.local_batch_size
            if self.steps_per_epoch == 0:
                raise DataError(
                    f"{self.num_examples} examples give no full batch of {global_batch_size} "
                    f"over {self.process_count} processes"
                )
        else:
            per_process = -(-self.num_examples // self.process_count)
            self.steps_per_epoch = -(-per_process // self.local_batch_size)
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0
        self._order: tuple[int, np.ndarray] | None = None

    def shard(self, epoch: int) -> np.ndarray:
        """This process's example indices in `epoch`, in reading order."""
        if self._order is None or self._order[0] != epoch:
            n = self.num_examples
            order = np.random.default_rng([self.seed, epoch, 0xA11]).permutation(n) if self.shuffle else np.arange(n)
            self._order = (epoch, order[self.process_index :: self.process_count])
        return self._order[1]

    def get_state(self) -> dict[str, Any]:
        return {
            "kind": "arrays",
            "version": STATE_VERSION,
            "seed": self.seed,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "num_examples": self.num_examples,
            "epoch": self.epoch,
            "position": self.position,
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        _check_state(state, "arrays", self.process_index, self.process_count)
        if state["num_examples"] != self.num_examples:
            raise DataError(
                f"iterator state was saved for {state['num_examples']} examples, these features have "
                f"{self.num_examples}"
            )
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])

    def next_numpy(self) -> dict[str, np.ndarray]:
        if self.position >= self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        shard = self.shard(self.epoch)
        b = self.local_batch_size
        idx = shard[self.position * b : (self.position + 1) * b]
        mask = np.ones(b, np.float32)
        if len(idx) < b:
            mask[len(idx) :] = 0.0
            idx = np.concatenate([idx, np.full(b - len(idx), shard[0] if len(shard) else 0)])
        self.position += 1
        batch = {k: v[idx] for k, v in self.arrays.items()}
        batch["example_mask"] = mask
        return batch

    def __next__(self) -> dict[str, Any]:
        batch = self.next_numpy()
        return to_global(batch, self.sharding) if self.sharding is not None else batch

    def __iter__(self):
        return self


def prefetch(iterator, size: int = 2) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Runs `iterator` `size` batches ahead in a background thread; yields (batch, state after that batch).

    The iterator itself runs ahead of the consumer, so checkpoint the state that came with the last batch
    consumed, not `iterator.get_state()`.
    """
    q: queue.Queue = queue.Queue(maxsize=size)
    done = object()

    def work():
        try:
            for batch in iterator:
                q.put((batch, iterator.get_state()))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer and raised there
            q.put(e)
            return
        q.put(done)

    threading.Thread(target=work, daemon=True).start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
