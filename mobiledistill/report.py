"""`workdir/report.md`: a table per stage, the held-out comparison, and PNG plots of the loss curves."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from etils import epath

from mobiledistill.checkpoint import write_text_atomic
from mobiledistill.metrics import read_jsonl

RATE_KEYS = ("steps_per_s", "tokens_per_s", "mfu_student", "mfu_total")


def _loss_keys(records: Sequence[dict]) -> list[str]:
    keys = []
    for r in records:
        for k in r:
            if k not in keys and k != "step" and k not in RATE_KEYS:
                keys.append(k)
    return keys


def plot_stage(records: Sequence[dict], title: str, path: epath.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in _loss_keys(records) if k != "grad_norm"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    steps = [r["step"] for r in records]
    for k in keys:
        values = [r.get(k, float("nan")) for r in records]
        if any(math.isfinite(v) and v > 0 for v in values):
            ax.plot(steps, values, label=k, marker="." if len(steps) < 30 else None)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (log scale)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with path.open("wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def write_report(workdir: epath.Path, stages: Sequence, summaries: Mapping[str, dict], header: str,
                 comparison: Sequence[tuple[str, str]]) -> epath.Path:
    """Writes report.md and one loss-curve PNG per stage; returns the report's path."""
    (workdir / "plots").mkdir(parents=True, exist_ok=True)
    lines = [header, ""]
    if comparison:
        lines += ["## Held-out masked-LM accuracy", "", "| model | stage | MLM accuracy | MLM NLL |", "|---|---|---|---|"]
        for label, stage in comparison:
            s = summaries.get(stage, {})
            acc = s.get("eval_mlm_accuracy")
            loss = s.get("eval_mlm_nll", float("nan"))
            lines.append(f"| {label} | `{stage}` | {acc * 100:.2f}% | {loss:.4f} |" if acc is not None
                         else f"| {label} | `{stage}` | – | – |")
        lines.append("")
    lines += ["## Stages", ""]
    for stage in stages:
        records = read_jsonl(workdir / stage.name / "metrics.jsonl")
        s = summaries.get(stage.name, {})
        lines += [f"### `{stage.name}`", "",
                  f"{stage.steps} steps, trains the {stage.trains}, losses "
                  + ", ".join(f"{k} (x{v.get('weight', 1)})" for k, v in stage.losses.items())
                  + (f", runs {stage.num_layers} layers" if stage.num_layers else "")
                  + f"; {s.get('seconds', float('nan')):.1f} s.", ""]
        if records:
            first, last = records[0], records[-1]
            keys = _loss_keys(records)
            lines += ["| | step | " + " | ".join(keys) + " | steps/s | MFU |",
                      "|---|---|" + "---|" * len(keys) + "---|---|"]
            for name, r in (("first logged", first), ("last", last)):
                lines.append(f"| {name} | {r['step']} | " + " | ".join(f"{r.get(k, float('nan')):.4g}" for k in keys)
                             + f" | {r.get('steps_per_s', float('nan')):.2f} | "
                             f"{100 * r.get('mfu_total', float('nan')):.1f}% |")
            png = f"{stage.name}.png"
            plot_stage(records, stage.name, workdir / "plots" / png)
            lines += ["", f"![{stage.name} losses](plots/{png})", ""]
        evals = {k: v for k, v in s.items() if k.startswith("eval_")}
        if evals:
            lines += ["Held-out: " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in evals.items()), ""]
    path = workdir / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
