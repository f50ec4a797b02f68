"""Teachers without an MLM head (all-MiniLM-L6-v2 is a bare BertModel): loading one as a pre-training teacher, the
'teacher_head' stage that trains its MLM/NSP heads on the frozen encoder, and the pipeline teacher_head -> PKT -> PD.

Checkpoints are tiny and written here: our `convert.save_hf` of an Encoder ('bert.'-prefixed names), the same file
with the prefix stripped (the layout transformers' `BertModel.save_pretrained` writes), and a real
`transformers.BertModel` directory for the pipeline run.
"""

import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from _limits import SUBPROCESS_TIMEOUT
from flax import nnx
from safetensors.numpy import load_file, save_file

from mobiledistill import config as config_lib
from mobiledistill import convert, perf, steps
from mobiledistill.models import Encoder, PreTrainingModel, preset
from mobiledistill.strategies import build_stages
from mobiledistill.strategies import mobilebert as mb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            embedding_size=32, intra_bottleneck_size=32, max_position_embeddings=64)


def flat(tree) -> dict[str, np.ndarray]:
    """'/'-joined path -> array of an nnx.State or a plain nested dict."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    out = {}
    for path, v in leaves:
        keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        out["/".join(k for k in keys if k != "value")] = np.asarray(v)
    return out


def bits_equal(a, b) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def headless(directory, prefix="bert.", seed=1, **fields):
    """A tiny BERT checkpoint without MLM/NSP heads; `prefix=''` strips 'bert.' as BertModel.save_pretrained does.
    Returns the Encoder whose parameters it holds."""
    encoder = Encoder(preset("test_bert", **{**TINY, **fields}), nnx.Rngs(seed))
    convert.save_hf(encoder, str(directory))
    if prefix != "bert.":
        path = os.path.join(directory, "model.safetensors")
        sd = load_file(path)
        save_file({prefix + k[len("bert."):]: v for k, v in sd.items()}, path, metadata={"format": "pt"})
    return encoder


@pytest.mark.parametrize("prefix", ["bert.", ""])
def test_headless_checkpoint_loads_as_pretraining_teacher_with_new_heads(tmp_path, prefix):
    encoder = headless(tmp_path, prefix)
    model, fresh = convert.load_hf_pretraining(str(tmp_path), seed=5)
    assert isinstance(model, PreTrainingModel) and fresh == ("mlm", "nsp")
    want = flat(nnx.state(encoder, nnx.Param))
    got = flat(nnx.state(model.encoder, nnx.Param))
    assert sorted(got) == sorted(want) and all(bits_equal(got[k], want[k]) for k in want)
    # the new heads are the seed's initialisation, not zeros or another model's
    init = flat(nnx.state(PreTrainingModel(model.encoder.cfg, nnx.Rngs(5)), nnx.Param))
    heads = {k: v for k, v in flat(nnx.state(model, nnx.Param)).items() if k.startswith(("mlm/", "nsp/"))}
    assert heads and all(bits_equal(v, init[k]) for k, v in heads.items())
    assert np.abs(heads["mlm/transform/kernel"]).max() > 0
    with pytest.warns(UserWarning, match=r"has no MLM / NSP head: freshly initialised"):
        assert isinstance(convert.load_hf(str(tmp_path), pretraining=True), PreTrainingModel)


def test_checkpoint_with_heads_still_loads_them_exactly(tmp_path):
    cfg = preset("test_bert", **TINY)
    original = PreTrainingModel(cfg, nnx.Rngs(3))
    convert.save_hf(original, str(tmp_path / "full"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "freshly initialised" warning for a checkpoint with heads
        loaded = convert.load_hf(str(tmp_path / "full"), pretraining=True)
    model, fresh = convert.load_hf_pretraining(str(tmp_path / "full"), seed=99)
    assert fresh == ()
    want = flat(nnx.state(original, nnx.Param))
    for got in (flat(nnx.state(loaded, nnx.Param)), flat(nnx.state(model, nnx.Param))):
        assert sorted(got) == sorted(want) and all(bits_equal(got[k], want[k]) for k in want)
    assert mb.hf_checkpoint_heads(str(tmp_path / "full")) == ("mlm", "nsp")
    # an MLM head without NSP (BertForMaskedLM): MLM loaded exactly, only NSP new
    sd = load_file(str(tmp_path / "full" / "model.safetensors"))
    os.makedirs(tmp_path / "mlm_only")
    save_file({k: v for k, v in sd.items() if not k.startswith("cls.seq_relationship.")},
              str(tmp_path / "mlm_only" / "model.safetensors"))
    (tmp_path / "mlm_only" / "config.json").write_text((tmp_path / "full" / "config.json").read_text())
    model, fresh = convert.load_hf_pretraining(str(tmp_path / "mlm_only"))
    assert fresh == ("nsp",)
    got = flat(nnx.state(model, nnx.Param))
    assert all(bits_equal(got[k], want[k]) for k in want if not k.startswith("nsp/"))
    # a head present only in part is refused, naming the missing tensor
    os.makedirs(tmp_path / "partial")
    save_file({k: v for k, v in sd.items() if k != "cls.predictions.bias"},
              str(tmp_path / "partial" / "model.safetensors"))
    (tmp_path / "partial" / "config.json").write_text((tmp_path / "full" / "config.json").read_text())
    with pytest.raises(convert.ConversionError, match=r"missing \['cls.predictions.bias'\]"):
        convert.load_hf_pretraining(str(tmp_path / "partial"))


def pipeline_config(directory, **teacher):
    c = config_lib.pretraining_config()
    c.teacher.update({"source": f"hf:{directory}", **teacher})
    c.student.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, embedding_size=16,
                     intra_bottleneck_size=16, intermediate_size=32, max_position_embeddings=64)
    c.data.update(vocab=os.path.join(str(directory), "vocab.txt"), max_seq_length=16)
    c.pkt.steps_per_layer = 7
    c.pd.steps = 5
    return c


def test_plan_has_the_head_stage_only_where_needed_and_distills_from_it(tmp_path):
    headless(tmp_path / "bare")
    convert.save_hf(PreTrainingModel(preset("test_bert", **TINY), nnx.Rngs(0)), str(tmp_path / "full"))
    c = pipeline_config(tmp_path / "bare")
    teacher, student = config_lib.model_config(c.teacher, c.dtype), config_lib.model_config(c.student, c.dtype)
    assert teacher.hidden_size == 32 and teacher.num_hidden_layers == 2  # the architecture of its config.json
    config_lib.validate(c, teacher, student, 1)
    stages = build_stages(c, teacher, student)
    assert [s.name for s in stages] == ["teacher_head", "pkt_00", "pkt_01", "pd"]
    head = stages[0]
    assert (head.trains, head.init, head.init_from, head.teacher_from, head.eval, head.steps) == (
        "teacher", "checkpoint", f"hf:{tmp_path / 'bare'}", None, "mlm", 7)  # automatic: pkt.steps_per_layer
    assert set(head.losses) == {"mlm", "nsp"} and head.optimizer.default_lr_scale == 0.0
    # its FLOPs: the frozen encoder runs forward only, the heads forward and backward
    from mobiledistill.models import forward_flops
    full = forward_flops(teacher, 16, mlm_positions=5, nsp=True, pooler=True)
    enc = forward_flops(teacher, 16, pooler=True)
    assert perf.stage_flops(head, teacher, None, 16, 5) == (enc + 3.0 * (full - enc), 0.0)
    assert perf.heads_only(head) and not any(perf.heads_only(s) for s in stages[1:])
    assert all(s.teacher_from == "teacher_head" for s in stages[1:])
    # explicit steps and lr
    c.teacher.update(adapt_head_steps=11, adapt_head_lr=3e-3)
    head = build_stages(c, teacher, student)[0]
    assert head.steps == 11 and head.optimizer.learning_rate == 3e-3
    # a checkpoint with heads: no stage unless asked for
    c = pipeline_config(tmp_path / "full")
    stages = build_stages(c, teacher, student)
    assert stages[0].name == "pkt_00" and stages[0].teacher_from == f"hf:{tmp_path / 'full'}"
    c.teacher.adapt_head_steps = 3
    assert [s.name for s in build_stages(c, teacher, student)][:2] == ["teacher_head", "pkt_00"]
    # one-line errors
    for fields, match in [
        (dict(adapt_head_steps=-1), r"teacher.adapt_head_steps=-1 must be >= 0"),
        (dict(adapt_head_lr=0.0), r"teacher.adapt_head_lr=0.0 must be > 0"),
        (dict(source="pretrain", adapt_head_steps=5), r"teacher.adapt_head_steps=5 needs teacher.source='hf:<dir>'"),
    ]:
        bad = pipeline_config(tmp_path / "full", **fields)
        with pytest.raises(config_lib.ConfigError, match=match) as e:
            config_lib.validate(bad, teacher, student.replace(vocab_size=teacher.vocab_size), 1)
        assert "\n" not in str(e.value)
    bad = pipeline_config(tmp_path / "full")
    bad.data.vocab = "train"
    with pytest.raises(config_lib.ConfigError, match=r"set data.vocab=.*full/vocab.txt"):
        config_lib.validate(bad, teacher, student, 1)
    with pytest.raises(config_lib.ConfigError, match=r"cannot read .*none/config.json"):
        config_lib.model_config(pipeline_config(tmp_path / "none").teacher, "float32")
    assert mb.hf_checkpoint_heads(str(tmp_path / "none")) is None  # no file: no automatic stage, loading says why
    os.makedirs(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(config_lib.ConfigError, match=r"cannot read .*corrupt/model.safetensors"):
        mb.hf_checkpoint_heads(str(tmp_path / "corrupt"))


def fixed_batch(vocab_size, batch=8, seq=16, predictions=4, seed=0):
    r = np.random.default_rng(seed)
    ids = r.integers(5, vocab_size, (batch, seq)).astype(np.int32)
    mask = np.ones((batch, seq), np.int32)
    mask[1::2, seq - 4:] = 0
    ids *= mask
    positions = np.stack([np.sort(r.choice(np.arange(1, seq - 5), predictions, replace=False)) for _ in range(batch)])
    return dict(input_ids=ids, token_type_ids=np.zeros_like(ids), attention_mask=mask,
                masked_lm_positions=positions.astype(np.int32),
                masked_lm_ids=r.integers(5, vocab_size // 4, (batch, predictions)).astype(np.int32),
                masked_lm_weights=np.ones((batch, predictions), np.float32),
                next_sentence_labels=r.integers(0, 2, (batch,)).astype(np.int32))


@pytest.mark.slow
def test_head_adaptation_stage_leaves_the_encoder_bit_identical_and_trains_the_head(tmp_path):
    headless(tmp_path)
    c = pipeline_config(tmp_path, adapt_head_steps=30, adapt_head_lr=3e-2)
    teacher_cfg = config_lib.model_config(c.teacher, c.dtype)
    stage = mb.teacher_head_adaptation(c)[0]
    model, fresh = convert.load_hf_pretraining(str(tmp_path))
    assert fresh == ("mlm", "nsp")
    graphdef, params = nnx.split(model)
    before = flat(params)
    tx, step = steps.make_train_step(stage, graphdef, params)
    opt_state = tx.init(params)
    step = jax.jit(step)
    batch = {k: jnp.asarray(v) for k, v in fixed_batch(teacher_cfg.vocab_size).items()}
    losses = []
    for i in range(stage.steps):
        params, opt_state, metrics = step(params, opt_state, None, batch, jax.random.key(i))
        losses.append(float(metrics["mlm"]))
    after = flat(params)
    encoder = [k for k in before if k.startswith("encoder/")]
    heads = [k for k in before if k.startswith(("mlm/", "nsp/"))]
    assert encoder and len(encoder) + len(heads) == len(before)
    assert all(bits_equal(before[k], after[k]) for k in encoder)  # every encoder leaf, pooler included
    assert all(not np.array_equal(before[k], after[k]) for k in heads)
    assert losses[-1] < 0.8 * losses[0], losses
    eval_step = jax.jit(steps.make_eval_step(stage, graphdef))
    m = eval_step(params, None, batch)
    assert float(m["mlm_correct"]) > float(eval_step(nnx.state(model, nnx.Param), None, batch)["mlm_correct"])


# ------------------------------------------------------------------------------------------------------------------
# The pipeline, as users run it


def run_main(args, workdir, **env):
    e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    e.pop("MOBILEDISTILL_FAULT", None)
    e.update(env)
    return subprocess.run([sys.executable, "-m", "mobiledistill.main", *args, f"--workdir={workdir}"], cwd=REPO,
                          env=e, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)


def final_params(workdir, stage, step):
    manager = ocp.CheckpointManager(os.path.join(workdir, stage, "checkpoints"),
                                    item_names=("params", "opt_state", "data"))
    params = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore())).params
    manager.close()
    return flat(params)


@pytest.mark.slow
def test_pipeline_from_a_headless_hf_teacher_resumes_and_skips_finished_stages(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from mobiledistill.data import embedded_corpus, train_wordpiece
    hf_dir = tmp_path / "hf"
    tok = train_wordpiece(embedded_corpus().texts(max_chars=200_000), vocab_size=512)
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(
        vocab_size=tok.vocab_size, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, intermediate_size=96,
        max_position_embeddings=128)).save_pretrained(str(hf_dir))
    (hf_dir / "vocab.txt").write_text(tok.vocab_text())
    assert "bert.embeddings.word_embeddings.weight" not in load_file(str(hf_dir / "model.safetensors"))
    args = ["--config=configs/progressive.py:local", f"--config.teacher.source=hf:{hf_dir}",
            f"--config.data.vocab={hf_dir}/vocab.txt", "--config.student.num_hidden_layers=2",
            "--config.student.hidden_size=48", "--config.student.embedding_size=48",
            "--config.teacher.adapt_head_steps=6", "--config.teacher.adapt_head_lr=1e-2",
            "--config.pkt.steps_per_layer=3", "--config.pkt.warmup_steps=1",
            "--config.pd.steps=6", "--config.pd.warmup_steps=1", "--config.train.global_batch=8",
            "--config.data.max_seq_length=32", "--config.data.max_predictions_per_seq=5",
            "--config.train.checkpoint_every=2", "--config.train.log_every=2", "--config.train.eval_batches=2",
            "--config.scratch_baseline=False"]
    workdir = tmp_path / "work"
    dry = subprocess.run([sys.executable, "-m", "mobiledistill.main", *args, "--dry_run"], cwd=REPO,
                         env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO), capture_output=True, text=True,
                         timeout=SUBPROCESS_TIMEOUT)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert [line.split()[0] for line in dry.stdout.splitlines() if line[:4] in ("teac", "pkt_", "pd  ")
            and len(line.split()) > 3 and line.split()[1].isdigit()] == ["teacher_head", "pkt_00", "pkt_01", "pd"]

    first = run_main(args, workdir, MOBILEDISTILL_FAULT="kill:pd:4")
    assert first.returncode == -9, first.stderr[-3000:]
    new_heads = [line for line in first.stdout.splitlines() if "freshly initialised" in line]
    assert new_heads == [f"teacher hf:{hf_dir}: encoder from the checkpoint; it has no MLM / NSP head: freshly "
                         f"initialised (seed 0)"], first.stdout[-3000:]
    assert "[1/4 teacher_head] starting: 6 steps, trains teacher, losses ['mlm', 'nsp']" in first.stdout

    second = run_main(args, workdir)
    assert second.returncode == 0, second.stderr[-3000:]
    out = second.stdout
    for i, name in enumerate(["teacher_head", "pkt_00", "pkt_01"]):
        assert f"[{i + 1}/4 {name}] finished earlier: skipped" in out, out[-3000:]
    assert "[4/4 pd] resuming at step 4" in out and "freshly initialised" not in out

    summary = json.loads((workdir / "summary.json").read_text())
    assert 0.0 <= summary["teacher_head"]["eval_mlm_accuracy"] <= 1.0 and "eval_mlm_nll" in summary["teacher_head"]
    # the adapted teacher: the checkpoint's encoder bit for bit, new trained heads
    adapted = final_params(workdir, "teacher_head", 6)
    ours = flat(nnx.state(convert.load_hf(str(hf_dir)), nnx.Param))
    assert all(bits_equal(adapted["encoder/" + k], v) for k, v in ours.items())
    initial = flat(nnx.state(convert.load_hf_pretraining(str(hf_dir), seed=0)[0], nnx.Param))
    assert not np.array_equal(adapted["mlm/bias"], initial["mlm/bias"])
    # the PKT stages read the adapted teacher: its MLM/NSP heads were copied into the student (equal widths)
    student = final_params(workdir, "pkt_00", 3)
    for k in ("mlm/bias", "mlm/transform/kernel", "nsp/kernel"):
        assert bits_equal(student[k], adapted[k]), k
