"""Runs the Pea-KD recipe (configs/peakd.py): the PTP fine-tuning stage, then the PKD stage initialised from it.

The runner lives here, not in `strategies/peakd.py`, so strategies stay pure functions (plans, labels, layer
maps) that `finetune` imports without importing a runner back.
"""

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


def run(c, workdir: str) -> dict:
    """Pea-KD (configs/peakd.py): the PTP stage (`c.ptp_stage`, one seed) in `<workdir>/ptp`, then the PKD stage
    (`c.pkd_stage`, initialised from the PTP encoder, patience layers mapped PKD-skip) in `<workdir>/pkd`."""
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ptp_dir = workdir / "ptp"
    ptp_dir.mkdir(exist_ok=True)
    finetune.run(c.ptp_stage, str(ptp_dir))
    pkd = c.pkd_stage
    info = finetune.read_model_json(ptp_dir)
    s, t = patience_layers(len(info["encoder"].plan), _teacher_layers(pkd.distill.teacher))
    with pkd.unlocked():
        pkd.init = f"ptp:{ptp_dir}/seed_{c.ptp_stage.seeds[0]}"
        pkd.distill.extra_losses.patience.student_layers = s
        pkd.distill.extra_losses.patience.teacher_layers = t
    pkd_dir = workdir / "pkd"
    pkd_dir.mkdir(exist_ok=True)
    return finetune.run(pkd, str(pkd_dir))
