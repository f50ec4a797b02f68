"""Pea-KD's hand-off from its PTP stage to its PKD stage (configs/peakd.py, run by mobiledistill.engine): the
patience term maps the student's layers 1..L-1 onto the teacher's layers PKD-skip, once both depths are known."""

from __future__ import annotations

import json

from etils import epath

from mobiledistill import finetune
from mobiledistill.strategies.peakd import patience_layers


def _teacher_layers(src: str) -> int:
    if src.startswith("hf:"):
        return int(json.loads((epath.Path(src[3:]) / "config.json").read_text())["num_hidden_layers"])
    workdir, _ = finetune.finished_run_dir(epath.Path(src[len("finetune:"):]))
    return len(finetune.read_model_json(workdir)["encoder"].plan)


def patience_for(init: str, teacher: str) -> tuple[list[int], list[int]]:
    """(student layers, teacher layers) of the patience term for a PKD stage initialised from the PTP run `init`
    ('ptp:<workdir>/seed_<s>') and distilled from `teacher` ('finetune:<workdir>' or 'hf:<dir>')."""
    path = epath.Path(init[len("ptp:"):])
    workdir = path.parent if path.name.startswith("seed_") else path
    student = len(finetune.read_model_json(workdir)["encoder"].plan)
    return patience_layers(student, _teacher_layers(teacher))
