"""The public surface: __all__ is explicit, importable and documented."""

from __future__ import annotations

import inspect

import l0calib
from l0calib import exceptions

EXPECTED = {
    "CalibrationError",
    "CalibrationResult",
    "ConvergenceWarning",
    "CoverageWarning",
    "DataError",
    "EstimateMatrix",
    "FeatureGate",
    "HardConcrete",
    "HybridGate",
    "L0Conv2d",
    "L0Gate",
    "L0Linear",
    "L0CalibError",
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
}


def test_all_is_exactly_the_public_api() -> None:
    assert set(l0calib.__all__) == EXPECTED
    for name in l0calib.__all__:
        assert hasattr(l0calib, name)


def test_public_objects_have_docstrings() -> None:
    for name in l0calib.__all__:
        obj = getattr(l0calib, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__, name
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and inspect.isfunction(member):
                    assert member.__doc__, f"{name}.{attr}"


def test_error_tree() -> None:
    for cls in (exceptions.ParameterError, exceptions.DataError, exceptions.TargetError):
        assert issubclass(cls, exceptions.L0CalibError)
        assert issubclass(cls, ValueError)
    assert issubclass(exceptions.CalibrationError, exceptions.L0CalibError)
    assert issubclass(exceptions.OutputError, exceptions.L0CalibError)
    assert issubclass(exceptions.ConvergenceWarning, UserWarning)
    documented = exceptions.__doc__ or ""
    for name in exceptions.__all__:
        assert name in documented


def test_library_does_not_import_the_cli() -> None:
    import subprocess
    import sys

    code = "import sys, l0calib; print('l0calib_cli' in sys.modules, 'typer' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
