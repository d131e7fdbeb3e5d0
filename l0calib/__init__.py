"""l0calib: survey calibration with L0-gated weights.

Calibrate survey weights so weighted totals match official targets, optionally keeping an
exact number of records. The public API is what ``__all__`` lists; everything else is
internal and may change.
"""

from l0calib._version import __version__
from l0calib.exceptions import (
    CalibrationError,
    ConvergenceWarning,
    DataError,
    L0CalibError,
    ParameterError,
    TargetError,
)
from l0calib.hardconcrete import HardConcrete

__all__ = [
    "CalibrationError",
    "ConvergenceWarning",
    "DataError",
    "HardConcrete",
    "L0CalibError",
    "ParameterError",
    "TargetError",
    "__version__",
]
