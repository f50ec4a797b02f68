"""Scale-out options change speed and memory, never the numbers: scanned == unrolled layers (outputs and gradients,
full and partial depth, SPS plans, dropout), remat == no remat, and accumulation_steps=4 == 1 for a whole step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mobiledistill import steps
from mobiledistill.models import PreTrainingModel, preset
from mobiledistill.optim import OptimizerConfig
from mobiledistill.strategies import Stage

B, S = 2, 12


def batch(vocab: int, seed: int = 0, size: int = B):
    k = jax.random.split(jax.random.key(seed), 4)
    mask = jnp.ones((size, S), jnp.int32).at[0, S - 3:].set(0)
    return dict(input_ids=jax.random.randint(k[0], (size, S), 1, vocab),
                token_type_ids=(jnp.arange(S)[None, :] >= S // 2).astype(jnp.int32).repeat(size, 0),
                attention_mask=mask,
                masked_lm_positions=jax.random.randint(k[1], (size, 3), 0, S - 3),
                masked_lm_ids=jax.random.randint(k[2], (size, 3), 1, vocab),
                masked_lm_weights=jnp.ones((size, 3), jnp.float32),
                next_sentence_labels=jax.random.randint(k[3], (size,), 0, 2))


def outputs_and_grads(cfg, params, num_layers, rng):
    """All encoder outputs, and the gradient of a loss that touches every one of them."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: PreTrainingModel(cfg, nnx.Rngs(0))))
    b = batch(cfg.vocab_size)

    def loss(p):
        mlm, nsp, out = nnx.merge(graphdef, p)(b["input_ids"], b["token_type_ids"], b["attention_mask"],
                                               b["masked_lm_positions"], rng=rng, num_layers=num_layers)
        o = dict(mlm=mlm, nsp=nsp, hidden=out.hidden_states, scores=out.attention_scores,
                 probs=out.attention_probs)
        finite = [jnp.where(jnp.isfinite(s), s, 0.0) for s in o["scores"]]
        terms = [o["mlm"], o["nsp"], *o["hidden"], *finite, *o["probs"]]
        return sum(jnp.mean(jnp.sin(t.astype(jnp.float32))) for t in terms), o

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return out, grads


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name,num_layers,plan,dropout,variant", [
    ("test_mobilebert", None, None, False, dict(scan_layers=True)),
    pytest.param("test_mobilebert", 2, None, False, dict(scan_layers=True), marks=pytest.mark.slow),
    pytest.param("test_mobilebert", 3, None, True, dict(scan_layers=True, remat="full"), marks=pytest.mark.slow),
    pytest.param("test_ib_bert", 2, None, False, dict(remat="dots"), marks=pytest.mark.slow),
    pytest.param("test_bert", None, ((0, False), (1, False), (0, True)), True, dict(scan_layers=True),
                 marks=pytest.mark.slow),
])
def test_scanned_and_remat_equal_unrolled(name, num_layers, plan, dropout, variant):
    """Outputs and gradients; `num_layers` < L is a progressive stage (the last layer runs outside the scan)."""
    base = preset(name, num_hidden_layers=2 if plan else 4, layer_plan=plan)
    params = nnx.state(PreTrainingModel(base, nnx.Rngs(0)), nnx.Param)
    rng = jax.random.key(7) if dropout else None
    ref_out, ref_grads = outputs_and_grads(base, params, num_layers, rng)
    n = num_layers or len(base.plan)
    assert len(ref_out["hidden"]) == n + 1 and len(ref_out["probs"]) == n
    out, grads = outputs_and_grads(base.replace(**variant), params, num_layers, rng)
    assert_trees_close(out, ref_out)
    assert_trees_close(grads, ref_grads)
    if num_layers is not None:  # layers above the active one get exactly zero gradient either way
        assert not np.any(np.asarray(grads["encoder"]["layers"][n]["query"]["kernel"]))
        assert np.any(np.asarray(grads["encoder"]["layers"][0]["query"]["kernel"]))


def tiny_stage(**kw) -> Stage:
    opt = OptimizerConfig(name="lamb", learning_rate=1e-3, warmup_steps=0, total_steps=10, schedule="constant")
    return Stage(name="t", steps=1, trains="student", init="fresh", optimizer=opt,
                 losses={"mlm": {"weight": 1.0}, "nsp": {"weight": 1.0}}, **kw)


@pytest.mark.slow
def test_accumulation_steps_give_the_same_update(scan=False):
    """4 micro-batches of 2 == one batch of 8 (every sequence has the same number of predictions)."""
    cfg = preset("test_mobilebert", scan_layers=scan)
    graphdef, params = nnx.split(PreTrainingModel(cfg, nnx.Rngs(0)), nnx.Param)
    b = batch(cfg.vocab_size, seed=3, size=8)
    results = []
    for n in (1, 4):
        tx, step = steps.make_train_step(tiny_stage(), graphdef, params, accumulation_steps=n)
        new, _, metrics = jax.jit(step)(params, tx.init(params), None, b, jax.random.key(0))
        results.append((new, metrics))
    (p1, m1), (p4, m4) = results
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-4)
    assert_trees_close(p4, p1, rtol=1e-5, atol=1e-6)
