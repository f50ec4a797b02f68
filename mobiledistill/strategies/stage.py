"""A training stage: what trains, on which losses, with which optimizer, starting from where (SPEC §4)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from mobiledistill.optim import OptimizerConfig

TRAINS = ("student", "teacher")
INITS = ("fresh", "previous", "teacher_copy", "checkpoint")
TEACHER_FREE_TERMS = ("mlm", "nsp")  # loss terms that never read the teacher
TOPK_TERMS = ("mlm_distill",)  # teacher terms an offline top-k teacher can serve


def term_kind(name: str, spec: Mapping[str, Any]) -> str:
    """The registered loss a term runs (its `loss`, default its name; the inner term of a `batch_teacher`)."""
    spec = dict(spec)
    kind = spec.get("loss", name)
    return spec.get("inner", kind) if kind == "batch_teacher" else kind


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a pipeline; strategies turn a config into an ordered list of these.

    trains: which model's parameters this stage updates ('student' or 'teacher').
    losses: a `losses.build_loss` spec {term: {weight, [loss], **params}}.
    optimizer: its `lr_scales` / `default_lr_scale` decide what trains; scale 0 parameters are frozen, bit-identical,
        and not differentiated.
    init: 'fresh' (random), 'previous' (the final parameters of stage `init_from`), 'teacher_copy' (random, then the
        teacher's embeddings and MLM/NSP heads copied in), 'checkpoint' (the external 'hf:<dir>' checkpoint
        `init_from`, loaded as a teacher is: heads it lacks are freshly initialised).
    teacher_from: the stage whose final parameters are the (frozen) teacher, an external 'hf:<dir>' checkpoint, or
        None for teacher-free stages.
    num_layers / teacher_num_layers: run the student / teacher only this deep (progressive transfer).
    dropout: whether the trained model runs with dropout (distillation stages run without).
    eval: what to evaluate at the end ('mlm' = held-out MLM accuracy), or None.
    teacher_top_k / teacher_topk_epochs: 0 = the teacher runs every step (the paper); k > 0 = offline teacher
        (`teacher_topk`): its k largest MLM logits per masked position are stored once for the stage's own batches
        over `teacher_topk_epochs` passes of the corpus, and the stage cycles through them without running it
        (only for losses that read nothing but the teacher's MLM logits).
    projections: student hidden-state indices that get a learned student->teacher width projection, trained with the
        stage and dropped from the student it hands on (`strategies.projection`); loss terms read them with
        `projection=True`. Empty when the feature-map widths match.
    """

    name: str
    steps: int
    losses: Mapping[str, Mapping[str, Any]]
    optimizer: OptimizerConfig
    trains: str = "student"
    init: str = "previous"
    init_from: Optional[str] = None
    teacher_from: Optional[str] = None
    num_layers: Optional[int] = None
    teacher_num_layers: Optional[int] = None
    dropout: bool = False
    eval: Optional[str] = None
    projections: tuple[int, ...] = ()
    teacher_top_k: int = 0
    teacher_topk_epochs: float = 1.0

    def __post_init__(self):
        if self.trains not in TRAINS:
            raise ValueError(f"stage {self.name!r}: trains={self.trains!r}; valid: {TRAINS}")
        if self.init not in INITS:
            raise ValueError(f"stage {self.name!r}: init={self.init!r}; valid: {INITS}")
        if self.init == "previous" and not self.init_from:
            raise ValueError(f"stage {self.name!r}: init='previous' needs init_from=<stage name>")
        if self.init == "checkpoint" and not str(self.init_from).startswith("hf:"):
            raise ValueError(f"stage {self.name!r}: init='checkpoint' needs init_from='hf:<dir>'")
        if self.init == "teacher_copy" and not self.teacher_from:
            raise ValueError(f"stage {self.name!r}: init='teacher_copy' needs teacher_from")
        if self.steps < 0:
            raise ValueError(f"stage {self.name!r}: steps={self.steps} must be >= 0")
        object.__setattr__(self, "projections", tuple(int(i) for i in self.projections))
        if any(i < 0 for i in self.projections) or len(set(self.projections)) != len(self.projections):
            raise ValueError(f"stage {self.name!r}: projections={self.projections} must be distinct hidden-state "
                             f"indices >= 0")
        if self.teacher_top_k:
            terms = {n: term_kind(n, spec) for n, spec in self.losses.items()}
            teacher_terms = sorted(n for n, kind in terms.items() if kind not in TEACHER_FREE_TERMS)
            if not self.teacher_from or teacher_terms != sorted(n for n, k in terms.items() if k in TOPK_TERMS):
                raise ValueError(f"stage {self.name!r}: teacher_top_k={self.teacher_top_k} needs a teacher and "
                                 f"teacher terms that read only its MLM logits ({', '.join(TOPK_TERMS)}); "
                                 f"this stage has {teacher_terms or 'none'}")
            if self.teacher_top_k < 0 or not self.teacher_topk_epochs > 0:
                raise ValueError(f"stage {self.name!r}: teacher_top_k={self.teacher_top_k}, teacher_topk_epochs="
                                 f"{self.teacher_topk_epochs}; valid: k >= 1 and epochs > 0")
        projected = sorted(n for n, spec in self.losses.items() if dict(spec).get("projection", False))
        if projected and not self.projections:
            raise ValueError(f"stage {self.name!r}: loss terms {projected} use projections but the stage has none "
                             f"(set Stage.projections)")
