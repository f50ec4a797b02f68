"""The report of a run: report.md (mean ± std over seeds per eval split, per label F1) and summary.json."""

from __future__ import annotations

import json
from collections.abc import Mapping

import jax
import numpy as np
from etils import epath
from flax import nnx

from mobiledistill import checkpoint as ckpt
from mobiledistill import evaluate
from mobiledistill.finetune.config import SQUAD
from mobiledistill.finetune.context import Context
from mobiledistill.finetune.sources import new_task_model


def run_label(c) -> str:
    base = c.init.split(":", 1)[0]
    name = f"{c.task}{'/' + c.squad_version if c.task == SQUAD else ''} {base} init"
    return name + (f", distilled from {c.distill.teacher}" if c.distill.teacher else "")


def _split_runs(runs: list[dict], split: str, n_splits: int) -> list[dict]:
    """Each seed's metrics of one eval split, with the `<split>/` prefix of multi-split runs removed."""
    if n_splits == 1:
        return runs
    pre = split + "/"
    return [{"seed": r["seed"], **{k[len(pre):]: v for k, v in r.items() if k.startswith(pre)}} for r in runs]


def _label_f1_table(runs: list[dict], label_names: tuple[str, ...], labels: np.ndarray) -> str:
    """Markdown: per label, its rows in the split and its F1 (mean ± std over the seeds that define it)."""
    counts = np.bincount(np.asarray(labels, np.int64), minlength=len(label_names))
    lines = ["| label | rows | F1 |", "|---|---:|---:|"]
    for i, name in enumerate(label_names):
        vals = [r["f1_per_label"].get(name) for r in runs if isinstance(r.get("f1_per_label"), Mapping)]
        vals = [v for v in vals if v is not None]
        cell = "–" if not vals else (f"{vals[0]:.2f}" if len(vals) == 1 else
                                     f"{np.mean(vals):.2f} ± {np.std(vals, ddof=1):.2f}")
        shown = str(name).replace("|", "\\|")
        lines.append(f"| {shown} | {int(counts[i])} | {cell} |")
    return "\n".join(lines) + "\n"


def write_report(c, workdir: epath.Path, ctx: Context, summaries: Mapping[int, dict]) -> str:
    runs = [summaries[s] for s in c.seeds if s in summaries]
    splits = list(ctx.data.evals)
    sections = []
    for split in splits:
        split_runs = _split_runs(runs, split, len(splits))
        names = [k for k in split_runs[0] if k not in ("seed", "final_step", "seconds") and "thresh" not in k
                 and isinstance(split_runs[0][k], (int, float))]
        table = evaluate.format_seed_table({run_label(c): split_runs}, names)
        per_seed = evaluate.format_seed_table([(f"seed {r['seed']}", [r]) for r in split_runs], names,
                                              label="seed")
        section = f"## {split}\n\n{table}\nPer seed:\n\n{per_seed}"
        if ctx.data.label_names and any("f1_per_label" in r for r in split_runs):
            section += (f"\nPer label ({split}):\n\n"
                        f"{_label_f1_table(split_runs, ctx.data.label_names, ctx.data.evals[split]['labels'])}")
        sections.append(section)
    task = ctx.data.task
    if ctx.data.label_names:
        labels = f"labels (class id order): {', '.join(map(str, ctx.data.label_names))}. "
    elif task is not None and task.is_regression:
        labels = f"regression target{f' `{task.label_key}`' if task.custom else ''}. "
    else:
        labels = ""
    from mobiledistill.models import count_params
    n_params = count_params(nnx.state(nnx.eval_shape(lambda: new_task_model(ctx.kind, ctx.cfg,
                                                                                ctx.data.num_labels, 0))))
    teacher = f"teacher `{c.distill.teacher}`, losses {', '.join(ctx.spec)}, " if c.distill.teacher else ""
    text = (f"# mobiledistill fine-tuning report: {c.task}\n\n"
            f"init `{c.init}` ({ctx.source.description}), {n_params:,} parameters, "
            f"{teacher}"
            f"data `{c.data.source}` ({len(ctx.data.train['input_ids'])} training rows, eval on "
            f"{', '.join(ctx.data.evals)}), {c.train.epochs} epochs, batch {c.train.batch} x seq "
            f"{c.data.max_seq_length}, AdamW lr {c.train.lr:g}. {labels}Metrics in percent, each eval split on its "
            f"own; mean ± sample std over seeds.\n\n" + "\n".join(sections))
    if jax.process_index() == 0:
        ckpt.write_text_atomic(workdir / "report.md", text)
        agg = evaluate.summarize_seeds(runs)
        ckpt.write_text_atomic(workdir / "summary.json", json.dumps(evaluate._jsonable(
            {"label": run_label(c), "seeds": runs, "mean_std": agg}), indent=2))
    return text
