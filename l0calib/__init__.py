"""l0calib: survey calibration with L0-gated weights.

Calibrate survey weights so weighted totals match official targets, optionally keeping an
exact number of records. The public API is what ``__all__`` lists; everything else is
internal and may change.
"""

from l0calib._version import __version__
from l0calib.calibrate import CalibrationResult, Progress, calibrate, refit
from l0calib.classic import calibrate_exact
from l0calib.datasets import SyntheticSurvey, synthetic_survey
from l0calib.diagnose import TargetDiagnosis, diagnose_targets
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
