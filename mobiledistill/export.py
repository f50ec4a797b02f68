"""A finished run -> deployable files: Hugging Face, ONNX and LiteRT (TFLite), fp32 and dynamic int8 (SPEC §13).

    python -m mobiledistill.export --from=RUN --to=OUT --format=hf,onnx,tflite [--seq_len=L]
        --quantize=none|dynamic|weight_only|int8
        [--verify] [--equalize | --no-equalize] [--calibration=N] [--onnx_names=short|full]

RUN is a finished fine-tuning run (`WORKDIR` = its first finished seed, or `WORKDIR/seed_<s>`; classification,
regression or SQuAD spans) or a finished stage of a pre-training pipeline (`WORKDIR/<stage>`, MLM + NSP heads).
OUT must not exist or be empty; it receives

    hf/                 config.json + model.safetensors + tokenizer (transformers `from_pretrained`)
    tokenizer/          the run's WordPiece tokenizer (tokenizer.json, vocab.txt)
    model.onnx          `torch.onnx.export` of the saved transformers model, one file, dynamic batch and sequence
    model.int8.onnx     onnxruntime `quantize_dynamic` (int8 weights, per-channel; int8 activations with a
                        per-tensor scale computed at run time) of model.onnx or, for NoNorm models, of the
                        residual-equalised model (below); weight_only: int8 weights, float activations; int8:
                        static QDQ int8 (`export_int8`), activation scales from `quantize_static` calibration on
                        --calibration sequences (equalised where that applies) or a QAT run's ranges (`c.qat`)
    model.tflite        LiteRT fp32: `jax2tf` (native serialisation) of the JAX model -> SavedModel ->
                        TFLiteConverter, builtin ops only (runs in the plain `ai-edge-litert` interpreter); fixed
                        int32 inputs [1, L] (a polymorphic batch does not lower to TFLite builtins), signature
                        `serving_default` (export_tflite)
    model.int8.tflite   dynamic: the converter's dynamic-range int8 (Optimize.DEFAULT: int8 weights, activations
                        quantised at run time); int8: its full-integer int8 (int8 weights per channel and int8
                        activations per tensor, ranges calibrated by the converter on --calibration sequences; int32
                        inputs, float outputs); of the same function of the model or, for NoNorm models, of the
                        equalised model. weight_only has no LiteRT file (the converter offers no weight-only int8)
    model_card.md, export.json

The ONNX files' internal nodes and tensors are renamed to short ids (inputs and outputs keep their names): the
exporter's and the quantiser's names cost as many bytes as a small student's int8 weights. --onnx_names=full keeps
them (for reading the graph).

Every ONNX / LiteRT file also outputs `last_hidden_state`, so the int8 error can be measured per feature channel:
NoNorm students grow a few channels in the thousands, and a whole-tensor error hides what per-tensor int8 does to the
rest. `--verify` runs each file in its own runtime (transformers, onnxruntime, LiteRT row by row) on random padded
token batches and compares with the JAX model: fp32 files must reach max relative error <= 1e-4 (else exit 1 and OUT
is not written); int8 files report argmax agreement and per-channel error; latency is measured at batch 1 x L.

Residual equalisation (`mobiledistill.quantize`, on by default for NoNorm models with --quantize=dynamic; turn it
off with --no-equalize; --equalize on a LayerNorm model is refused): per-tensor int8 activations cannot represent a
residual stream whose few outlier channels are ~1000x the rest, so the int8 file is made from a copy of the model
whose residual stream is h / s, with power-of-two per-channel scales s calibrated on --calibration random [CLS] ...
[SEP] sequences (default 64). The change of basis is exact in float32 (NoNorm is per-channel affine), costs nothing at
run time, and leaves ordinary channels alone (s = 1 unless a channel's range stands out; a model without outliers
gets s = 1 everywhere, the plain int8 file), so it is the default where it applies.
Its task outputs are the model's; its `last_hidden_state` is h / s (s is in export.json, `equalization.scales`;
--verify multiplies it back before comparing, and also reports the plain int8 file's errors for comparison). The
fp32 files (hf/, model.onnx, model.tflite) are always the original model.
Exit codes: 0 done, 1 verification failed, 2 bad input (one line on stderr; nothing is written or overwritten).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile

# The export API in one place: sources, writers and verification live in export_source / export_write /
# export_verify, one job each; this module adds the model card, `export` and the CLI.
from mobiledistill.export_source import ExportError, Source, load_source
from mobiledistill.export_verify import (
    FP32_TOL,
    VerifyError,
    agreement,
    channel_errors,
    compare,
    jax_outputs,
    latency,
    machine,
    onnx_file_errors,
    onnx_outputs,
    rel_err,
    transformers_outputs,
    verify,
    verify_inputs,
)
from mobiledistill.export_write import (
    HIDDEN,
    INPUTS,
    OUTPUTS,
    compact_onnx,
    equalized_int8,
    equalized_model,
    load_transformers,
    mean_pooled,
    quantize_onnx,
    random_inputs,
    write_hf,
    write_onnx,
    write_tokenizer,
)
from mobiledistill import export_int8
from mobiledistill.export_card import model_card
from mobiledistill.quantize import CALIBRATION

MAX_CALIBRATION = 100_000

__all__ = [
    "CALIBRATION", "EXTRA", "FORMATS", "FP32_TOL", "HIDDEN", "INPUTS", "MAX_CALIBRATION", "ONNX_NAMES", "OPTIONS",
    "OUTPUTS", "QUANTIZE", "RUNTIMES", "ExportError", "Source", "VerifyError", "agreement", "channel_errors",
    "check_formats", "check_out_dir", "check_runtimes", "compact_onnx", "compare", "equalized_model", "export",
    "jax_outputs", "latency", "load_source", "load_transformers", "machine", "mean_pooled", "model_card",
    "onnx_file_errors", "onnx_outputs", "parse_args", "quantize_onnx", "random_inputs", "rel_err", "resolve_equalize",
    "run", "transformers_outputs", "verify", "verify_inputs", "write_hf", "write_onnx", "write_tokenizer",
]

FORMATS = ("hf", "onnx", "tflite")
ONNX_NAMES = ("short", "full")
QUANTIZE = ("none", "dynamic", "weight_only", "int8")
# Runtimes each format needs (import name -> pip name); hf/onnx are in the `export` extra, tflite in `tflite` (both in
# `test`). The hf directory is always written (the tokenizer), so every format needs transformers.
RUNTIMES = {"hf": {"torch": "torch", "transformers": "transformers"},
            "onnx": {"torch": "torch", "transformers": "transformers", "onnx": "onnx", "onnxruntime": "onnxruntime"},
            "tflite": {"torch": "torch", "transformers": "transformers", "tensorflow": "tensorflow-cpu",
                       "ai_edge_litert": "ai-edge-litert"}}
EXTRA = {"tensorflow": "tflite", "ai_edge_litert": "tflite"}  # the setup.py extra of a runtime (else `export`)


# ---------------------------------------------------------------------------------------------------------------
# Writing, CLI (the model card: export_card)

def _versions() -> dict:
    out = {}
    for name in ("jax", "flax", "torch", "transformers", "onnx", "onnxruntime"):
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            pass
    return out


def resolve_equalize(cfg, quantize: str, equalize: bool | None, qat: bool = False) -> bool:
    """Whether the int8 file is residual-equalised: None = wherever it applies (NoNorm, int8 activations); True
    insists. Never for weight_only (float activations) nor a QAT run's int8 (its ranges are the trained basis)."""
    from mobiledistill.quantize import EqualizeError, check_equalizable

    if equalize is False:
        return False
    if quantize == "weight_only" or (qat and quantize == "int8"):
        if equalize:
            raise ExportError("--equalize: " + ("--quantize=weight_only keeps the activations float" if not qat else
                              "a QAT run's int8 file uses its trained ranges, in the trained model's basis"))
        return False
    if quantize == "none":
        if equalize:
            raise ExportError("--equalize rescales the int8 file: add --quantize=dynamic (and onnx to --format)")
        return False
    try:
        check_equalizable(cfg)
    except EqualizeError as e:
        if equalize:
            raise ExportError(f"--equalize: {e}") from None
        return False
    return True


