"""Counter-based noise: exact 64-bit hashing, shard invariance, and distribution."""

from __future__ import annotations

import pytest
import torch

from l0calib.noise import _mix_int, _mix_tensor, counter_uniform, logistic_noise


@pytest.mark.parametrize("x", [0, 1, -1, 2**63 - 1, -(2**63), 123456789012345, -987654321])
def test_tensor_hash_equals_exact_integer_hash(x: int) -> None:
    got = int(_mix_tensor(torch.tensor([x], dtype=torch.int64))[0]) & (2**64 - 1)
    assert got == _mix_int(x)


def test_values_depend_only_on_seed_draw_and_index() -> None:
    full = counter_uniform(5, 2, torch.arange(1000))
    # any split of the indices (as across ranks) gives the same values
    parts = [counter_uniform(5, 2, torch.arange(a, b)) for a, b in [(0, 1), (1, 600), (600, 1000)]]
    assert torch.equal(torch.cat(parts), full)
    shuffled = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(counter_uniform(5, 2, shuffled), full[shuffled])
    assert not torch.equal(counter_uniform(5, 3, torch.arange(1000)), full)
    assert not torch.equal(counter_uniform(6, 2, torch.arange(1000)), full)


def test_uniform_moments_and_range() -> None:
    # 1e6 draws, seed 0: the mean has sd 2.9e-4 and the variance sd about 7e-5; 5 sd bounds.
    u = counter_uniform(0, 0, torch.arange(1_000_000))
    assert float(u.min()) > 0.0
    assert float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 5 * 2.9e-4
    assert abs(float(u.var()) - 1 / 12) < 5 * 7e-5
    # consecutive draws and neighbouring indices are uncorrelated (sd of r is 1e-3)
    v = counter_uniform(0, 1, torch.arange(1_000_000))
    assert abs(float(torch.corrcoef(torch.stack([u, v]))[0, 1])) < 5e-3
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 5e-3


def test_logistic_noise_is_finite_and_symmetric() -> None:
    # 1e6 draws: the logistic has variance pi^2/3, so the mean has sd 1.8e-3.
    x = logistic_noise(1, 0, torch.arange(1_000_000), dtype=torch.float32)
    assert x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert abs(float(x.mean())) < 5 * 1.8e-3


def test_numpy_and_torch_paths_agree_bit_for_bit() -> None:
    # CPU uses numpy's uint64 arithmetic, other devices the torch int64 version.
    from l0calib.noise import _counter_uniform_numpy, _counter_uniform_torch, _streams

    idx = torch.cat([torch.arange(1000), torch.tensor([2**40, 2**62, 123456789])])
    for seed, draw, count in ((0, 0, 1), (7, 3, 1), (2**63 + 5, -1, 1), (7, 3, 5)):
        streams = _streams(seed, draw, count)
        assert torch.equal(
            _counter_uniform_numpy(streams, idx), _counter_uniform_torch(streams, idx)
        )


def test_a_block_of_draws_equals_the_draws_one_by_one() -> None:
    idx = torch.arange(5, 789).reshape(28, 28)
    block = logistic_noise(3, 10, idx, dtype=torch.float64, count=6)
    assert block.shape == (6, 28, 28)
    for r in range(6):
        assert torch.equal(block[r], logistic_noise(3, 10 + r, idx, dtype=torch.float64))
    block32 = logistic_noise(3, 10, idx, count=6)  # float32: cast after the float64 math
    assert torch.equal(block32[4], logistic_noise(3, 14, idx))
