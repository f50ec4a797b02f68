"""A finished run -> deployable files: a Hugging Face directory, ONNX fp32 and ONNX dynamic int8 (SPEC §13).

    python -m mobiledistill.export --from=RUN --to=OUT --format=hf,onnx --quantize=none|dynamic [--seq_len=L]
        [--verify]

RUN is a finished fine-tuning run (`WORKDIR` = its first finished seed, or `WORKDIR/seed_<s>`; classification,
regression or SQuAD spans) or a finished stage of a pre-training pipeline (`WORKDIR/<stage>`, MLM + NSP heads).
OUT must not exist or be empty; it receives

    hf/                 config.json + model.safetensors + tokenizer (transformers `from_pretrained`)
    tokenizer/          the run's WordPiece tokenizer (tokenizer.json, vocab.txt)
    model.onnx          `torch.onnx.export` of the saved transformers model, one file, dynamic batch and sequence
    model.int8.onnx     onnxruntime `quantize_dynamic` of model.onnx (int8 weights, per-channel; int8 activations
                        with a per-tensor scale computed at run time)
    model_card.md, export.json

Every ONNX file also outputs `last_hidden_state`, so the int8 error can be measured per feature channel: NoNorm
students grow a few channels in the thousands, and a whole-tensor error hides what per-tensor int8 does to the rest.
`--verify` runs each file in its own runtime (transformers, onnxruntime) on random padded token batches and compares
with the JAX model: fp32 files must reach max relative error <= 1e-4 (else exit 1 and OUT is not written); int8 files
report argmax agreement and per-channel error; latency is measured at batch 1 x L.
Exit codes: 0 done, 1 verification failed, 2 bad input (one line on stderr; nothing is written or overwritten).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np

FORMATS = ("hf", "onnx")
QUANTIZE = ("none", "dynamic")
FP32_TOL = 1e-4
# Runtimes each format needs (import name -> pip name); all are in the `export` extra (torch in `test`).
RUNTIMES = {"hf": {"torch": "torch", "transformers": "transformers"},
            "onnx": {"torch": "torch", "transformers": "transformers", "onnx": "onnx", "onnxruntime": "onnxruntime"}}
OUTPUTS = {"classification": ("logits",), "span": ("start_logits", "end_logits"),
           "pretraining": ("prediction_logits", "seq_relationship_logits")}
HIDDEN = "last_hidden_state"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class ExportError(ValueError):
    """Bad input: the run, a flag value, the output directory or a missing runtime package."""


class VerifyError(RuntimeError):
    """A written fp32 file does not compute what the JAX model computes."""


@dataclasses.dataclass
class Source:
    """The model to export (float32), its tokenizer path and labels, and where it came from."""

    kind: str  # 'classification' | 'span' | 'pretraining'
    model: Any
    tokenizer: str
    label_names: list[str] | None
    task: str | None
    description: str


# ---------------------------------------------------------------------------------------------------------------
# Sources

def _finetune_source(path) -> Source:
    from flax import nnx

    from mobiledistill import finetune
    from mobiledistill.data.glue import GLUE_TASKS

    workdir, run_dir = finetune.finished_run_dir(path)
    info = finetune.read_model_json(workdir)
    t = finetune.load_finetuned(run_dir, dtype="float32")
    names = info.get("label_names")  # recorded by newer runs (custom tasks too); older ones: the GLUE table
    task = GLUE_TASKS.get(str(info["task"]).lower().replace("-", "").replace("_", ""))
    if not names and task is not None and task.label_names is not None:
        names = list(task.label_names)
    if names is not None and len(names) != info["num_labels"]:  # e.g. Pea-KD PTP's 4-way labels
        names = None
    kind = "span" if info["kind"] == "span" else "classification"
    return Source(kind, nnx.merge(t.graphdef, t.params), info["tokenizer"], names, info["task"],
                  f"fine-tuned {info['task']} model, {run_dir}")


def _stage_source(stage_dir) -> Source:
    import ml_collections
    from flax import nnx

    from mobiledistill import checkpoint as ckpt
    from mobiledistill import config as config_lib
    from mobiledistill.data import load_tokenizer
    from mobiledistill.finetune import _as_state
    from mobiledistill.models import PreTrainingModel
    from mobiledistill.strategies import build_stages

    workdir = stage_dir.parent
    pc = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    teacher = config_lib.model_config(pc.teacher, "float32")
    student = config_lib.model_config(pc.student, "float32")
    stages = {s.name: s for s in build_stages(pc, teacher, student)}
    if stage_dir.name not in stages:
        raise ExportError(f"--from={stage_dir}: {workdir} has no stage {stage_dir.name!r}; stages: "
                          f"{', '.join(stages)}")
    if ckpt.stage_done(stage_dir) is None:
        raise ExportError(f"--from={stage_dir}: stage {stage_dir.name} has not finished (no done.json)")
    cfg = teacher if stages[stage_dir.name].trains == "teacher" else student
    vocab = str(workdir / "tokenizer") if pc.data.vocab == "train" else pc.data.vocab
    cfg = cfg.replace(vocab_size=load_tokenizer(vocab).vocab_size)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: PreTrainingModel(cfg, nnx.Rngs(0))))
    params = _as_state(abstract, ckpt.restore_final_params(stage_dir, abstract))
    return Source("pretraining", nnx.merge(graphdef, params), vocab, None, None,
                  f"stage {stage_dir.name} ({stages[stage_dir.name].trains}) of pre-training workdir {workdir}")


def load_source(path: str) -> Source:
    """The model of a finished fine-tuning run/seed or pipeline stage directory."""
    from etils import epath

    p = epath.Path(os.path.abspath(path))
    if not p.is_dir():
        raise ExportError(f"--from={path}: no such directory")
    if (p / "model.json").exists() or (p.name.startswith("seed_") and (p.parent / "model.json").exists()):
        return _finetune_source(p)
    if (p.parent / "config.json").exists() and (p.parent / "fingerprint").exists():
        return _stage_source(p)
    if (p / "config.json").exists() and (p / "fingerprint").exists():
        raise ExportError(f"--from={path} is a pipeline workdir: name one of its finished stages, e.g. "
                          f"{os.path.join(path, 'pd')}")
    raise ExportError(f"--from={path}: neither a fine-tuning run (model.json) nor a pipeline stage directory")


# ---------------------------------------------------------------------------------------------------------------
# Writing

def _hf_class(kind: str, cfg):
    import transformers

    from mobiledistill.convert import hf_arch
    arch = "Bert" if hf_arch(cfg) == "bert" else "MobileBert"
    suffix = {"classification": "ForSequenceClassification", "span": "ForQuestionAnswering",
              "pretraining": "ForPreTraining"}[kind]
    return getattr(transformers, arch + suffix)


def load_transformers(src: Source, hf_dir: str):
    """The saved directory as transformers' own eval-mode model (eager attention: traceable, exact)."""
    from transformers.utils import logging
    logging.disable_progress_bar()  # stderr stays free for the one-line error
    logging.set_verbosity_error()
    return _hf_class(src.kind, src.model.encoder.cfg).from_pretrained(hf_dir, attn_implementation="eager").eval()


