"""Distillation engine acceptance (SPEC §3-§5): strategies -> stages -> jitted train steps on tiny models.

- A real-text run (embedded corpus, trained WordPiece vocab): IB-BERT-shaped teacher pre-trained on MLM+NSP with its
  stage -> progressive transfer over all student layers -> pre-training distillation, all from `build_stages`.
- Progressive stage k: only layers <= k move (k at 1x, lower ones at the configured scale, 0 = bit-identical),
  embeddings/heads/upper layers are bit-identical, and the compiled step's FLOPs grow linearly with k (upper layers
  are not run).
- Joint and auxiliary stages, per-micro-batch dropout keys, teacher -> student init copy, one-line config errors.

Compilation dominates on CPU, so compiled steps are shared through one module fixture.
"""

import re

import jax
import ml_collections
import numpy as np
import pytest
from _data_helpers import corpus
from flax import nnx

from mobiledistill import steps
from mobiledistill.data import InMemoryCorpus, PretrainingConfig, PretrainingIterator, train_wordpiece
from mobiledistill.models import PreTrainingModel, preset
from mobiledistill.optim import param_paths
from mobiledistill.strategies import build_stages, copy_from_teacher, layer_map
from mobiledistill.strategies import mobilebert as mb

LAYERS = 3  # student and teacher depth of the real-text run
# The tiny teacher learns faster without dropout: in a few hundred steps it gets past the unigram distribution.
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def make_config(strategy="progressive", **sections):
    """A small pipeline config with the fields the strategies read; `sections` update e.g. pkt=dict(...)."""
    c = ml_collections.ConfigDict()
    c.strategy = strategy
    c.scratch_baseline = False
    c.teacher = ml_collections.ConfigDict(
        dict(source="pretrain", steps=500, lr=1e-2, warmup_steps=10, end_lr_ratio=1.0, bias_correction=True)
    )
    c.pkt = ml_collections.ConfigDict(
        dict(
            steps_per_layer=40,
            lr=5e-3,
            warmup_steps=1,  # the first update of a stage has lr 0 (as in the official warm-up)
            lower_layer_scale=0.1,
            weights=dict(fmt=100.0, at=1.0, beta=5000.0, gamma=5.0),
            mask_padding=True,
            official_stats_bug=False,
            bias_correction=True,
        )
    )
    c.pd = ml_collections.ConfigDict(
        dict(steps=100, lr=5e-3, warmup_steps=5, end_lr_ratio=1e-4, alpha=0.5, temperature=1.0, bias_correction=True)
    )
    for name, fields in sections.items():
        c[name].update(fields)
    return c


