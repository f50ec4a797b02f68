"""configs/ckd_glue.py (task-specific CKD) and configs/ckd.py (task-agnostic CKD: relation terms in the PD stage)."""

import importlib.util
import os
import subprocess
import sys

import pytest
from _limits import SUBPROCESS_TIMEOUT

from mobiledistill.config import pretraining_config
from mobiledistill.losses.relations import ckd_task_hparams, ckd_task_loss_spec
from mobiledistill.strategies.mobilebert import _pd_losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


@pytest.mark.parametrize("task", ["sst2", "rte"])
def test_ckd_glue_loss_spec(task):
    c = _config("ckd_glue", f"task={task},teacher=finetune:/tmp/t")
    expected = ckd_task_loss_spec(task)
    hp = ckd_task_hparams(task)
    assert c.distill.extra_losses.to_dict() == {k: v for k, v in expected.items() if k != "kd"}
    assert c.distill.temperature == expected["kd"]["temperature"] == hp["temperature"]
    assert c.train.lr == hp["lr"] and c.train.epochs == hp["epochs"]
    assert set(c.distill.extra_losses) <= {"wr_pair", "wr_angle", "ltr_pair", "ltr_angle"}


def test_default_pd_losses_unchanged():
    c = pretraining_config()
    assert len(c.pd.relations) == 0
    assert set(_pd_losses(c)) == {"mlm_distill", "nsp"}
    ckd = _config("ckd", "local")
    losses = _pd_losses(ckd)
    assert set(losses) == {"mlm_distill", "nsp", "wr_pair", "wr_angle", "ltr_pair", "ltr_angle"}
    assert losses["wr_pair"]["matching"] == "emb+skip" and losses["wr_pair"]["weight"] == 1.0


def test_ckd_local_dry_run():
    r = subprocess.run([sys.executable, "-m", "mobiledistill.main", "--config=configs/ckd.py:local", "--dry_run"],
                       cwd=ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    pd = [ln for ln in r.stdout.splitlines() if ln.startswith("pd ")]
    assert len(pd) == 1 and all(t in pd[0] for t in ("mlm_distill", "wr_pair", "wr_angle", "ltr_pair", "ltr_angle"))