def write_hf(src: Source, hf_dir: str) -> None:
    from mobiledistill import convert

    convert.save_hf(src.model, hf_dir, label_names=src.label_names)
    write_tokenizer(src, hf_dir)


def write_tokenizer(src: Source, directory: str) -> None:
    """The run's WordPiece as a transformers fast tokenizer (BERT inputs incl. token_type_ids) plus vocab.txt."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from mobiledistill.data import load_tokenizer

    tok = load_tokenizer(src.tokenizer)
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.backend.to_str()), unk_token="[UNK]",
                                   pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_input_names=list(INPUTS[:1] + INPUTS[2:] + INPUTS[1:2]),
                                   model_max_length=src.model.encoder.cfg.max_position_embeddings)
    fast.save_pretrained(directory)
    with open(os.path.join(directory, "vocab.txt"), "w") as f:
        f.write(tok.vocab_text())


def write_onnx(src: Source, hf_dir: str, path: str, seq_len: int) -> None:
    """`torch.onnx.export` (TorchScript exporter: no onnxscript needed) of the transformers model, one file."""
    import onnx
    import torch

    names = OUTPUTS[src.kind]

    class Outputs(torch.nn.Module):
        """The task outputs plus the final hidden state, as a tuple (ONNX needs plain tensors)."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                             output_hidden_states=True)
            return tuple(getattr(out, n) for n in names) + (out.hidden_states[-1],)

    wrapped = Outputs(load_transformers(src, hf_dir))
    example = tuple(torch.tensor(a) for a in random_inputs(src.model.encoder.cfg, 2, seq_len, seed=1))
    per_token = {"start_logits", "end_logits", "prediction_logits", HIDDEN}
    axes = {k: {0: "batch", 1: "sequence"} for k in INPUTS}
    axes.update({n: ({0: "batch", 1: "sequence"} if n in per_token else {0: "batch"}) for n in names + (HIDDEN,)})
    import warnings
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings of the TorchScript exporter
        torch.onnx.export(wrapped, example, path, dynamo=False, input_names=list(INPUTS),
                          output_names=list(names) + [HIDDEN], dynamic_axes=axes, opset_version=17)
    model = onnx.load(path)  # one self-contained file (no .data sidecar): what quant_pre_process accepts
    onnx.save_model(model, path, save_as_external_data=False)


