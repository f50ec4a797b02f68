"""Iterators: exact resume in a fresh process, disjoint covering shards, global arrays on a mesh, mixing."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from _limits import SUBPROCESS_TIMEOUT
from _data_helpers import corpus, tokenizer, vocab_dir
from jax.sharding import NamedSharding, PartitionSpec

from mobiledistill.data import (
    ArrayIterator,
    DataError,
    InMemoryCorpus,
    PretrainingIterator,
    prefetch,
    to_global,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import jax
    from jax.sharding import NamedSharding, PartitionSpec
    from mobiledistill.data import ArrayIterator, PretrainingIterator, embedded_corpus, load_vocab_file

    args = json.load(open(sys.argv[1]))
    mesh = jax.make_mesh((4, 1), ("data", "fsdp"))
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    tok = load_vocab_file(args["vocab"])
    it = PretrainingIterator(embedded_corpus(), tok, global_batch_size=8, seed=3, sharding=sharding)
    it.set_state(args["pretraining_state"])
    out, info = {}, {}
    for m in range(args["m"]):
        batch = next(it)
        for k, v in batch.items():
            out[f"{m}/{k}"] = np.asarray(v)
        info = {"devices": len(jax.devices()), "shape": list(batch["input_ids"].shape),
                "shards": len(batch["input_ids"].addressable_shards),
                "shard_shape": list(batch["input_ids"].sharding.shard_shape(batch["input_ids"].shape))}
    arrays = {k: np.asarray(v) for k, v in np.load(args["arrays"]).items()}
    ai = ArrayIterator(arrays, 8, seed=1)
    ai.set_state(args["array_state"])
    for m in range(args["m"]):
        out[f"arrays/{m}"] = ai.next_numpy()["x"]
    np.savez(args["out"], **out)
    json.dump(info, open(args["info"], "w"))
    """
)


def test_resume_in_a_fresh_process_continues_the_exact_stream(tmp_path):
    n, m = 3, 4
    it = PretrainingIterator(corpus(), tokenizer(), global_batch_size=8, seed=3, process_index=0, process_count=1)
    arrays = {"x": np.arange(50, dtype=np.int32)}
    ai = ArrayIterator(arrays, 8, seed=1, process_index=0, process_count=1)
    for _ in range(n):
        it.next_numpy()
        ai.next_numpy()
    state = json.loads(json.dumps(it.get_state()))  # must survive JSON
    array_state = json.loads(json.dumps(ai.get_state()))
    expected = [it.next_numpy() for _ in range(m)]
    expected_arrays = [ai.next_numpy()["x"] for _ in range(m)]
    np.savez(tmp_path / "arrays.npz", **arrays)
    args = {
        "vocab": os.path.join(vocab_dir(), "vocab.txt"),
        "pretraining_state": state,
        "array_state": array_state,
        "arrays": str(tmp_path / "arrays.npz"),
        "m": m,
        "out": str(tmp_path / "out.npz"),
        "info": str(tmp_path / "info.json"),
    }
    (tmp_path / "args.json").write_text(json.dumps(args))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "args.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    for i, batch in enumerate(expected):
        for k, v in batch.items():
            np.testing.assert_array_equal(got[f"{i}/{k}"], v, err_msg=f"batch {n + i} {k}")
        np.testing.assert_array_equal(got[f"arrays/{i}"], expected_arrays[i])
    info = json.loads((tmp_path / "info.json").read_text())
    assert info == {"devices": 4, "shape": [8, 128], "shards": 4, "shard_shape": [2, 128]}


def test_restored_state_continues_in_process_and_state_is_checked():
    it = PretrainingIterator(corpus(), tokenizer(), global_batch_size=4, seed=9, process_index=0, process_count=1)
    for _ in range(5):
        it.next_numpy()
    state = it.get_state()
    want = it.next_numpy()
    fresh = PretrainingIterator(corpus(), tokenizer(), global_batch_size=4, seed=0, process_index=0, process_count=1)
    fresh.set_state(state)
    got = fresh.next_numpy()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    other = PretrainingIterator(corpus(), tokenizer(), global_batch_size=4, process_index=1, process_count=2)
    with pytest.raises(DataError, match="process 0 of 1"):
        other.set_state(state)
    small = PretrainingIterator(
        InMemoryCorpus("tiny", ["One. Two."]), tokenizer(), global_batch_size=4, process_index=0, process_count=1
    )
    with pytest.raises(DataError, match="saved for corpora"):
        small.set_state(state)


