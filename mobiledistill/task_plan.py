"""What the engine needs to know of a fine-tuning section without training it: its task's shape, the size of its
model, a teacher's architecture, whether a workdir holds it finished, and the dev data of a finished run."""

from __future__ import annotations

import json

from etils import epath
from flax import nnx

from mobiledistill import convert, finetune
from mobiledistill.data import glue_task
from mobiledistill.errors import ConfigError


def task_shape(c) -> tuple[str, int | None]:
    """(model kind, number of outputs; None = named by the training file's labels)."""
    if c.task == finetune.SQUAD:
        return "span", 2
    if c.task == "custom":
        if c.custom.regression:
            return "classification", 1
        return "classification", len(finetune.label_names_of(c)) or None
    return "classification", glue_task(c.task).num_labels


def abstract_task_params(kind: str, cfg, num_labels: int) -> nnx.State:
    return nnx.state(nnx.eval_shape(lambda: finetune.new_task_model(kind, cfg, num_labels, 0)), nnx.Param)


def teacher_encoder_config(src: str, dtype: str):
    """The encoder config of a task teacher ('hf:<dir>' or 'finetune:<workdir>[/seed_<s>]'), from its json only."""
    if src.startswith("hf:"):
        path = epath.Path(src[3:]) / "config.json"
        if not path.exists():
            raise ConfigError(f"distill.teacher={src}: {path} does not exist (give a fine-tuned transformers "
                              f"directory)")
        return convert.config_from_hf(json.loads(path.read_text()), dtype=dtype)
    path = epath.Path(src[len("finetune:"):])
    workdir = path.parent if path.name.startswith("seed_") else path
    if not (workdir / "model.json").exists():
        raise ConfigError(f"distill.teacher={src}: {workdir / 'model.json'} does not exist (give a finished "
                          f"fine-tuning run)")
    return finetune.read_model_json(workdir)["encoder"].replace(dtype=dtype)


def finished(c, workdir: epath.Path) -> dict | None:
    """{seed: summary} when `workdir` holds the run `c` finished (reads only, prints nothing), else None."""
    return finetune.finished(c, workdir, quiet=True)


def task_data_for_run(c, info: dict):
    """The dev (and training) features of the finished run `info` (its model.json) under its config `c`."""
    from mobiledistill.data import load_tokenizer

    names = tuple(info["label_names"]) if info.get("label_names") else None
    examples, task = finetune.load_examples(c, names if c.task == "custom" else None)
    return finetune.build_features(c, examples, load_tokenizer(info["tokenizer"]), task)