def quantize_onnx(fp32_path: str, int8_path: str, scratch: str) -> None:
    """onnxruntime dynamic int8: shape-inference pre-processing, then int8 per-channel weights."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = os.path.join(scratch, "model.pre.onnx")
    quant_pre_process(fp32_path, pre, skip_symbolic_shape=True)  # the symbolic pass gives up on this graph
    quantize_dynamic(pre, int8_path, weight_type=QuantType.QInt8, per_channel=True)


# ---------------------------------------------------------------------------------------------------------------
# Verification

def random_inputs(cfg, batch: int, seq_len: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int64 (ids, attention mask, token types): two segments; rows after the first are padded to other lengths."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, cfg.vocab_size, (batch, seq_len)).astype(np.int64)
    types = np.broadcast_to((np.arange(seq_len) >= seq_len // 2).astype(np.int64), (batch, seq_len)).copy()
    mask = np.ones((batch, seq_len), np.int64)
    for b in range(1, batch):
        n = max(2, seq_len - 1 - (5 * b) % max(1, seq_len // 2))
        mask[b, n:], ids[b, n:], types[b, n:] = 0, cfg.pad_token_id, 0
    return ids, mask, types


def jax_outputs(src: Source, ids, mask, types) -> dict[str, np.ndarray]:
    """The JAX model's outputs under the ONNX output names."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(src.model)

    @jax.jit
    def forward(state, ids, mask, types):
        out = nnx.merge(graphdef, state)(ids, types, mask)
        return tuple(out[:-1]) + (out[-1].sequence_output,)

    values = forward(state, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), jnp.asarray(types, jnp.int32))
    return {n: np.asarray(v, np.float32) for n, v in zip(OUTPUTS[src.kind] + (HIDDEN,), values)}


