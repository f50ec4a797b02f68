"""Strategies: functions from a pipeline config to an ordered list of stages."""

from mobiledistill.strategies.init import COPIED_FROM_TEACHER, copy_from_teacher, init_from_teacher, truncated_svd
from mobiledistill.strategies.mobilebert import STRATEGIES, build_stages, layer_map
from mobiledistill.strategies.stage import Stage

__all__ = ["COPIED_FROM_TEACHER", "STRATEGIES", "Stage", "build_stages", "copy_from_teacher", "init_from_teacher",
           "layer_map", "truncated_svd"]
