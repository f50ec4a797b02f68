"""Both official layer-wise recipes by config: `pkt.ln_eps` and `pkt.loss_normalizer` reach every transfer term.

TF1 official (google-research/mobilebert): LN eps 1e-12, the summed terms of a stage divided by the student depth L.
TF2 Model Garden (official/projects/mobilebert/distillation.py, `build_losses`): Keras LayerNormalization (eps 1e-3)
and `total_loss /= (stage_id + 1)`.
"""

import importlib.util

import numpy as np
import pytest

from mobiledistill import pipeline
from mobiledistill.config import ConfigError
from mobiledistill.losses import build_loss, layer_transfer_loss


def _config(**pkt):
    spec = importlib.util.spec_from_file_location("progressive", "configs/progressive.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("local")
    c.pkt.update(pkt)
    return c


def _outputs(seed, layers, width=32, heads=2, batch=2, seq=8):
    rng = np.random.default_rng(seed)
    return {"hidden_states": [rng.normal(size=(batch, seq, width)).astype(np.float32) for _ in range(layers + 1)],
            "attention_scores": [rng.normal(size=(batch, heads, seq, seq)).astype(np.float32)
                                 for _ in range(layers)]}


@pytest.mark.parametrize("mode", ["mean", "num_layers", "stage"])
def test_loss_normalizer_and_ln_eps_reach_each_progressive_stage(mode):
    c = _config(loss_normalizer=mode, ln_eps=1e-3)
    teacher, student, stages = pipeline.plan(c)
    pkt = [s for s in stages if s.name.startswith("pkt_")]
    depth = student.num_hidden_layers
    assert len(pkt) == depth
    width, heads = student.hidden_size, student.num_attention_heads
    t_out = _outputs(0, depth, width, heads)
    s_out = _outputs(1, depth, width, heads)
    mask = np.ones((2, 8), np.int32)
    mask[1, 5:] = 0
    for k, stage in enumerate(pkt):
        total, _ = build_loss(stage.losses)(t_out, s_out, {"attention_mask": mask})
        weights = {name: spec["weight"] for name, spec in stage.losses.items()}
        plain, _ = layer_transfer_loss(t_out, s_out, [k], weights, mask, ln_eps=1e-3)
        divisor = {"mean": 1, "num_layers": depth, "stage": k + 1}[mode]
        np.testing.assert_allclose(float(total), float(plain) / divisor, rtol=1e-5)
    # the eps really is used: 1e-3 vs 1e-12 changes FMT measurably on unit-scale features
    fmt_3 = layer_transfer_loss(t_out, s_out, [0], {"fmt": 1.0}, mask, ln_eps=1e-3)[0]
    fmt_12 = layer_transfer_loss(t_out, s_out, [0], {"fmt": 1.0}, mask, ln_eps=1e-12)[0]
    assert abs(float(fmt_3) - float(fmt_12)) > 1e-5
    assert all(spec["ln_eps"] == 1e-3 for s in pkt for spec in s.losses.values())


def test_bad_normalizer_is_a_config_error():
    with pytest.raises(ConfigError, match="pkt.loss_normalizer='per_layer'; valid: mean, num_layers, stage"):
        pipeline.plan(_config(loss_normalizer="per_layer"))
    with pytest.raises(ConfigError, match="pkt.ln_eps"):
        pipeline.plan(_config(ln_eps=0.0))


def test_default_is_unchanged_tf1_formula_per_active_layer():
    """Default: mean over the stage's active layers (1 in PKT), LN eps 1e-12."""
    _, _, stages = pipeline.plan(_config())
    for spec in stages[1].losses.values():
        assert spec["ln_eps"] == 1e-12 and spec["layer_normalizer"] is None