def _valid(name: str, value: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Real-token rows of a per-token output ([N, C], or [N] for span logits); others unchanged."""
    return value[mask.astype(bool)] if value.ndim >= 2 and value.shape[:2] == mask.shape else value


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def channel_errors(ours: np.ndarray, ref: np.ndarray) -> dict:
    """Error of each feature channel (last axis) relative to that channel's own range: the number that shows
    int8 rounding ordinary channels away when a few outlier channels set the scale."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    ours, ref = ours.reshape(-1, ref.shape[-1]) if ref.ndim > 1 else ours[:, None], \
        ref.reshape(-1, ref.shape[-1]) if ref.ndim > 1 else ref[:, None]
    scale = np.maximum(np.max(np.abs(ref), axis=0), 1e-30)
    err = np.max(np.abs(ours - ref), axis=0) / scale
    worst = int(np.argmax(err))
    return {"channels": int(err.size), "max": float(err[worst]), "median": float(np.median(err)),
            "over_10pct": int(np.sum(err > 0.1)), "worst_channel": worst, "worst_channel_range": float(scale[worst]),
            "largest_channel_range": float(np.max(scale)), "median_channel_range": float(np.median(scale))}


def agreement(kind: str, name: str, ours: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float | None:
    """Fraction of equal argmax predictions (None for regression, which has no argmax)."""
    if name == HIDDEN or (kind != "span" and ref.shape[-1] == 1):
        return None
    if kind == "span":  # argmax over the real tokens of each row
        neg = np.where(mask.astype(bool), 0.0, -np.inf)
        return float(np.mean(np.argmax(ours + neg, 1) == np.argmax(ref + neg, 1)))
    return float(np.mean(np.argmax(_valid(name, ours, mask), -1) == np.argmax(_valid(name, ref, mask), -1)))


def compare(kind: str, got: dict, ref: dict, mask: np.ndarray) -> dict:
    out = {}
    for name, r in ref.items():
        g, rv = _valid(name, got[name], mask), _valid(name, r, mask)
        out[name] = {"rel_err": rel_err(g, rv), "per_channel": channel_errors(g, rv),
                     "argmax_agreement": agreement(kind, name, got[name], r, mask)}
    return out


def transformers_outputs(src: Source, hf_dir: str, ids, mask, types) -> dict[str, np.ndarray]:
    import torch

    model = load_transformers(src, hf_dir)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types),
                    output_hidden_states=True)
    values = {n: getattr(out, n).numpy() for n in OUTPUTS[src.kind]}
    values[HIDDEN] = out.hidden_states[-1].numpy()
    return values


def _ort_session(path: str):
    import onnxruntime as ort
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def onnx_outputs(session, ids, mask, types) -> dict[str, np.ndarray]:
    values = session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    return {o.name: v for o, v in zip(session.get_outputs(), values)}


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (compilation, allocation)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def latency(src: Source, hf_dir: str, onnx_files: dict[str, str], seq_len: int, repeats: int) -> dict[str, float]:
    """Median ms of one forward at batch 1 x seq_len in each runtime (same machine, same run: compare ratios)."""
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    ids, mask, types = random_inputs(src.model.encoder.cfg, 1, seq_len, seed=2)
    graphdef, state = nnx.split(src.model)
    forward = jax.jit(lambda s, i, m, t: nnx.merge(graphdef, s)(i, t, m)[0])
    j = [jnp.asarray(a, jnp.int32) for a in (ids, mask, types)]
    out = {"jax_jit_fp32": _median_ms(lambda: forward(state, j[0], j[1], j[2]).block_until_ready(), repeats)}
    model = load_transformers(src, hf_dir)
    t = [torch.tensor(a) for a in (ids, mask, types)]
    with torch.no_grad():
        out["pytorch_eager_fp32"] = _median_ms(lambda: model(input_ids=t[0], attention_mask=t[1],
                                                             token_type_ids=t[2]), repeats)
    for label, path in onnx_files.items():
        session = _ort_session(path)
        out[f"onnxruntime_{label}"] = _median_ms(lambda: onnx_outputs(session, ids, mask, types), repeats)
    return out


def machine() -> dict:
    """What the latencies depend on: on a loaded machine PyTorch's spinning threads suffer most."""
    import torch
    return {"cpus": len(os.sched_getaffinity(0)), "load_average_1min": round(os.getloadavg()[0], 2),
            "torch_threads": torch.get_num_threads()}