def synthetic_batch(seed, vocab_size, batch=4, seq=16, predictions=4, padding=True):
    """A random MLM+NSP batch: [CLS]..[SEP] ids, two segments, padded tails, some zero prediction weights."""
    r = np.random.default_rng(seed)
    lengths = r.integers(seq // 2, seq + 1, batch) if padding else np.full(batch, seq)
    lengths[0] = seq
    mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
    ids = r.integers(5, vocab_size, (batch, seq)).astype(np.int32)
    ids[:, 0] = 2
    ids[np.arange(batch), lengths - 1] = 3
    ids *= mask
    types = ((np.arange(seq)[None] >= lengths[:, None] // 2) * mask).astype(np.int32)
    positions = np.stack([np.sort(r.choice(np.arange(1, n - 1), predictions, replace=False)) for n in lengths])
    weights = np.ones((batch, predictions), np.float32)
    if padding:
        weights[1:, -1] = 0.0
        weights[2:, -2:] = 0.0
    return dict(
        input_ids=ids,
        token_type_ids=types,
        attention_mask=mask,
        masked_lm_positions=positions.astype(np.int32),
        masked_lm_ids=np.take_along_axis(ids, positions, 1),
        masked_lm_weights=weights,
        next_sentence_labels=r.integers(0, 2, batch).astype(np.int32),
    )


def split(cfg, seed):
    return nnx.split(PreTrainingModel(cfg, nnx.Rngs(seed)))


def flat(params):
    return dict(zip(param_paths(params), (np.asarray(x) for x in jax.tree.leaves(params))))


def same_bits(a, b):
    return a.shape == b.shape and a.tobytes() == b.tobytes()


# Compilation dominates these tests on CPU: without LLVM optimisation it is ~35% faster and a step ~30% slower. HLO
# passes still run, so the compiled program and its FLOP count are the same.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def compile_step(stage, graphdef, params, teacher, batch, accumulation_steps=1, options=FAST_COMPILE):
    """(compiled step, fresh optimizer state, XLA FLOPs of the step)."""
    teacher_graphdef, teacher_params = teacher
    tx, step = steps.make_train_step(stage, graphdef, params, teacher_graphdef, accumulation_steps)
    opt_state = tx.init(params)
    lowered = jax.jit(step).lower(params, opt_state, teacher_params, batch, jax.random.key(0))
    compiled = lowered.compile(compiler_options=options)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return compiled, opt_state, float(cost["flops"])


def first_group(path):
    """'encoder/layers/3/...' -> 'layer 3'; anything else -> its first two path components."""
    m = re.match(r"encoder/layers/(\d+)/", path)
    return f"layer {m.group(1)}" if m else "/".join(path.split("/")[:2])


@pytest.fixture(scope="module")
def real_text_run():
    """Runs teacher pre-training -> PKT over all layers -> PD on real text; returns what the tests check."""
    docs = [d for d in corpus().documents if len(d) > 400][:300]
    tokenizer = train_wordpiece(docs, vocab_size=500)
    data_cfg = PretrainingConfig(max_seq_length=32, max_predictions_per_seq=5)
    train = PretrainingIterator(InMemoryCorpus("docs", docs[30:]), tokenizer, global_batch_size=16, config=data_cfg)
    heldout = next(
        PretrainingIterator(
            InMemoryCorpus("heldout", docs[:30]), tokenizer, global_batch_size=64, config=data_cfg, seed=1
        )
    )
    teacher_cfg = preset("test_ib_bert", num_hidden_layers=LAYERS, vocab_size=tokenizer.vocab_size, **NO_DROPOUT)
    student_cfg = preset("test_mobilebert", num_hidden_layers=LAYERS, vocab_size=tokenizer.vocab_size)
    c = make_config()
    stages = build_stages(c, teacher_cfg, student_cfg)
    teacher_graphdef = split(teacher_cfg, 0)[0]
    student_graphdef = split(student_cfg, 1)[0]
    out = dict(
        c=c,
        stages=stages,
        teacher_cfg=teacher_cfg,
        student_cfg=student_cfg,
        final={},
        metrics={},
        flops={},
        start={},
        batches={},
        teacher_graphdef=teacher_graphdef,
        student_graphdef=student_graphdef,
        heldout=heldout,
    )
    for stage in stages:
        model_cfg = teacher_cfg if stage.trains == "teacher" else student_cfg
        graphdef, params = split(model_cfg, 0 if stage.trains == "teacher" else 1)
        teacher = (teacher_graphdef, out["final"][stage.teacher_from]) if stage.teacher_from else (None, None)
        if stage.init == "previous":
            params = out["final"][stage.init_from]
        elif stage.init == "teacher_copy":
            params = copy_from_teacher(params, teacher[1])
        batches = [next(train) for _ in range(stage.steps)]
        options = {} if stage.steps > 200 else FAST_COMPILE  # the teacher's 500 steps: optimised code pays off
        compiled, opt_state, out["flops"][stage.name] = compile_step(
            stage, graphdef, params, teacher, batches[0], options=options
        )
        out["start"][stage.name], out["batches"][stage.name] = params, batches[:2]
        history = []
        for i, batch in enumerate(batches):
            params, opt_state, m = compiled(params, opt_state, teacher[1], batch, jax.random.key(i))
            history.append({k: float(v) for k, v in m.items()})
            if i == 1:
                out.setdefault("after_two_steps", {})[stage.name] = params
        out["final"][stage.name], out["metrics"][stage.name] = params, history
    pd = stages[-1]
    evaluate = jax.jit(steps.make_eval_step(pd, student_graphdef, teacher_graphdef))
    evaluate = evaluate.lower(out["final"]["pd"], out["final"]["teacher"], heldout).compile(FAST_COMPILE)
    out["pd_eval"] = [
        {k: float(v) for k, v in evaluate(out["final"][name], out["final"]["teacher"], heldout).items()}
        for name in (pd.init_from, "pd")
    ]
    return out


def _summary(history, key, head=3, tail=5):
    return np.mean([m[key] for m in history[:head]]), np.mean([m[key] for m in history[-tail:]])


@pytest.mark.slow
def test_real_text_pipeline_teacher_then_progressive_then_pd(real_text_run):
    run = real_text_run
    names = [s.name for s in run["stages"]]
    assert names == ["teacher", "pkt_00", "pkt_01", "pkt_02", "pd"]
    for history in run["metrics"].values():
        assert all(np.isfinite(v) for m in history for v in m.values())
    start, end = _summary(run["metrics"]["teacher"], "mlm")
    assert end < start - 0.4, (start, end)  # ~6.2 -> ~5.4 (log 500 = 6.2)
    for name in names[1:-1]:  # layer k's transfer loss, from the start of its stage
        assert set(run["metrics"][name][0]) == {"fmt", "at", "beta", "gamma", "loss", "grad_norm"}
        start, end = _summary(run["metrics"][name], "loss")
        assert end < 0.9 * start, (name, start, end)
        # 100 x FMT falls fast (to 0.38-0.47 of its start in 40 steps); 5 x gamma (variances: LayerNorm teacher vs
        # NoNorm student) needs far more steps
        start, end = _summary(run["metrics"][name], "fmt")
        assert end < 0.6 * start, (name, start, end)
    # PD lowers the MLM distillation loss on held-out text (fixed batch: no batch-to-batch noise).
    before, after = run["pd_eval"]
    assert after["mlm_distill"] < before["mlm_distill"] - 0.03, (before, after)
    start, end = _summary(run["metrics"]["pd"], "mlm_distill")
    assert end < start, (start, end)


def _relative_change(before, after, path):
    return np.linalg.norm(after[path] - before[path]) / np.linalg.norm(before[path])


@pytest.mark.slow
def test_progressive_stage_moves_only_layers_up_to_k_at_their_scales(real_text_run):
    """Two steps of each PKT stage (the first has lr 0: one-step warm-up): embeddings, heads and layers above k are
    bit-identical; under LAMB each kernel moves by exactly lr x its scale relative to its norm (trust ratio), so
    layer k moves by lr and the lower layers by 0.1 lr."""
    run = real_text_run
    lr, lower_scale = run["c"].pkt.lr, run["c"].pkt.lower_layer_scale
    for stage in run["stages"][1:-1]:
        k = stage.num_layers - 1
        assert (stage.num_layers, stage.teacher_num_layers) == (k + 1, k + 1)
        before, after = flat(run["start"][stage.name]), flat(run["after_two_steps"][stage.name])
        for path in before:
            group = first_group(path)
            layer = int(group.split()[1]) if group.startswith("layer ") else None
            if layer is None or layer > k:
                assert same_bits(before[path], after[path]), (stage.name, path)
            elif path.endswith("/kernel"):
                want = lr * (1.0 if layer == k else lower_scale)
                assert _relative_change(before, after, path) == pytest.approx(want, rel=0.01), (stage.name, path)


@pytest.mark.slow
def test_progressive_step_flops_grow_with_k(real_text_run):
    flops = [real_text_run["flops"][f"pkt_{k:02d}"] for k in range(LAYERS)]
    increments = np.diff(flops)
    assert np.all(increments > 0), flops
    # linear in the number of executed layers: each extra layer adds the same work (upper layers are not run)
    assert np.max(increments) < 1.05 * np.min(increments), flops
    assert flops[0] < 0.4 * flops[-1], flops


@pytest.mark.slow
def test_lower_layer_scale_zero_is_a_hard_freeze(real_text_run):
    """Stage pkt_01 again from the same start on the same batches, with lower_layer_scale=0."""
    run = real_text_run
    start, batches = run["start"]["pkt_01"], run["batches"]["pkt_01"]
    teacher = (run["teacher_graphdef"], run["final"]["teacher"])
    c = make_config(pkt=dict(lower_layer_scale=0.0))
    stage = mb.progressive(c, run["teacher_cfg"], run["student_cfg"])[1]
    compiled, opt_state, flops = compile_step(stage, run["student_graphdef"], start, teacher, batches[0])
    params = start
    for i, batch in enumerate(batches):
        params, opt_state, _ = compiled(params, opt_state, teacher[1], batch, jax.random.key(i))
    before, after = flat(start), flat(params)
    for path in before:
        if path.startswith("encoder/layers/1/"):
            if path.endswith("/kernel"):
                assert _relative_change(before, after, path) == pytest.approx(c.pkt.lr, rel=0.01), path
        else:
            assert same_bits(before[path], after[path]), path
    # nothing below layer 1 trains, so XLA drops the backward pass through layer 0
    assert flops < 0.9 * run["flops"]["pkt_01"], (flops, run["flops"]["pkt_01"])


def _tiny_models(layers=1):
    teacher_cfg = preset("test_ib_bert", num_hidden_layers=layers)
    student_cfg = preset("test_mobilebert", num_hidden_layers=layers)
    return teacher_cfg, student_cfg


def _run_stage(stage, student_cfg, teacher_cfg, batches, num_steps, accumulation_steps=1):
    teacher = split(teacher_cfg, 0)
    graphdef, params = split(student_cfg, 1)
    params = copy_from_teacher(params, teacher[1])
    compiled, opt_state, _ = compile_step(stage, graphdef, params, teacher, batches[0], accumulation_steps)
    history, start = [], params
    for i in range(num_steps):
        params, opt_state, m = compiled(params, opt_state, teacher[1], batches[i % len(batches)], jax.random.key(i))
        history.append({k: float(v) for k, v in m.items()})
    return start, params, history


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["joint", "auxiliary"])
def test_joint_and_auxiliary_stages_run_and_learn(strategy):
    """Random teacher, synthetic batches with padding and some zero MLM weights."""
    teacher_cfg, student_cfg = _tiny_models()
    c = make_config(strategy, pkt=dict(steps_per_layer=12, warmup_steps=0), pd=dict(steps=12, warmup_steps=0))
    stages = build_stages(c, teacher_cfg, student_cfg)
    expected = {"joint": ["teacher", "jkt", "pd"], "auxiliary": ["teacher", "akt"]}[strategy]
    assert [s.name for s in stages] == expected
    stage = stages[1]
    assert stage.steps == 12 and stage.init == "teacher_copy" and stage.num_layers is None
    joint = strategy == "joint"
    batches = [synthetic_batch(s, student_cfg.vocab_size) for s in range(2)]
    start, end, history = _run_stage(stage, student_cfg, teacher_cfg, batches, stage.steps)
    terms = {"fmt", "at", "beta", "gamma"} | (set() if joint else {"mlm_distill", "nsp"})
    assert set(history[0]) == terms | {"loss", "grad_norm"}
    assert all(np.isfinite(v) for m in history for v in m.values())
    first, last = _summary(history, "loss", head=2, tail=2)
    assert last < 0.9 * first, (first, last)
    before, after = flat(start), flat(end)
    moved = {}
    for path in before:
        moved.setdefault(first_group(path), []).append(not same_bits(before[path], after[path]))
    for group, changed in moved.items():
        if joint and not group.startswith("layer "):  # embeddings and heads stay the teacher's
            assert not any(changed), group
        else:
            assert any(changed), group


@pytest.mark.slow
def test_micro_batches_get_their_own_dropout_keys():
    """Teacher pre-training (dropout on) with 2 micro-batches holding the same sequence: with one shared key both
    would see the same dropout masks and the step would equal a 1-sequence step under that key."""
    teacher_cfg, student_cfg = _tiny_models()
    stage = build_stages(make_config("teacher", teacher=dict(warmup_steps=0)), teacher_cfg, student_cfg)[0]
    assert stage.dropout and teacher_cfg.attention_probs_dropout_prob > 0
    one = synthetic_batch(3, teacher_cfg.vocab_size, batch=1)
    two = {k: np.concatenate([v, v]) for k, v in one.items()}
    graphdef, params = split(teacher_cfg, 0)
    losses = []
    for batch, n in ((one, 1), (two, 2)):
        compiled, opt_state, _ = compile_step(stage, graphdef, params, (None, None), batch, accumulation_steps=n)
        losses.append(float(compiled(params, opt_state, None, batch, jax.random.key(5))[2]["loss"]))
    assert np.all(np.isfinite(losses)) and losses[0] != losses[1], losses


def test_transfer_stages_train_only_encoder_layers():
    """A student with a pooler: only encoder layers train in JKT (layers <= k in PKT stage k). A pooler outside the
    transfer loss would otherwise shrink by lr x itself per step under LAMB (zero gradient, trust-ratio weight decay).
    """
    teacher_cfg, student_cfg = _tiny_models(2)
    student_cfg = student_cfg.replace(classifier_activation=True)
    params = nnx.state(nnx.eval_shape(lambda: PreTrainingModel(student_cfg, nnx.Rngs(0))), nnx.Param)
    paths = param_paths(params)
    assert any(p.startswith("encoder/pooler/") for p in paths)
    c = make_config()
    stages = mb.joint(c, teacher_cfg, student_cfg) + mb.progressive(c, teacher_cfg, student_cfg)
    for stage, trains in zip(stages, [r"encoder/layers/[01]/", r"encoder/layers/0/", r"encoder/layers/[01]/"]):
        mask = dict(zip(paths, jax.tree.leaves(steps.trainable_mask(params, stage))))
        assert {p for p, m in mask.items() if m} == {p for p in paths if re.match(trains, p)}, stage.name


def test_teacher_copy_initialises_embeddings_and_heads_only():
    teacher_cfg, student_cfg = _tiny_models()
    _, teacher = split(teacher_cfg, 0)
    _, student = split(student_cfg, 1)
    t, s0 = flat(teacher), flat(student)
    out = flat(copy_from_teacher(student, teacher))
    copied = re.compile(
        r"^(encoder/embeddings/(word|position|token_type)_embeddings|"
        r"encoder/embeddings/embedding_transformation|mlm|nsp)/"
    )
    assert sorted(out) == sorted(s0)
    n = 0
    for path, value in out.items():
        if copied.match(path):
            n += 1
            assert same_bits(value, t[path]), path
        else:  # layers and the embedding norm (LayerNorm -> NoNorm does not map) keep the student's values
            assert same_bits(value, s0[path]), path
    # word, position, type embeddings, transformation kernel+bias, MLM dense kernel+bias, its LayerNorm scale+bias,
    # extra output weights, output bias, NSP kernel+bias: none silently skipped
    assert n == 13
    assert all(same_bits(v, s0[p]) for p, v in flat(student).items())  # the input is not modified


@pytest.mark.parametrize(
    "teacher_fields, match",
    [
        (
            dict(embedding_size=8),
            r"shape mismatch: .*word_embeddings/embedding student \(97, 16\) vs teacher \(97, 8\)",
        ),
        (dict(vocab_size=101), r"shape mismatch: .*word_embeddings"),
        (dict(trigram_input=False, embedding_size=32), r"missing in teacher: .*embedding_transformation"),
    ],
)
def test_teacher_copy_refuses_mismatched_models_in_one_line(teacher_fields, match):
    teacher_cfg, student_cfg = _tiny_models()
    _, teacher = split(teacher_cfg.replace(**teacher_fields), 0)
    _, student = split(student_cfg, 1)
    with pytest.raises(ValueError, match=match) as e:
        copy_from_teacher(student, teacher)
    assert "\n" not in str(e.value) and str(e.value).startswith("cannot initialise the student from the teacher")


@pytest.mark.parametrize(
    "student_fields, match",
    [
        (dict(num_hidden_layers=3), r"student has 3 layers but the teacher only 2"),
        # other widths and head counts are accepted (projections, attention relations: tests/test_cross_width.py)
        (dict(num_attention_heads=4, intra_bottleneck_size=20), r"pkt.relation_heads=3 must divide both attention "
                                                                 r"widths \(teacher 64, student 20\)"),
    ],
)
@pytest.mark.parametrize("strategy", ["progressive", "joint", "auxiliary"])
def test_layer_wise_transfer_refuses_incompatible_students_in_one_line(strategy, student_fields, match):
    teacher_cfg, student_cfg = _tiny_models(2)
    with pytest.raises(ValueError, match=match) as e:
        build_stages(make_config(strategy, pkt=dict(relation_heads=3)), teacher_cfg,
                     student_cfg.replace(**student_fields))
    assert "\n" not in str(e.value)


def test_strategy_config_errors_and_uniform_layer_map():
    teacher_cfg, student_cfg = _tiny_models(2)
    with pytest.raises(ValueError, match=r"strategy='distil'; valid: progressive, joint, auxiliary, teacher"):
        build_stages(make_config("distil"), teacher_cfg, student_cfg)
    with pytest.raises(ValueError, match=r"strategy='teacher' needs teacher.source='pretrain'"):
        build_stages(make_config("teacher", teacher=dict(source="hf:/x")), teacher_cfg, student_cfg)
    # a shallower student maps uniformly onto the teacher; stages run the teacher only as deep as needed
    deep = teacher_cfg.replace(num_hidden_layers=4)
    assert layer_map(deep, student_cfg) == [(1, 0), (3, 1)]
    stages = mb.progressive(make_config(teacher=dict(source="hf:/ckpt")), deep, student_cfg)
    assert [(s.num_layers, s.teacher_num_layers, s.teacher_from) for s in stages] == [
        (1, 2, "hf:/ckpt"),
        (2, 4, "hf:/ckpt"),
    ]
    assert [s.init for s in stages] == ["teacher_copy", "previous"] and stages[1].init_from == "pkt_00"
    assert stages[1].losses["fmt"]["layers"] == [[3, 1]] and stages[1].losses["fmt"]["weight"] == 100.0
    # replicating the official beta/gamma bug needs every teacher hidden state: the teacher then runs in full
    official = mb.progressive(make_config(pkt=dict(official_stats_bug=True)), deep, student_cfg)
    assert [(s.num_layers, s.teacher_num_layers) for s in official] == [(1, None), (2, None)]
    assert official[1].losses["gamma"]["official_stats_bug"] is True
    # PKT: fresh optimizer per stage, constant LR after warm-up, everything but layers <= k frozen
    opt = stages[1].optimizer
    assert opt.schedule == "constant" and opt.default_lr_scale == 0.0 and opt.accumulation_steps == 1
    assert opt.lr_scales == (("^encoder/layers/1/", 1.0), ("^encoder/layers/(0)/", 0.1))
