"""l0calib.nn: L0-regularised layers that really prune (Louizos, Welling & Kingma 2017).

Nothing here is survey-specific. The layers share :class:`l0calib.HardConcrete` with the
calibration engine. See ``docs/nn.md``.
"""

from l0calib.nn.layers import L0Conv2d, L0DepthwiseConv2d, L0Layer, L0Linear, SparseMLP
from l0calib.nn.penalties import (
    PenaltyTracker,
    SparsityController,
    TemperatureScheduler,
    compute_l0_penalty,
    compute_l0l2_penalty,
    compute_l2_penalty,
    get_active_parameter_count,
    get_sparsity_stats,
    paper_penalty,
    update_temperatures,
)
from l0calib.nn.pruning import SelectInputs, prune_model

__all__ = [
    "L0Conv2d",
    "L0DepthwiseConv2d",
    "L0Layer",
    "L0Linear",
    "PenaltyTracker",
    "SelectInputs",
    "SparseMLP",
    "SparsityController",
    "TemperatureScheduler",
    "compute_l0_penalty",
    "compute_l0l2_penalty",
    "compute_l2_penalty",
    "get_active_parameter_count",
    "get_sparsity_stats",
    "paper_penalty",
    "prune_model",
    "update_temperatures",
]