def verify(src: Source, hf_dir: str, onnx_files: dict[str, str], seq_len: int, hf_written: bool = True,
           batch: int = 8, repeats: int = 10) -> dict:
    """Each written file in its own runtime against the JAX model; raises VerifyError when an fp32 file is off.

    The PyTorch eager latency baseline uses the transformers model even when only ONNX was asked for."""
    ids, mask, types = random_inputs(src.model.encoder.cfg, batch, seq_len)
    ref = jax_outputs(src, ids, mask, types)
    results = {"inputs": f"{batch} random token sequences x {seq_len} (rows 2.. padded), two segments", "files": {}}
    if hf_written:
        results["files"]["hf"] = {"runtime": "transformers (PyTorch eager)", "precision": "fp32", **_summary(
            compare(src.kind, transformers_outputs(src, hf_dir, ids, mask, types), ref, mask))}
    for label, path in onnx_files.items():
        got = onnx_outputs(_ort_session(path), ids, mask, types)
        results["files"][os.path.basename(path)] = {"runtime": "onnxruntime", "precision": label,
                                                    **_summary(compare(src.kind, got, ref, mask))}
    for name, r in results["files"].items():
        if r["precision"] == "fp32" and r["max_rel_err"] > FP32_TOL:
            raise VerifyError(f"{name}: max relative error {r['max_rel_err']:.3g} vs the JAX model exceeds "
                              f"{FP32_TOL:g} (output {r['worst_output']})")
    results["latency_ms_batch1"] = latency(src, hf_dir, onnx_files, seq_len, repeats)
    results["machine"] = machine()
    return results


def _summary(per_output: dict) -> dict:
    worst = max(per_output, key=lambda n: per_output[n]["rel_err"])
    return {"max_rel_err": per_output[worst]["rel_err"], "worst_output": worst, "outputs": per_output}


# ---------------------------------------------------------------------------------------------------------------
# Card, CLI

def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def model_card(src: Source, record: dict) -> str:
    cfg = src.model.encoder.cfg
    from mobiledistill.convert import hf_arch
    lines = [f"# {src.task or 'pre-training'} {hf_arch(cfg)} model ({src.kind})", "",
             f"Exported by `python -m mobiledistill.export` from {src.description}.", "",
             f"- architecture: {_hf_class(src.kind, cfg).__name__} ({record['parameters']:,} parameters; "
             f"{len(cfg.plan)} layers{' unrolled from a shared-layer SPS plan' if cfg.layer_plan else ''}, "
             f"hidden {cfg.hidden_size}, intra {cfg.true_hidden_size}, {cfg.normalization_type}, {cfg.hidden_act})",
             f"- labels: {src.label_names or ('2 span logits (start, end)' if src.kind == 'span' else 'n/a')}",
             f"- tokenizer: WordPiece, {record['vocab_size']} tokens (`tokenizer/`, also in `hf/`)",
             f"- ONNX inputs: {', '.join(INPUTS)} (int64 [batch, sequence]); outputs: "
             f"{', '.join(OUTPUTS[src.kind] + (HIDDEN,))}", "", "## Files", "", "| file | format | size |",
             "|---|---|---|"]
    for name, f in record["files"].items():
        lines.append(f"| `{name}` | {f['format']} | {_mb(f['bytes'])} |")
    v = record.get("verify")
    if not v:
        lines += ["", "Not verified (run with `--verify` to compare every file with the JAX model and time it)."]
        return "\n".join(lines) + "\n"
    lines += ["", f"## Verification against the JAX model ({v['inputs']})", "",
              "Errors are max |file - JAX| / max |JAX| over real tokens; per channel, each feature channel of "
              f"`{HIDDEN}` (and of each logit) relative to its own range. fp32 files must be within {FP32_TOL:g}.",
              "", "| file | runtime | precision | max rel. error | argmax agreement | hidden: worst channel err | "
              "hidden: median channel err | hidden: channels > 10% err |", "|---|---|---|---|---|---|---|---|"]
    for name, r in v["files"].items():
        agree = [f"{o}: {100 * x['argmax_agreement']:.1f}%" for o, x in r["outputs"].items()
                 if x["argmax_agreement"] is not None]
        h = r["outputs"][HIDDEN]["per_channel"]
        lines.append(f"| `{name}` | {r['runtime']} | {r['precision']} | {r['max_rel_err']:.3g} ({r['worst_output']}) "
                     f"| {', '.join(agree) or 'n/a (regression)'} | {h['max']:.3g} (ch {h['worst_channel']}) | "
                     f"{h['median']:.3g} | {h['over_10pct']}/{h['channels']} |")
    h = next(iter(v["files"].values()))["outputs"][HIDDEN]["per_channel"]
    lines += ["", f"`{HIDDEN}` channel ranges: largest {h['largest_channel_range']:.3g}, median "
              f"{h['median_channel_range']:.3g} (a ratio in the hundreds is the NoNorm outlier hazard for int8).",
              "", "Accuracy on labelled data is not measured here; agreement is with the fp32 JAX model on random "
              "inputs.", "", f"## Latency, batch 1 x {record['seq_len']} (median, this machine, one run)", ""]
    lat, m = v["latency_ms_batch1"], v["machine"]
    lines += [f"{m['cpus']} CPUs, 1-minute load average {m['load_average_1min']} when done, PyTorch with "
              f"{m['torch_threads']} threads: on a loaded machine the ratios (PyTorch's most) are unreliable.", "",
              "| runtime | ms | speed-up vs PyTorch eager fp32 |", "|---|---|---|"]
    for k, ms in lat.items():
        lines.append(f"| {k} | {ms:.2f} | {lat['pytorch_eager_fp32'] / ms:.2f}x |")
    return "\n".join(lines) + "\n"