def export(src: Source, out_dir: str, formats: list[str], quantize: str, seq_len: int, do_verify: bool,
           repeats: int = 10, equalize: bool | None = None, calibration: int = CALIBRATION,
           onnx_names: str = "short") -> dict:
    """Writes every requested file into `out_dir` (an empty directory) and returns the export.json record.

    `equalize`: None equalises the int8 file's residual stream where that is exact (NoNorm), True insists (a
    LayerNorm model is refused), False never; `calibration`: sequences the scales are calibrated on; `onnx_names`:
    "short" renames the ONNX files' internal nodes and tensors to short ids (`compact_onnx`), "full" keeps the
    exporter's names."""
    from mobiledistill.models import count_params

    check_formats(src, formats)
    equalize = resolve_equalize(src.model.encoder.cfg, quantize, equalize, qat=src.qat is not None)
    equalization = int8 = None

    scratch = tempfile.mkdtemp(prefix="scratch-", dir=out_dir)
    hf_dir = os.path.join(out_dir, "hf") if "hf" in formats else os.path.join(scratch, "hf")
    write_hf(src, hf_dir)
    write_tokenizer(src, os.path.join(out_dir, "tokenizer"))
    files, onnx_files, tflite_files = {}, {}, {}
    eq = equalized_model(src, seq_len, calibration) if equalize else None  # (model, record) for the int8 files
    equalization = eq[1] if eq else None
    if "hf" in formats:
        files["hf/model.safetensors"] = {"format": "Hugging Face safetensors (fp32)"}
    if "onnx" in formats:
        onnx_files["fp32"] = os.path.join(out_dir, "model.onnx")
        write_onnx(src, hf_dir, onnx_files["fp32"], seq_len)
        files["model.onnx"] = {"format": "ONNX opset 17 (fp32)"}
        if quantize == "dynamic":
            onnx_files["int8_dynamic"] = os.path.join(out_dir, "model.int8.onnx")
            fmt = "ONNX, onnxruntime dynamic int8 (per-channel weights)"
            if equalize:
                equalized_int8(src, onnx_files["int8_dynamic"], scratch, seq_len, calibration, equalized=eq)
                fmt += "; residual-equalised, last_hidden_state = h / s"
            else:
                quantize_onnx(onnx_files["fp32"], onnx_files["int8_dynamic"], scratch)
            files["model.int8.onnx"] = {"format": fmt}
        elif quantize in export_int8.MODES:  # weight_only, int8 (static: calibrated, or the QAT run's ranges)
            label = export_int8.MODES[quantize]
            onnx_files[label] = os.path.join(out_dir, "model.int8.onnx")
            fmt, int8, eq_record = export_int8.write(src, quantize, onnx_files["fp32"], onnx_files[label], scratch,
                                                     seq_len, calibration, eq)
            equalization = eq_record or equalization
            files["model.int8.onnx"] = {"format": fmt}
        if onnx_names == "short":
            for path in onnx_files.values():
                files[os.path.basename(path)]["names"] = {"mode": "short", **compact_onnx(path)}
    if "tflite" in formats:
        from mobiledistill import export_tflite
        tflite_files["fp32"] = os.path.join(out_dir, "model.tflite")
        files["model.tflite"] = {"format": f"LiteRT flatbuffer (fp32), int32 inputs [1, {seq_len}]"}
        label = export_tflite.MODES.get(quantize)
        batches = export_int8.calibration_batches(src, calibration, seq_len) if quantize == "int8" else None
        if label:
            tflite_files[label] = os.path.join(out_dir, "model.int8.tflite")
            files["model.int8.tflite"] = {"format": (
                "LiteRT, dynamic-range int8 (per-channel weights)" if quantize == "dynamic" else
                f"LiteRT full-integer int8 (per-channel weights, per-tensor activations calibrated by the converter "
                f"on {calibration} sequences), int32 inputs, float outputs" + (
                    "; the QAT run's ranges are used by model.int8.onnx only" if src.qat is not None else "")) + (
                "; residual-equalised, last_hidden_state = h / s" if eq else "")}
        export_tflite.write_tflite(src.model, src.kind, seq_len, scratch, tflite_files["fp32"],
                                   tflite_files.get(label), eq[0] if eq else None, quantize, batches)
    for name, f in files.items():
        f["bytes"] = os.path.getsize(os.path.join(out_dir, name))
    record = {"source": src.description, "kind": src.kind, "task": src.task, "labels": src.label_names,
              "seq_len": seq_len, "formats": formats, "quantize": quantize, "files": files,
              "parameters": count_params(src.model), "vocab_size": src.model.encoder.cfg.vocab_size,
              "hf_config": json.loads(open(os.path.join(hf_dir, "config.json")).read()), "versions": _versions()}
    if tflite_files:
        record["versions"].update(export_tflite.versions())
    if int8:
        record["int8"] = int8
    if quantize != "none":
        record["equalization"] = equalization or {"applied": False}
    if equalization:
        equalization["applied"] = True
    if do_verify:
        scales = {k: equalization["scales"] for k in ("int8_dynamic", "int8_static")} if equalization else None
        record["verify"] = verify(src, hf_dir, onnx_files, seq_len, "hf" in formats, repeats=repeats,
                                  hidden_scales=scales, tflite_files=tflite_files)
        if equalization and onnx_files:  # the same int8 recipe without equalisation, for comparison (not kept)
            plain = os.path.join(scratch, "model.int8.plain.onnx")
            if quantize == "dynamic":
                quantize_onnx(onnx_files["fp32"], plain, scratch)
            else:
                plain = export_int8.plain_static(src, onnx_files["fp32"], scratch, seq_len, calibration)
            inputs = verify_inputs(src, seq_len)
            equalization["int8_without_equalization"] = onnx_file_errors(src, plain, jax_outputs(src, *inputs),
                                                                         inputs)
        if int8 and int8.get("ranges") == "qat":  # the acceptance check: the file computes the QAT forward
            int8["vs_qat_forward"] = export_int8.qat_check(src, onnx_files["int8_static"],
                                                           verify_inputs(src, seq_len))
    shutil.rmtree(scratch)
    with open(os.path.join(out_dir, "model_card.md"), "w") as f:
        f.write(model_card(src, record))
    with open(os.path.join(out_dir, "export.json"), "w") as f:
        json.dump(record, f, indent=2)
    return record


