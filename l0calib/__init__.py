"""l0calib: survey calibration with L0-gated weights.

Calibrate survey weights so weighted totals match official targets, optionally keeping an
exact number of records. The public API is what ``__all__`` lists; everything else is
internal and may change.

The public names are imported on first use (PEP 562), so ``import l0calib`` (and the
command line's ``--help``) does not pay for torch, pandas or scipy until something needs
them.
"""

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from l0calib._version import __version__
from l0calib.exceptions import (
    CalibrationError,
    ConvergenceWarning,
    CoverageWarning,
    DataError,
    L0CalibError,
    OutputError,
    ParameterError,
    TargetError,
)

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from l0calib.calibrate import CalibrationResult, Progress, calibrate, refit
    from l0calib.classic import calibrate_exact
    from l0calib.datasets import SyntheticSurvey, synthetic_survey
    from l0calib.diagnose import TargetDiagnosis, diagnose_targets
    from l0calib.gates import FeatureGate, HybridGate, L0Gate, SampleGate, pps_sample
    from l0calib.hardconcrete import HardConcrete
    from l0calib.io import read_table, write_table
    from l0calib.nn import (
        L0Conv2d,
        L0Linear,
        TemperatureScheduler,
        compute_l0l2_penalty,
        update_temperatures,
    )
    from l0calib.targets import (
        EstimateMatrix,
        Target,
        as_estimate_matrix,
        build_estimate_matrix,
        read_targets,
    )

# Public name -> the module that defines it.
_LAZY = {
    **dict.fromkeys(("CalibrationResult", "Progress", "calibrate", "refit"), "l0calib.calibrate"),
    "calibrate_exact": "l0calib.classic",
    **dict.fromkeys(("SyntheticSurvey", "synthetic_survey"), "l0calib.datasets"),
    **dict.fromkeys(("TargetDiagnosis", "diagnose_targets"), "l0calib.diagnose"),
    **dict.fromkeys(
        ("FeatureGate", "HybridGate", "L0Gate", "SampleGate", "pps_sample"), "l0calib.gates"
    ),
    "HardConcrete": "l0calib.hardconcrete",
    **dict.fromkeys(("read_table", "write_table"), "l0calib.io"),
    **dict.fromkeys(
        (
            "L0Conv2d",
            "L0Linear",
            "TemperatureScheduler",
            "compute_l0l2_penalty",
            "update_temperatures",
        ),
        "l0calib.nn",
    ),
    **dict.fromkeys(
        ("EstimateMatrix", "Target", "as_estimate_matrix", "build_estimate_matrix", "read_targets"),
        "l0calib.targets",
    ),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'l0calib' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``l0calib.calibrate`` and ``l0calib.refit`` are functions that share their names
    with submodules; importing a submodule sets the package attribute of its name, so that
    assignment is ignored for public names (the submodule stays in ``sys.modules``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "CalibrationError",
    "CalibrationResult",
    "ConvergenceWarning",
    "CoverageWarning",
    "DataError",
    "EstimateMatrix",
    "FeatureGate",
    "HardConcrete",
    "HybridGate",
    "L0CalibError",
    "L0Conv2d",
    "L0Gate",
    "L0Linear",
    "OutputError",
    "ParameterError",
    "Progress",
    "SampleGate",
    "SyntheticSurvey",
    "Target",
    "TargetDiagnosis",
    "TargetError",
    "TemperatureScheduler",
    "__version__",
    "as_estimate_matrix",
    "build_estimate_matrix",
    "calibrate",
    "calibrate_exact",
    "compute_l0l2_penalty",
    "diagnose_targets",
    "pps_sample",
    "read_table",
    "read_targets",
    "refit",
    "synthetic_survey",
    "update_temperatures",
    "write_table",
]
