"""The reference `l0` package's names and call shapes work from `l0calib`, with exact counts.

Two tests. The first runs every Python example of the reference README (PolicyEngine's
l0-python, kept beside the repository at ../shared/reference/l0-python-README.md, or where
L0CALIB_REFERENCE_README points) with `from l0` replaced by `from l0calib`, and checks the
counts they ask for. The README is not ours to copy, so the test is skipped where the file
is absent. The second makes the same calls in our own words and always runs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import l0calib
from l0calib import (
    FeatureGate,
    HardConcrete,
    HybridGate,
    L0Linear,
    SampleGate,
    TemperatureScheduler,
    compute_l0l2_penalty,
    update_temperatures,
)

from .conftest import ROOT

BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _reference_readme() -> Path | None:
    env = os.environ.get("L0CALIB_REFERENCE_README")
    candidates = [Path(env)] if env else []
    candidates.append(ROOT.parent / "shared" / "reference" / "l0-python-README.md")
    return next((p for p in candidates if p.is_file()), None)


def _names_the_examples_assume() -> dict[str, object]:
    """Inputs the README's snippets use without defining (fixed seeds)."""
    g = torch.Generator().manual_seed(0)
    household_weights = torch.rand(10_000, generator=g) * 1000 + 1
    return {
        "__name__": "__reference__",
        "input_data": torch.randn(32, 784, generator=g),
        "target": torch.randint(0, 10, (32,), generator=g),
        "criterion": nn.CrossEntropyLoss(),
        "data": torch.randn(10_000, 1000, generator=g),
        "household_weights": household_weights,
        "weights": household_weights.clone(),
    }


def test_reference_readme_examples_run_with_l0calib() -> None:
    path = _reference_readme()
    if path is None:
        pytest.skip("the reference README is not beside the repository")
    blocks = BLOCK.findall(path.read_text())
    assert blocks, f"no Python examples found in {path}"
    ns = _names_the_examples_assume()
    for i, block in enumerate(blocks):
        code = re.sub(r"^from l0 import", "from l0calib import", block, flags=re.M)
        assert "import l0\n" not in code
        exec(compile(code, f"{path.name}[block {i}]", "exec"), ns)  # reference docs, not user input
        if "SampleGate(" in code:
            assert ns["selected_data"].shape[0] == 1000
            assert len(ns["indices"]) == 1000
            assert len(ns["selected"]) == 1000
            assert (ns["types"] == "l0").sum() == 250
            assert (ns["types"] == "random").sum() == 750
        if "FeatureGate(" in code:
            assert ns["selected_data"].shape == (10_000, 50)
            assert ns["importance"].shape == (1000,)
        if "HardConcrete(" in code:
            assert ns["masked_weights"].shape == (10_000,)


def test_reference_call_shapes() -> None:
    """The same calls in our own words: exact counts, reference argument names."""
    model = nn.Sequential(L0Linear(784, 64, init_sparsity=0.5), nn.ReLU(),
                          L0Linear(64, 10, init_sparsity=0.7))  # fmt: skip
    opt = torch.optim.Adam(model.parameters())
    sched = TemperatureScheduler(initial_temp=1.0, final_temp=0.1)
    x, y = torch.randn(16, 784), torch.randint(0, 10, (16,))
    for epoch in range(3):
        update_temperatures(model, sched.get_temperature(epoch))
        loss = nn.functional.cross_entropy(model(x), y)
        loss = loss + compute_l0l2_penalty(model, l0_lambda=1e-3, l2_lambda=1e-4)
        opt.zero_grad()
        loss.backward()
        opt.step()
    data = torch.randn(2000, 100)
    selected, idx = SampleGate(n_samples=2000, target_samples=200).select_samples(data)
    assert selected.shape == (200, 100)
    assert len(idx) == 200
    hybrid = HybridGate(n_items=2000, l0_fraction=0.25, random_fraction=0.75, target_items=200)
    sel, idx, types = hybrid.select(data)
    assert len(sel) == 200
    assert (types == "random").sum() == 150
    fgate = FeatureGate(n_features=100, max_features=7)
    cols, fidx = fgate.select_features(data)
    assert len(fidx) == 7
    assert cols.shape == (2000, 7)
    assert fgate.get_feature_importance().shape == (100,)
    gates = HardConcrete(2000, temperature=0.25, init_mean=0.999)
    assert (torch.ones(2000) * gates()).shape == (2000,)
    assert l0calib.L0Conv2d(3, 4, 3)(torch.randn(1, 3, 8, 8)).shape == (1, 4, 6, 6)