OPTIONS = ("--from, --to, --format, --quantize, --seq_len, --verify, --repeats, --equalize, --calibration, "
           "--onnx_names")


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
    p.add_argument("--quantize", default="none", help=f"one of {'|'.join(QUANTIZE)} (see the module docstring)")
    p.add_argument("--seq_len", type=int, default=None, help="sequence length of the verify/latency inputs "
                   "(default min(128, max_position_embeddings)); the ONNX files accept any length")
    p.add_argument("--verify", action="store_true", help="run every file in its runtime and compare with JAX")
    p.add_argument("--repeats", type=int, default=10, help="timed forward passes per runtime with --verify")
    p.add_argument("--equalize", action=argparse.BooleanOptionalAction, default=None,
                   help="residual-equalise the int8 file (default: for NoNorm models; --no-equalize turns it off)")
    p.add_argument("--onnx_names", default="short", help="short: the ONNX files' internal nodes and tensors get "
                   "short ids (smaller files; inputs and outputs keep their names); full: the exporter's names")
    p.add_argument("--calibration", type=int, default=CALIBRATION,
                   help=f"sequences the equalisation scales are calibrated on (default {CALIBRATION})")
    args = p.parse_args(argv)
    args.formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = [f for f in args.formats if f not in FORMATS]
    if bad or not args.formats:
        raise ExportError(f"--format={args.format}: unknown format {bad[0] if bad else '(empty)'!r}; valid: "
                          f"comma-separated {', '.join(FORMATS)}")
    if args.quantize not in QUANTIZE:
        raise ExportError(f"--quantize={args.quantize}; valid: {', '.join(QUANTIZE)}")
    if args.quantize == "weight_only" and "onnx" not in args.formats:
        raise ExportError("--quantize=weight_only writes model.int8.onnx only (LiteRT's converter has no weight-only "
                          "int8): add onnx to --format")
    if args.quantize != "none" and not {"onnx", "tflite"} & set(args.formats):
        raise ExportError(f"--quantize={args.quantize} quantises the ONNX / LiteRT files: add onnx or tflite to "
                          "--format")
    if args.onnx_names not in ONNX_NAMES:
        raise ExportError(f"--onnx_names={args.onnx_names}; valid: {', '.join(ONNX_NAMES)}")
    if args.repeats < 1:
        raise ExportError(f"--repeats={args.repeats}; must be >= 1")
    if not 1 <= args.calibration <= MAX_CALIBRATION:
        raise ExportError(f"--calibration={args.calibration}; valid: 1..{MAX_CALIBRATION} sequences")
    if args.equalize and args.quantize == "none":
        raise ExportError("--equalize rescales the int8 file: add --quantize=dynamic (and onnx to --format)")
    if args.seq_len is not None and args.seq_len < 2:  # the upper bound is the model's, checked once it is loaded
        raise ExportError(f"--seq_len={args.seq_len}; valid: 2..the model's max_position_embeddings (default "
                          f"min(128, max_position_embeddings))")
    return args


