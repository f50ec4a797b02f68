"""The model card of an export (`model_card.md`): the model, its files, and with --verify each file's errors against
the JAX model (per output and per feature channel) and its latency."""

from __future__ import annotations

from mobiledistill.export_source import Source
from mobiledistill.export_verify import FP32_TOL
from mobiledistill.export_write import HIDDEN, INPUTS, OUTPUTS, _hf_class, mean_pooled


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def model_card(src: Source, record: dict) -> str:
    """`model_card.md`: what the files are, their sizes, and (with --verify) their errors and latency."""
    from mobiledistill.convert import hf_arch

    cfg = src.model.encoder.cfg
    architecture = _hf_class(src.kind, cfg).__name__
    if mean_pooled(src):
        architecture = (f"{'Bert' if hf_arch(cfg) == 'bert' else 'MobileBert'}Model + mean of the final hidden "
                        "states + linear classifier (no transformers head: ONNX / LiteRT only)")
    lines = [f"# {src.task or 'pre-training'} {hf_arch(cfg)} model ({src.kind})", "",
             f"Exported by `python -m mobiledistill.export` from {src.description}.", "",
             f"- architecture: {architecture} ({record['parameters']:,} parameters; "
             f"{len(cfg.plan)} layers{' unrolled from a shared-layer SPS plan' if cfg.layer_plan else ''}, "
             f"hidden {cfg.hidden_size}, intra {cfg.true_hidden_size}, {cfg.normalization_type}, {cfg.hidden_act})",
             f"- labels: {src.label_names or ('2 span logits (start, end)' if src.kind == 'span' else 'n/a')}",
             f"- tokenizer: WordPiece, {record['vocab_size']} tokens (`tokenizer/`, also in `hf/`)",
             f"- ONNX inputs: {', '.join(INPUTS)} (int64 [batch, sequence]); outputs: "
             f"{', '.join(OUTPUTS[src.kind] + (HIDDEN,))}"]
    if any(n.endswith(".tflite") for n in record["files"]):
        lines.append(f"- LiteRT inputs: the same names, int32 [1, {record['seq_len']}] (one row per call; signature "
                     "`serving_default`); the same outputs")
    lines += ["", "## Files", "", "| file | format | size |",
             "|---|---|---|"]
    for name, f in record["files"].items():
        lines.append(f"| `{name}` | {f['format']} | {_mb(f['bytes'])} |")
    lines += _equalization_lines(record.get("equalization"))
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


def _equalization_lines(eq: dict | None) -> list[str]:
    if not eq:
        return []
    if not eq["applied"]:
        return ["", "int8 residual equalisation: no (LayerNorm model, or --no-equalize)."]
    lines = ["", "## int8 residual equalisation", "",
             f"The int8 files quantise a copy whose residual stream is h / s (exact in float32; `{HIDDEN}` of "
             f"that file is h / s, s = `equalization.scales` in export.json). s: powers of two from "
             f"{eq['scale_min']:g} to {eq['scale_max']:g}, {eq['channels_rescaled']}/{eq['channels']} channels "
             f"rescaled, calibrated on {eq['calibration_sequences']} random sequences (alpha {eq['alpha']:g}); "
             f"largest / median channel range {eq['range_ratio_before']:.3g} before, "
             f"{eq['range_ratio_after']:.3g} after."]
    plain = eq.get("int8_without_equalization")
    if plain:
        h = plain["outputs"][HIDDEN]["per_channel"]
        lines += ["", f"The same int8 recipe without equalisation (not written): max rel. error "
                  f"{plain['max_rel_err']:.3g} ({plain['worst_output']}); `{HIDDEN}` worst channel {h['max']:.3g}, "
                  f"median channel {h['median']:.3g}, channels > 10% err {h['over_10pct']}/{h['channels']}; "
                  "compare with the int8 file(s) below."]
    return lines