def _versions() -> dict:
    out = {}
    for name in ("jax", "flax", "torch", "transformers", "onnx", "onnxruntime"):
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            pass
    return out


def export(src: Source, out_dir: str, formats: list[str], quantize: str, seq_len: int, do_verify: bool,
           repeats: int = 10) -> dict:
    """Writes every requested file into `out_dir` (an empty directory) and returns the export.json record."""
    from mobiledistill.models import count_params

    scratch = tempfile.mkdtemp(prefix="scratch-", dir=out_dir)
    hf_dir = os.path.join(out_dir, "hf") if "hf" in formats else os.path.join(scratch, "hf")
    write_hf(src, hf_dir)
    write_tokenizer(src, os.path.join(out_dir, "tokenizer"))
    files, onnx_files = {}, {}
    if "hf" in formats:
        files["hf/model.safetensors"] = {"format": "Hugging Face safetensors (fp32)"}
    if "onnx" in formats:
        onnx_files["fp32"] = os.path.join(out_dir, "model.onnx")
        write_onnx(src, hf_dir, onnx_files["fp32"], seq_len)
        files["model.onnx"] = {"format": "ONNX opset 17 (fp32)"}
        if quantize == "dynamic":
            onnx_files["int8_dynamic"] = os.path.join(out_dir, "model.int8.onnx")
            quantize_onnx(onnx_files["fp32"], onnx_files["int8_dynamic"], scratch)
            files["model.int8.onnx"] = {"format": "ONNX, onnxruntime dynamic int8 (per-channel weights)"}
    for name, f in files.items():
        f["bytes"] = os.path.getsize(os.path.join(out_dir, name))
    record = {"source": src.description, "kind": src.kind, "task": src.task, "labels": src.label_names,
              "seq_len": seq_len, "formats": formats, "quantize": quantize, "files": files,
              "parameters": count_params(src.model), "vocab_size": src.model.encoder.cfg.vocab_size,
              "hf_config": json.loads(open(os.path.join(hf_dir, "config.json")).read()), "versions": _versions()}
    if do_verify:
        record["verify"] = verify(src, hf_dir, onnx_files, seq_len, "hf" in formats, repeats=repeats)
    shutil.rmtree(scratch)
    with open(os.path.join(out_dir, "model_card.md"), "w") as f:
        f.write(model_card(src, record))
    with open(os.path.join(out_dir, "export.json"), "w") as f:
        json.dump(record, f, indent=2)
    return record


OPTIONS = "--from, --to, --format, --quantize, --seq_len, --verify, --repeats"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage banner first)
        if message.startswith("unrecognized arguments"):
            message += f"; the options are {OPTIONS}"
        raise ExportError(message)


