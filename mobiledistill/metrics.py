"""Per-stage metrics: a JSONL log, TensorBoard events and a console progress line (step, losses, speed, MFU, ETA)."""

from __future__ import annotations

import datetime
import json
import math
import sys
import time
from typing import Mapping

import jax
from etils import epath


def _fmt(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else str(v)


class StageMetrics:
    """Writes one stage's metrics; only process 0 writes (multi-host)."""

    def __init__(self, stage_dir: epath.Path, stage: str, total_steps: int, start_step: int, label: str,
                 tokens_per_step: int, flops_per_step: tuple[float, float], peak_flops: float):
        self.stage, self.total, self.label = stage, total_steps, label
        self.tokens_per_step, self.peak = tokens_per_step, peak_flops
        self.student_flops, self.teacher_flops = flops_per_step
        self.writer = None
        self.primary = jax.process_index() == 0
        if self.primary:
            self.jsonl = open(stage_dir / "metrics.jsonl", "a")
            try:
                from tensorboardX import SummaryWriter
                self.writer = SummaryWriter(str(stage_dir / "tb"))
            except ImportError:  # tensorboardX is a dependency; keep training if it is broken
                self.writer = None
        self._last_step, self._last_time = start_step, time.perf_counter()
        self._start_step, self._start_time = start_step, self._last_time
        self.steps_per_s = float("nan")

    def log(self, step: int, values: Mapping[str, float], extra: Mapping[str, float] | None = None) -> None:
        now = time.perf_counter()
        if step > self._last_step:
            self.steps_per_s = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        rate = dict(steps_per_s=self.steps_per_s, tokens_per_s=self.steps_per_s * self.tokens_per_step,
                    mfu_student=self.steps_per_s * self.student_flops / self.peak,
                    mfu_total=self.steps_per_s * (self.student_flops + self.teacher_flops) / self.peak)
        record = {"step": step, **{k: float(v) for k, v in values.items()}, **rate, **(extra or {})}
        if not self.primary:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)
        elapsed = now - self._start_time
        done = step - self._start_step
        eta = (self.total - step) * elapsed / done if done > 0 else float("nan")
        eta_s = str(datetime.timedelta(seconds=int(eta))) if math.isfinite(eta) else "?"
        losses = " ".join(f"{k} {_fmt(float(v))}" for k, v in values.items() if k not in ("grad_norm",))
        print(f"{self.label} step {step}/{self.total} | {losses} | {self.steps_per_s:.2f} step/s "
              f"{rate['tokens_per_s'] / 1e3:.1f}k tok/s | MFU {100 * rate['mfu_total']:.1f}% "
              f"(student {100 * rate['mfu_student']:.1f}%) | ETA {eta_s}", flush=True)

    def event(self, message: str) -> None:
        if self.primary:
            print(f"{self.label} {message}", file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.primary:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()


def read_jsonl(path: epath.Path) -> list[dict]:
    """A stage's metric records, one per step (a resumed run's re-logged steps keep their latest record)."""
    if not path.exists():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]