def test_two_processes_read_disjoint_shards_that_cover_the_corpus():
    its = [
        PretrainingIterator(corpus(), tokenizer(), global_batch_size=8, seed=2, process_index=p, process_count=2)
        for p in range(2)
    ]
    for epoch in (0, 1):
        shards = [set(it.shard(0, epoch).tolist()) for it in its]
        assert not shards[0] & shards[1]
        assert shards[0] | shards[1] == set(range(len(corpus())))
        assert abs(len(shards[0]) - len(shards[1])) <= 1
    assert its[0].shard(0, 0).tolist() != its[0].shard(0, 1).tolist(), "a new order each epoch"
    # the documents each process actually reads come from its own shard only
    seen = [set(), set()]
    for p, it in enumerate(its):
        for _ in range(20):
            it.next_numpy()
            seen[p].add(it.get_state()["current"][2])
        assert seen[p] <= set(it.shard(0, 0).tolist())
    assert its[0].local_batch_size == 4
    b0, b1 = its[0].next_numpy(), its[1].next_numpy()
    assert b0["input_ids"].shape == (4, 128) and not np.array_equal(b0["input_ids"], b1["input_ids"])


def test_array_iterator_shards_are_disjoint_and_cover_in_evaluation():
    n = 37
    arrays = {"idx": np.arange(n), "x": np.arange(n) * 10}
    seen = []
    for p in range(2):
        it = ArrayIterator(
            arrays, 8, shuffle=False, drop_remainder=False, num_epochs=1, process_index=p, process_count=2
        )
        batches = list(it)
        assert len(batches) == it.steps_per_epoch == 5  # ceil(ceil(37/2)/4) on both processes
        real = np.concatenate([b["idx"][b["example_mask"] > 0] for b in batches])
        assert all(b["idx"].shape == (4,) for b in batches)
        seen.append(real)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(np.concatenate(seen).tolist()) == list(range(n))


def test_array_iterator_training_epochs_shuffle_and_drop_remainder():
    arrays = {"idx": np.arange(30)}
    it = ArrayIterator(arrays, 4, seed=0, process_index=0, process_count=1)
    epoch0 = np.concatenate([next(it)["idx"] for _ in range(it.steps_per_epoch)])
    epoch1 = np.concatenate([next(it)["idx"] for _ in range(it.steps_per_epoch)])
    assert it.steps_per_epoch == 7 and len(set(epoch0)) == 28 and len(set(epoch1)) == 28
    assert epoch0.tolist() != epoch1.tolist()
    with pytest.raises(DataError, match="one length"):
        ArrayIterator({"a": np.zeros(3), "b": np.zeros(4)}, 2, process_index=0, process_count=1)
    with pytest.raises(DataError, match="multiple of process_count"):
        ArrayIterator(arrays, 5, process_index=0, process_count=2)


def test_global_arrays_on_a_mesh():
    devices = len(jax.devices())
    mesh = jax.make_mesh((devices, 1), ("data", "fsdp"))
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    it = PretrainingIterator(
        corpus(), tokenizer(), global_batch_size=2 * devices, sharding=sharding, process_index=0, process_count=1
    )
    batch = next(it)
    assert isinstance(batch["input_ids"], jax.Array)
    assert batch["input_ids"].shape == (2 * devices, 128)
    assert batch["masked_lm_positions"].sharding == sharding
    assert batch["masked_lm_weights"].dtype == np.float32
    direct = to_global({"a": np.ones((2 * devices, 3), np.int32)}, sharding)
    assert direct["a"].shape == (2 * devices, 3)


def test_weighted_mixture_of_corpora():
    a = InMemoryCorpus("a", [f"Alpha document {i}. It says alpha things." for i in range(40)])
    b = InMemoryCorpus("b", [f"Beta document {i}. It says beta things." for i in range(40)])
    it = PretrainingIterator([(a, 3.0), (b, 1.0)], tokenizer(), global_batch_size=16, process_index=0, process_count=1)
    for _ in range(60):
        it.next_numpy()
    state = it.get_state()
    docs_a = state["sources"][0][0] * 40 + state["sources"][0][1]
    docs_b = state["sources"][1][0] * 40 + state["sources"][1][1]
    assert abs(docs_a / (docs_a + docs_b) - 0.75) < 0.06
    with pytest.raises(DataError, match="weights must be positive"):
        PretrainingIterator([(a, 1.0), (b, 0.0)], tokenizer(), global_batch_size=2, process_index=0, process_count=1)


def test_prefetch_yields_each_batch_with_the_state_after_it():
    it = PretrainingIterator(corpus(), tokenizer(), global_batch_size=4, seed=4, process_index=0, process_count=1)
    stream = prefetch(it, size=3)
    batches = [next(stream) for _ in range(3)]
    _, state = batches[1]
    resumed = PretrainingIterator(corpus(), tokenizer(), global_batch_size=4, process_index=0, process_count=1)
    resumed.set_state(state)
    np.testing.assert_array_equal(resumed.next_numpy()["input_ids"], batches[2][0]["input_ids"])