def check_formats(src: Source, formats: list[str]) -> None:
    """Refuses a format that cannot hold this model (before anything is written)."""
    if "hf" in formats and mean_pooled(src):
        raise ExportError("--format=hf: this classifier mean-pools the final hidden states (classifier_pooling="
                          "'mean'), and transformers' *ForSequenceClassification reads [CLS]; --format=onnx,tflite "
                          "carry the mean-pooled head")


def check_runtimes(formats: list[str]) -> None:
    needed = {}
    for f in formats:
        needed.update(RUNTIMES[f])
    for module, package in needed.items():
        try:
            importlib.import_module(module)
        except ImportError:
            raise ExportError(f"--format={','.join(formats)} needs the Python package {package!r}, which is not "
                              f"installed: pip install -e '.[{EXTRA.get(module, 'export')}]'") from None


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
    from mobiledistill.errors import one_line_stderr

    one_line_stderr()
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
        check_formats(src, args.formats)  # before writing
        resolve_equalize(src.model.encoder.cfg, args.quantize, args.equalize, qat=src.qat is not None)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=os.path.dirname(out))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # a normal directory once renamed (mkdtemp makes it private)
        record = export(src, tmp, args.formats, args.quantize, seq_len, args.verify, args.repeats, args.equalize,
                        args.calibration, args.onnx_names)
        check_out_dir(out)  # still new or empty: then the finished directory takes its place
        if os.path.isdir(out):
            os.rmdir(out)
        os.rename(tmp, out)
        tmp = None
        eq = record.get("equalization") or {}
        note = (f" (int8 residual-equalised: {eq['channels_rescaled']}/{eq['channels']} channels rescaled, s up to "
                f"{eq['scale_max']:g})" if eq.get("applied") else "")
        print(f"exported {', '.join(record['files'])} to {out}{note}{_verified_line(record)}")
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
