"""HardConcrete: the distribution, the L0 surrogate, reproducibility and argument checks.

Statistical tests use fixed seeds and state their tolerance in standard deviations.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from l0calib import HardConcrete, ParameterError


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------- shapes and reference call
def test_reference_call_shape() -> None:
    weights = torch.full((500,), 1500.0)
    gates = HardConcrete(len(weights), temperature=0.25, init_mean=0.999)
    masked = weights * gates()
    assert masked.shape == (500,)
    assert gates.temperature == 0.25


@pytest.mark.parametrize(("args", "shape"), [((7,), (7,)), ((7, 3), (7, 3)), ((1,), (1,))])
def test_shapes(args: tuple[int, ...], shape: tuple[int, ...]) -> None:
    hc = HardConcrete(*args, seed=0)
    assert hc().shape == shape
    assert hc.shape == shape
    hc.eval()
    assert hc().shape == shape
    assert hc.get_active_prob().shape == shape
    assert hc.get_penalty().shape == ()


# ---------------------------------------------------------------- the distribution
def test_nonzero_frequency_matches_active_prob() -> None:
    # 4 groups of 1,000 gates with different log_alpha; 400 draws, seed 0. For each group
    # the mean non-zero fraction has sd sqrt(p(1-p)/400000) <= 7.9e-4: tolerance 5 sd.
    hc = HardConcrete(4000, temperature=0.5, seed=0)
    with torch.no_grad():
        hc.log_alpha.copy_(torch.tensor([-2.0, -0.5, 0.3, 2.0]).repeat_interleave(1000))
    draws = 400
    nonzero = torch.zeros(4000, dtype=torch.float64)
    for _ in range(draws):
        nonzero += (hc.sample() > 0).double()
    freq = (nonzero / draws).reshape(4, 1000).mean(dim=1)
    prob = hc.get_active_prob().detach().double().reshape(4, 1000).mean(dim=1)
    sd = torch.sqrt(prob * (1 - prob) / (draws * 1000))
    assert torch.all((freq - prob).abs() < 5 * sd), (freq, prob)


def test_exact_zeros_and_ones_occur() -> None:
    hc = HardConcrete(10_000, init_mean=0.5, seed=1)
    z = hc.sample()
    assert (z == 0).any()
    assert (z == 1).any()
    assert ((z > 0) & (z < 1)).any()


def test_penalty_formula() -> None:
    hc = HardConcrete(3, temperature=0.4, stretch=0.2, seed=0)
    with torch.no_grad():
        hc.log_alpha.copy_(torch.tensor([-1.0, 0.0, 3.0]))
    shift = 0.4 * math.log(0.2 / 1.2)
    expected = [_sigmoid(a - shift) for a in (-1.0, 0.0, 3.0)]
    assert hc.get_active_prob().tolist() == pytest.approx(expected, rel=1e-6)
    assert float(hc.get_penalty().detach()) == pytest.approx(sum(expected), rel=1e-6)


def test_zero_stretch_is_never_exactly_zero() -> None:
    hc = HardConcrete(1000, stretch=0.0, seed=0)
    assert torch.all(hc.get_active_prob() == 1)
    assert float(hc.get_penalty()) == 1000


def test_gradients_reach_log_alpha_through_samples() -> None:
    hc = HardConcrete(2000, init_mean=0.5, seed=3)
    z = hc.rsample()
    (z * torch.linspace(1, 2, 2000)).sum().backward()
    grad = hc.log_alpha.grad
    assert grad is not None
    inside = (z > 0) & (z < 1)
    assert inside.any()
    assert torch.all(grad[inside] > 0)  # increasing log_alpha opens a gate
    assert torch.all(grad[~inside] == 0)  # clamped gates carry no gradient


def test_penalty_gradient() -> None:
    hc = HardConcrete(5, seed=0)
    hc.get_penalty().backward()
    p = hc.get_active_prob().detach()
    assert torch.allclose(hc.log_alpha.grad, p * (1 - p))


# ---------------------------------------------------------------- train / eval
def test_train_draws_differ_eval_is_deterministic() -> None:
    hc = HardConcrete(100, seed=0)
    assert not torch.equal(hc(), hc())
    hc.eval()
    a, b = hc(), hc()
    assert torch.equal(a, b)
    assert torch.equal(a, hc.test_gates())
    hc.train()
    assert not torch.equal(hc(), hc())


def test_test_gate_estimators_differ_as_documented() -> None:
    hc = HardConcrete(2, temperature=2 / 3, seed=0)
    with torch.no_grad():
        hc.log_alpha.copy_(torch.tensor([1.0, -1.0]))
    paper = hc.test_gates("paper").tolist()
    median = hc.test_gates("median").tolist()
    assert paper == pytest.approx([_sigmoid(1.0) * 1.2 - 0.1, _sigmoid(-1.0) * 1.2 - 0.1])
    assert median == pytest.approx([_sigmoid(1.5) * 1.2 - 0.1, _sigmoid(-1.5) * 1.2 - 0.1])
    # median pushes toward 0/1 when beta < 1
    assert median[0] > paper[0]
    assert median[1] < paper[1]
    # the paper's estimator ignores the temperature, the median does not
    hc.temperature = 0.1
    assert hc.test_gates("paper").tolist() == pytest.approx(paper)
    assert hc.test_gates("median").tolist() == pytest.approx([1.0, 0.0])
    # at beta = 1 the two coincide
    hc.temperature = 1.0
    assert torch.allclose(hc.test_gates("paper"), hc.test_gates("median"))


def test_default_test_gate_is_paper_and_median_is_an_option() -> None:
    hc = HardConcrete(4, seed=0, test_gate="median")
    hc.eval()
    assert torch.equal(hc(), hc.test_gates("median"))
    assert HardConcrete(4, seed=0).test_gate == "paper"


def test_num_active_and_sparsity() -> None:
    hc = HardConcrete(4, seed=0)
    with torch.no_grad():
        hc.log_alpha.copy_(torch.tensor([-10.0, -10.0, 0.0, 10.0]))
    assert hc.get_num_active() == 2
    assert hc.get_sparsity() == pytest.approx(0.5)


def test_init_mean_sets_sigmoid_log_alpha() -> None:
    hc = HardConcrete(20_000, init_mean=0.9, init_std=0.01, seed=0)
    mean = torch.sigmoid(hc.log_alpha.detach()).mean().item()
    assert mean == pytest.approx(0.9, abs=1e-3)
    assert hc.log_alpha.detach().std().item() == pytest.approx(0.01, rel=0.05)


# ---------------------------------------------------------------- reproducibility
def test_seed_reproduces_init_and_draws_without_global_rng() -> None:
    state = torch.get_rng_state()
    a, b = HardConcrete(50, seed=7), HardConcrete(50, seed=7)
    assert torch.equal(a.log_alpha, b.log_alpha)
    for _ in range(3):
        assert torch.equal(a.sample(), b.sample())
    assert torch.equal(torch.get_rng_state(), state)
    c = HardConcrete(50, seed=8)
    assert not torch.equal(a.log_alpha, c.log_alpha)


def test_generator_reproduces_draws() -> None:
    a = HardConcrete(50, generator=torch.Generator().manual_seed(3))
    b = HardConcrete(50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.log_alpha, b.log_alpha)
    assert torch.equal(a.sample(), b.sample())


def test_state_dict_resumes_the_draw_sequence() -> None:
    a = HardConcrete(30, seed=11)
    a.sample()
    state = {k: v.clone() for k, v in a.state_dict().items()}
    expected = a.sample()
    b = HardConcrete(30, seed=11)
    b.load_state_dict(state)
    assert torch.equal(b.sample(), expected)


def test_seeded_draws_follow_the_counter_across_noise_blocks() -> None:
    # A small gate vector takes its noise in blocks of draws; every draw must still be the
    # one its (seed, draw, index) keys, also after a state_dict jumps the counter.
    from l0calib.hardconcrete import _NOISE_BLOCK
    from l0calib.noise import logistic_noise

    a = HardConcrete(40, temperature=0.5, seed=3, index_offset=7, dtype=torch.float64)
    la = a.log_alpha.detach()
    idx = torch.arange(7, 47)
    draws = _NOISE_BLOCK + 5
    got = [a.sample() for _ in range(draws)]
    for d in (0, 1, _NOISE_BLOCK - 1, _NOISE_BLOCK, draws - 1):
        s = torch.sigmoid((logistic_noise(3, d, idx, dtype=torch.float64) + la) / 0.5)
        assert torch.allclose(got[d], (s * 1.2 - 0.1).clamp(0, 1), rtol=1e-14, atol=1e-15)
    b = HardConcrete(40, temperature=0.5, seed=3, index_offset=7, dtype=torch.float64)
    b.sample()  # fills b's first block
    b.load_state_dict({"log_alpha": la, "draws": torch.tensor(draws - 3)})
    assert torch.equal(b.sample(), got[draws - 3])


def test_draw_counter_survives_state_dict_round_trips() -> None:
    # The counter is read as a Python int between steps; a state_dict taken earlier keeps
    # its count, and a load (in place) or a reset is seen at once.
    a = HardConcrete(30, seed=2)
    for _ in range(3):
        a.sample()
    early = a.state_dict()
    a.sample()
    assert int(early["draws"]) == 3
    assert int(a.draws) == 4
    a.load_state_dict(early)
    assert int(a.draws) == 3
    expected = a.sample()
    a.load_state_dict(early)
    assert torch.equal(a.sample(), expected)
    a.reset_parameters()
    assert int(a.draws) == 0


def test_rsample_jointly_equals_one_by_one() -> None:
    import copy

    from l0calib.hardconcrete import rsample_jointly

    mods = [
        HardConcrete(n, temperature=0.5, seed=i, init_std=1.0) for i, n in enumerate((40, 17, 3))
    ]
    mods.append(HardConcrete(2, 3, temperature=0.5, seed=9, init_std=1.0))  # a 2-d gate
    same = copy.deepcopy(mods)
    for _ in range(70):  # across a block of cached noise
        joint = rsample_jointly(mods)
        alone = [m.rsample() for m in same]
        for z, ref in zip(joint, alone, strict=True):
            assert z.shape == ref.shape
            # to rounding: torch's scalar tail loop may round the last bit differently
            torch.testing.assert_close(z, ref, rtol=1e-6, atol=1e-7)
        sum(((z - 0.3) ** 2).sum() for z in joint).backward()
        sum(((z - 0.3) ** 2).sum() for z in alone).backward()
    for m, ref in zip(mods, same, strict=True):
        assert int(m.draws) == int(ref.draws) == 70
        torch.testing.assert_close(m.log_alpha.grad, ref.log_alpha.grad, rtol=1e-5, atol=1e-6)
    # Modules that cannot share one chain are sampled one by one: then bit for bit equal.
    odd = [HardConcrete(5, temperature=0.5, seed=1), HardConcrete(5, temperature=0.3, seed=2)]
    ref = copy.deepcopy(odd)
    for z, r in zip(rsample_jointly(odd), [m.rsample() for m in ref], strict=True):
        assert torch.equal(z, r)


def test_share_log_alpha_keeps_values_and_streams() -> None:
    import copy

    from torch import nn

    from l0calib.hardconcrete import share_log_alpha

    mods = [HardConcrete(4, seed=1, init_std=1.0), HardConcrete(2, 3, seed=2, init_std=1.0)]
    alone = copy.deepcopy(mods)
    owner = nn.Module()
    owner.gates = nn.ModuleList(mods)
    bank = share_log_alpha(mods, owner)
    assert [n for n, _ in owner.named_parameters()] == ["gate_log_alpha"]
    for m, ref in zip(mods, alone, strict=True):
        assert torch.equal(m.log_alpha, ref.log_alpha)
        assert torch.equal(m.sample(), ref.sample())  # same noise stream
    assert "gates.1.draws" in owner.state_dict()
    with pytest.raises(ParameterError, match="already shared"):
        share_log_alpha(mods, owner, "again")
    with pytest.raises(ParameterError, match="dtype or device"):
        share_log_alpha([HardConcrete(2), HardConcrete(2, dtype=torch.float64)], nn.Module())
    assert bank.numel() == 10


def test_shift_jointly_equals_one_by_one_shared_or_not() -> None:
    import copy

    from torch import nn

    from l0calib.hardconcrete import share_log_alpha, shift_jointly

    def make() -> list[HardConcrete]:
        return [HardConcrete(n, seed=i, init_std=2.0, temperature=t)
                for i, (n, t) in enumerate(((300, 0.5), (40, 0.5), (7, 0.3)))]  # fmt: skip

    alone, joint, shared = make(), make(), make()
    owner = nn.Module()
    owner.gates = nn.ModuleList(shared)
    share_log_alpha(shared, owner)
    for goals in ([30.0, 20.0, 3.5], [31.0, 19.0, 3.6], [250.0, 1.0, 6.9]):  # small, large moves
        ref = [m.shift_to_expected(g) for m, g in zip(alone, goals, strict=True)]
        for mods in (joint, shared):
            got = shift_jointly(mods, goals)
            assert got == pytest.approx(ref, rel=1e-9, abs=1e-9)
            for m, r, g in zip(mods, alone, goals, strict=True):
                torch.testing.assert_close(m.log_alpha, r.log_alpha, rtol=1e-6, atol=1e-6)
                assert float(m.get_active_prob().detach().double().sum()) == pytest.approx(
                    g, rel=1e-6
                )
    with pytest.raises(ParameterError, match="goal must be in"):
        shift_jointly(shared, [1.0, 41.0, 1.0])
    with pytest.raises(ParameterError, match="3 modules and 2 goals"):
        shift_jointly(shared, [1.0, 1.0])
    copy.deepcopy(owner)  # the shared views are made on access: nothing to copy


def test_copies_and_pickles_leave_the_noise_caches_behind() -> None:
    import copy
    import io

    from l0calib.hardconcrete import rsample_jointly

    mods = [HardConcrete(300, seed=1), HardConcrete(100, seed=2)]
    rsample_jointly(mods)
    mods[0].sample()
    twin = copy.deepcopy(mods)
    assert twin[0]._noise_cache is None
    assert twin[0]._joint_cache is None
    buf = io.BytesIO()
    torch.save(mods[0], buf)
    assert len(buf.getvalue()) < 20_000  # logits, counter and module state; no noise block
    for m, t in zip(mods, twin, strict=True):
        assert torch.equal(m.sample(), t.sample())  # same draw next, from a rebuilt cache


def test_external_uniforms_are_used() -> None:
    hc = HardConcrete(3, temperature=0.5, seed=0)
    with torch.no_grad():
        hc.log_alpha.zero_()
    u = torch.tensor([0.5, 1e-9, 1 - 1e-9])
    z = hc.sample(u)
    assert z.tolist() == pytest.approx([0.5, 0.0, 1.0])
    assert int(hc.draws) == 0  # the module's own stream did not advance
    with pytest.raises(ParameterError, match="shape"):
        hc.sample(torch.rand(4))


# ---------------------------------------------------------------- dtypes and saturation
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_and_saturated_logits_stay_finite(dtype: torch.dtype) -> None:
    hc = HardConcrete(6, seed=0, dtype=dtype)
    big = torch.finfo(dtype).max
    with torch.no_grad():
        hc.log_alpha.copy_(torch.tensor([-big, -1e4, -30.0, 30.0, 1e4, big]).to(dtype))
    z = hc.rsample()
    assert z.dtype == dtype
    assert torch.isfinite(z).all()
    assert z[:3].tolist() == [0.0, 0.0, 0.0]
    assert z[3:].tolist() == [1.0, 1.0, 1.0]
    z.sum().backward()
    assert torch.isfinite(hc.log_alpha.grad).all()
    for t in (hc.test_gates("paper"), hc.test_gates("median"), hc.get_active_prob()):
        assert torch.isfinite(t).all()
    assert torch.isfinite(hc.get_penalty())


@settings(max_examples=200, deadline=None)
@given(
    log_alpha=st.lists(
        st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=20
    ),
    temperature=st.floats(min_value=1e-3, max_value=10.0),
    stretch=st.floats(min_value=0.0, max_value=2.0),
    seed=st.integers(min_value=0, max_value=2**40),
)
def test_gates_always_in_unit_interval(
    log_alpha: list[float], temperature: float, stretch: float, seed: int
) -> None:
    hc = HardConcrete(len(log_alpha), temperature=temperature, stretch=stretch, seed=seed)
    with torch.no_grad():
        hc.log_alpha.copy_(torch.tensor(log_alpha))
    for z in (hc.sample(), hc.test_gates("paper"), hc.test_gates("median")):
        assert torch.all((z >= 0) & (z <= 1))
    p = hc.get_active_prob()
    assert torch.all((p >= 0) & (p <= 1))


# ---------------------------------------------------------------- argument checks
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_dim": 0}, "input_dim must be a positive integer, got 0"),
        ({"input_dim": 2.5}, "input_dim must be a positive integer"),
        ({"input_dim": 3, "output_dim": -1}, "output_dim must be a positive integer"),
        ({"input_dim": 3, "init_mean": 1.0}, "init_mean must be strictly between 0 and 1"),
        ({"input_dim": 3, "init_mean": 0.0}, "init_mean must be strictly between 0 and 1"),
        ({"input_dim": 3, "temperature": 0.0}, "temperature must be > 0, got 0.0"),
        ({"input_dim": 3, "temperature": float("nan")}, "temperature must be a finite number"),
        ({"input_dim": 3, "stretch": -0.1}, "stretch must be >= 0, got -0.1"),
        ({"input_dim": 3, "init_std": -1.0}, "init_std must be >= 0"),
        ({"input_dim": 3, "test_gate": "mean"}, "test_gate must be one of"),
        ({"input_dim": 3, "dtype": torch.int64}, "dtype must be a floating dtype"),
        (
            {"input_dim": 3, "seed": 1, "generator": torch.Generator()},
            "give seed or generator, not both",
        ),
    ],
)
def test_invalid_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ParameterError, match=message.replace("(", r"\(")):
        HardConcrete(**kwargs)


def test_temperature_setter_validates() -> None:
    hc = HardConcrete(3)
    with pytest.raises(ParameterError, match="temperature must be > 0"):
        hc.temperature = -1.0
    assert isinstance(ParameterError("x"), ValueError)


def test_small_shifts_are_solved_in_one_pass_within_tolerance() -> None:
    # After an optimiser step the goal moves a little: the quadratic model's step, with the
    # third-derivative bound, must be accepted after one pass and still meet the goal.
    from l0calib.hardconcrete import _solve_shift

    x = np.random.default_rng(0).normal(0.0, 2.0, 5000)
    calls = []

    def sums(b: float) -> list[float]:
        calls.append(b)
        p = 1.0 / (1.0 + np.exp(b - x))
        return [p.sum(), (p * p).sum(), (p**3).sum()]

    start = sums(0.0)[0]
    for drift, most_passes in ((0.5, 1), (-3.0, 1), (400.0, 6)):
        calls.clear()
        goal = start + drift
        b = _solve_shift(sums, goal, x.size, float(x.min()) - 50, float(x.max()) + 50)
        assert len(calls) <= most_passes
        exact = (1.0 / (1.0 + np.exp(b - x))).sum()
        assert abs(exact - goal) <= 1e-6 * goal
