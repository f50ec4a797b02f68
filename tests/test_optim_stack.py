"""The optimizer over layer stacks (`optim_stack`): the same updates as one update per leaf, per-layer LR scales and
trust ratios, frozen layers untouched and stateless, per-leaf states read into the stacked layout, and the train
step that differentiates the stacked view."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mobiledistill import checkpoint as ckpt
from mobiledistill import optim, optim_stack, sharding, steps
from mobiledistill.models import PreTrainingModel, preset

from test_scan import assert_trees_close, batch, tiny_stage

L = 4


def _params(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda scale, *s: jnp.asarray(rng.normal(size=s) * scale, jnp.float32)  # noqa: E731
    # Layers of different magnitudes, so that per-layer trust ratios differ from one over the whole stack.
    layers = {i: {"query": {"kernel": f(1 + 3 * i, 4, 3), "bias": f(1, 3)}, "norm": {"scale": f(1, 3)}}
              for i in range(L)}
    layers[2]["extra"] = {"kernel": f(1, 2, 2)}  # only in layer 2: stays a leaf of its own
    return {"encoder": {"embeddings": {"word": {"embedding": f(1, 6, 3)}}, "layers": layers},
            "mlm": {"bias": f(1, 6)}}


def _grads(step, params):
    rng = np.random.default_rng(100 + step)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 3, jnp.float32), params)


def _run(cfg, params, n, start=0, state=None):
    tx = optim.make_optimizer(cfg)
    state = tx.init(params) if state is None else state
    for t in range(start, start + n):
        updates, state = tx.update(_grads(t, params), state, params)
        params = jax.tree.map(jnp.add, params, updates)
    return params, state


PROGRESSIVE = dict(lr_scales=tuple(optim.progressive_lr_rules(2, 0.1)), default_lr_scale=0.0)


@pytest.mark.parametrize("name", ["lamb", "adamw"])
@pytest.mark.parametrize("rules", [{}, PROGRESSIVE], ids=["all", "progressive_k2"])
def test_stacked_updates_equal_per_leaf_updates(name, rules):
    cfg = optim.OptimizerConfig(name=name, learning_rate=0.01, clip_norm=1.0, **rules)
    params = _params()
    stacked, state = _run(cfg, params, 3)
    per_leaf, _ = _run(dataclasses.replace(cfg, stack_layers=False), params, 3)
    assert_trees_close(stacked, per_leaf, rtol=1e-6, atol=1e-7)
    view = {optim.path_to_str(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    layers = 3 if rules else L  # progressive k = 2: layers 0-2 train (0, 1 at LR x 0.1), layer 3 is frozen
    assert any(k.endswith("mu/encoder/layers/*/query/kernel") and s == (layers, 4, 3) for k, s in view.items())
    assert not any("layers/1/" in k for k in view)  # no per-layer state of a stacked layer is left
    if rules:
        for path in ("encoder/layers/3/query/kernel", "encoder/embeddings/word/embedding", "mlm/bias"):
            before, after = (np.asarray(_leaf(t, path)) for t in (params, stacked))
            assert before.tobytes() == after.tobytes(), path  # frozen: bit-identical
        assert not any("layers/3/" in k or "embeddings" in k for k in view)  # and without optimizer state


def _leaf(tree, path):
    return {optim.path_to_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}[path]


def test_layout_stacks_runs_of_same_shaped_trainable_layers_from_zero():
    params = _params()
    entries = dict(optim_stack.layout(params))
    assert len(entries["encoder/layers/*/query/kernel"]) == L and "encoder/layers/2/extra/kernel" in entries
    assert "mlm/bias" in entries and len(jax.tree.leaves(params)) == sum(len(i) for i in entries.values())
    # Only what `stackable` allows; a run must start at layer 0.
    no_0 = dict(optim_stack.layout(params, lambda p: not p.startswith("encoder/layers/0/")))
    assert "encoder/layers/*/query/kernel" not in no_0 and "encoder/layers/1/query/kernel" in no_0
    params["encoder"]["layers"][1]["query"]["bias"] = jnp.zeros(5)  # another shape breaks the stack
    assert "encoder/layers/1/query/bias" in dict(optim_stack.layout(params))
    view = optim_stack.to_view(_params())
    assert view["encoder/layers/*/query/kernel"].shape == (L, 4, 3)
    assert_trees_close(optim_stack.from_view(view, _params()), _params(), rtol=0, atol=0)
    # Per-layer scales of a stacked path, as the rules give them for each layer.
    scales = optim.lr_scale_tree(view, PROGRESSIVE["lr_scales"], 0.0)
    np.testing.assert_array_equal(scales["encoder/layers/*/query/kernel"], np.float32([0.1, 0.1, 1.0, 0.0]))


def test_a_per_leaf_state_converts_and_training_goes_on_the_same():
    cfg = optim.OptimizerConfig(name="lamb", learning_rate=0.01, **PROGRESSIVE)
    per_leaf_cfg = dataclasses.replace(cfg, stack_layers=False)
    params = _params()
    want, _ = _run(per_leaf_cfg, params, 4)
    half, old_state = _run(per_leaf_cfg, params, 2)
    like = jax.eval_shape(optim.make_optimizer(cfg).init, params)
    got, _ = _run(cfg, half, 2, start=2, state=optim_stack.convert_state(old_state, like))
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)


def test_checkpoint_with_a_per_leaf_state_is_read_into_the_stacked_layout(tmp_path):
    cfg = optim.OptimizerConfig(name="adamw", learning_rate=0.01)
    params = _params()
    _, old_state = _run(dataclasses.replace(cfg, stack_layers=False), params, 2)
    cps = ckpt.StageCheckpoints(str(tmp_path / "stage"), async_save=False)
    cps.save(2, params, old_state, {"position": 2})
    mesh = sharding.make_mesh()
    like = jax.device_put(optim.make_optimizer(cfg).init(params), sharding.replicated(mesh))
    with pytest.raises(ckpt.CheckpointError, match="item 'opt_state'"):  # the stacked layout alone cannot read it
        cps.restore_latest(params, like)
    step, _, state, data = cps.restore_latest(params, like, optim.per_leaf_reader(cfg, params, like, mesh))
    assert step == 2 and data == {"position": 2}
    assert_trees_close(state, optim_stack.convert_state(old_state, like), rtol=0, atol=0)
    assert not (tmp_path / "stage" / "unreadable_checkpoints").exists()
    cps.close()
    assert optim.per_leaf_reader(dataclasses.replace(cfg, stack_layers=False), params, like, mesh) is None


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_train_step_in_the_stacked_view_equals_the_per_leaf_step(scan):
    """The step differentiates the stacked view (`steps.make_train_step`); a progressive stage (layer 1 active,
    layer 0 at LR x 0.1, the rest frozen) gives the per-leaf step's parameters, frozen ones bit for bit."""
    cfg = preset("test_mobilebert", scan_layers=scan)
    graphdef, params = nnx.split(PreTrainingModel(cfg, nnx.Rngs(0)), nnx.Param)
    b = batch(cfg.vocab_size, seed=3)
    stage = tiny_stage(num_layers=2)
    stage = dataclasses.replace(stage, optimizer=dataclasses.replace(
        stage.optimizer, lr_scales=tuple(optim.progressive_lr_rules(1, 0.1)), default_lr_scale=0.0))
    results = []
    for stacked in (True, False):
        s = dataclasses.replace(stage, optimizer=dataclasses.replace(stage.optimizer, stack_layers=stacked))
        tx, step = steps.make_train_step(s, graphdef, params)
        p, o = params, tx.init(params)
        for i in range(2):
            p, o, metrics = jax.jit(step)(p, o, None, b, jax.random.key(i))
        results.append((p, metrics))
    (p_s, m_s), (p_l, m_l) = results
    np.testing.assert_allclose(float(m_s["grad_norm"]), float(m_l["grad_norm"]), rtol=1e-5)
    assert_trees_close(p_s, p_l, rtol=1e-5, atol=1e-6)
    before, after = (dict((optim.path_to_str(k), np.asarray(v)) for k, v in jax.tree_util.tree_flatten_with_path(t)[0])
                     for t in (params, p_s))
    frozen = [k for k in before if optim.lr_scale_for(k, stage.optimizer.lr_scales, 0.0) == 0.0]
    trained = [k for k in before if k.startswith("encoder/layers/1/") and k.endswith("kernel")]
    assert frozen and trained
    assert all(before[k].tobytes() == after[k].tobytes() for k in frozen)
    assert all(not np.array_equal(before[k], after[k]) for k in trained)