def parse_args(argv):
    p = _Parser(prog="python -m mobiledistill.export", description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="source", required=True, help="finished fine-tuning run/seed or pipeline stage")
    p.add_argument("--to", dest="out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--format", default="hf,onnx", help=f"comma-separated subset of {','.join(FORMATS)}")
    p.add_argument("--quantize", default="none", help=f"one of {'|'.join(QUANTIZE)} (dynamic needs onnx)")
    p.add_argument("--seq_len", type=int, default=None, help="sequence length of the verify/latency inputs "
                   "(default min(128, max_position_embeddings)); the ONNX files accept any length")
    p.add_argument("--verify", action="store_true", help="run every file in its runtime and compare with JAX")
    p.add_argument("--repeats", type=int, default=10, help="timed forward passes per runtime with --verify")
    args = p.parse_args(argv)
    args.formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = [f for f in args.formats if f not in FORMATS]
    if bad or not args.formats:
        raise ExportError(f"--format={args.format}: unknown format {bad[0] if bad else '(empty)'!r}; valid: "
                          f"comma-separated {', '.join(FORMATS)}")
    if args.quantize not in QUANTIZE:
        raise ExportError(f"--quantize={args.quantize}; valid: {', '.join(QUANTIZE)}")
    if args.quantize != "none" and "onnx" not in args.formats:
        raise ExportError(f"--quantize={args.quantize} quantises the ONNX file: add onnx to --format")
    if args.repeats < 1:
        raise ExportError(f"--repeats={args.repeats}; must be >= 1")
    if args.seq_len is not None and args.seq_len < 2:  # the upper bound is the model's, checked once it is loaded
        raise ExportError(f"--seq_len={args.seq_len}; valid: 2..the model's max_position_embeddings (default "
                          f"min(128, max_position_embeddings))")
    return args


def check_runtimes(formats: list[str]) -> None:
    needed = {}
    for f in formats:
        needed.update(RUNTIMES[f])
    for module, package in needed.items():
        try:
            importlib.import_module(module)
        except ImportError:
            raise ExportError(f"--format={','.join(formats)} needs the Python package {package!r}, which is not "
                              f"installed: pip install -e '.[export]'") from None


def check_out_dir(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"--to={out} is an existing file; give a new or empty directory (nothing is overwritten)")
    if os.path.isdir(out) and os.listdir(out):
        raise ExportError(f"--to={out} already holds files; give a new or empty directory (nothing is overwritten)")


def _verified_line(record: dict) -> str:
    """'; verified: fp32 max rel. error E, <int8 file>: argmax agreement A%' for the closing message."""
    if "verify" not in record:
        return ""
    files = record["verify"]["files"]
    parts = [f"; verified: fp32 max rel. error "
             f"{max(r['max_rel_err'] for r in files.values() if r['precision'] == 'fp32'):.2g}"]
    for name, r in files.items():
        agree = [x["argmax_agreement"] for x in r["outputs"].values() if x["argmax_agreement"] is not None]
        if r["precision"] != "fp32" and agree:
            parts.append(f"{name}: argmax agreement {100 * min(agree):.1f}%")
    return ", ".join(parts)


def run(argv=None) -> int:
    """The CLI; returns the exit code."""
    from mobiledistill.checkpoint import CheckpointError
    from mobiledistill.config import ConfigError
    from mobiledistill.convert import ConversionError
    from mobiledistill.data.errors import DataError

    tmp = None
    try:
        args = parse_args(argv)
        out = os.path.abspath(args.out)
        check_out_dir(out)
        check_runtimes(args.formats)
        src = load_source(args.source)
        max_len = src.model.encoder.cfg.max_position_embeddings
        seq_len = args.seq_len if args.seq_len is not None else min(128, max_len)
        if not 2 <= seq_len <= max_len:
            raise ExportError(f"--seq_len={seq_len}; valid: 2..{max_len} (the model's max_position_embeddings)")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=os.path.dirname(out))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # a normal directory once renamed (mkdtemp makes it private)
        record = export(src, tmp, args.formats, args.quantize, seq_len, args.verify, args.repeats)
        check_out_dir(out)  # still new or empty: then the finished directory takes its place
        if os.path.isdir(out):
            os.rmdir(out)
        os.rename(tmp, out)
        tmp = None
        print(f"exported {', '.join(record['files'])} to {out}{_verified_line(record)}")
        return 0
    except (ExportError, CheckpointError, ConfigError, ConversionError, DataError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr, flush=True)
        return 2
    except VerifyError as e:
        print(f"error: verification failed, nothing written: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(run())
