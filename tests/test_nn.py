"""l0calib.nn: gates per group, the paper's penalty, pruning that shrinks, schedules."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch import nn

from l0calib import ParameterError
from l0calib.nn import (
    L0Conv2d,
    L0DepthwiseConv2d,
    L0Layer,
    L0Linear,
    PenaltyTracker,
    SparseMLP,
    SparsityController,
    TemperatureScheduler,
    compute_l0_penalty,
    compute_l0l2_penalty,
    compute_l2_penalty,
    get_active_parameter_count,
    get_sparsity_stats,
    paper_penalty,
    prune_model,
    update_temperatures,
)


def _scramble(model: nn.Module, seed: int = 0) -> nn.Module:
    """Spread the gate logits so some gates are closed, some open, some in between."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, L0Layer):
                m.gates.log_alpha.copy_(torch.randn(m.gates.log_alpha.shape, generator=g) * 3)
    return model


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)


# ---------------------------------------------------------------------------- layers
def test_structured_linear_gates_input_units() -> None:
    layer = L0Linear(6, 4, seed=0)
    assert layer.gates.log_alpha.shape == (6,)
    assert layer.group_sizes().tolist() == [4.0] * 6
    with torch.no_grad():
        layer.gates.log_alpha.copy_(torch.tensor([-20.0, 20, 20, 20, 20, 20]))
    layer.eval()
    x = torch.randn(3, 6)
    y1 = layer(x)
    x[:, 0] = 1000.0  # input unit 0 is gated off: it cannot matter
    assert torch.allclose(layer(x), y1)


def test_unstructured_linear_gates_each_weight() -> None:
    layer = L0Linear(6, 4, structured=False)
    assert layer.gates.log_alpha.shape == (4, 6)
    assert layer.group_sizes().sum() == 24


def test_train_samples_eval_is_deterministic() -> None:
    layer = L0Linear(10, 3, seed=1)
    x = torch.randn(2, 10)
    assert not torch.equal(layer(x), layer(x))  # two different gate samples
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_conv_gate_removes_channel_and_bias() -> None:
    conv = L0Conv2d(2, 3, 3, padding=1, seed=0)
    with torch.no_grad():
        conv.gates.log_alpha.copy_(torch.tensor([20.0, -20.0, 20.0]))
    conv.eval()
    out = conv(torch.randn(1, 2, 5, 5))
    assert torch.all(out[:, 1] == 0)  # bias included
    assert conv.group_sizes().tolist() == [19.0] * 3  # 2*3*3 weights + bias


def test_invalid_arguments() -> None:
    with pytest.raises(ParameterError, match="init_sparsity"):
        L0Linear(3, 3, init_sparsity=1.0)
    with pytest.raises(ParameterError, match="divisible by groups"):
        L0Conv2d(3, 4, 3, groups=2)
    with pytest.raises(ParameterError, match="target must be in"):
        SparsityController(SparseMLP(4, 4, 2), target=0.0)
    with pytest.raises(ParameterError, match="schedule"):
        TemperatureScheduler(schedule="stepwise")


# ---------------------------------------------------------------------------- penalties
def test_l0l2_penalty_is_the_papers_expectation() -> None:
    model = _scramble(SparseMLP(5, 4, 3, seed=0))
    expected = torch.zeros(())
    for m in model.modules():
        if isinstance(m, L0Linear):
            p = m.gates.get_active_prob()
            norms = (m.weight**2).sum(0)
            expected = expected + (p * (0.3 * m.out_features + 0.7 / 2 * norms)).sum()
    got = compute_l0l2_penalty(model, l0_lambda=0.3, l2_lambda=0.7)
    assert torch.isclose(got, expected)
    assert torch.isclose(
        got, 0.3 * compute_l0_penalty(model) + 0.7 * compute_l2_penalty(model), rtol=1e-6
    )
    assert torch.isclose(paper_penalty(model, 50, l0_lambda=0.3, l2_lambda=0.7), got / 50)


@pytest.mark.parametrize("l2_lambda", [0.0, 0.7])
def test_penalty_gradient_equals_autograd_of_the_formula(l2_lambda: float) -> None:
    # The penalty's gradient is written out by hand; compare it in float64 with autograd
    # through the per-layer formula, on every layer kind (one with its own temperature).
    model = nn.Sequential(
        L0Conv2d(2, 3, 3, seed=1),
        L0Conv2d(3, 4, 1, bias=False, seed=2),
        L0DepthwiseConv2d(4, 3, seed=3),
        nn.Flatten(),
        L0Linear(6, 5, seed=4),
        L0Linear(5, 3, structured=False, temperature=0.4, seed=5),
    ).double()
    _scramble(model)
    params = list(model.parameters())
    got = compute_l0l2_penalty(model, l0_lambda=0.3, l2_lambda=l2_lambda)
    got_grads = torch.autograd.grad(got, params, allow_unused=True)
    want = sum(
        0.3 * m.get_l0_penalty() + l2_lambda * m.get_l2_penalty()
        for m in model.modules()
        if isinstance(m, L0Layer)
    )
    want_grads = torch.autograd.grad(want, params, allow_unused=True)
    assert torch.allclose(got, want, rtol=1e-12)
    for g, w in zip(got_grads, want_grads, strict=True):
        if w is None or not w.any():
            assert g is None or not g.any()  # an ungated bias, or l2 = 0 for the weights
        else:
            assert torch.allclose(g, w, rtol=1e-10, atol=1e-14)


def test_l2_term_never_touches_gate_logits_beyond_the_expectation() -> None:
    # With all weights zero the L2 term is zero and gives the logits no gradient at all.
    layer = L0Linear(4, 2)
    with torch.no_grad():
        layer.weight.zero_()
    compute_l2_penalty(layer).backward()
    assert torch.all(layer.gates.log_alpha.grad == 0)


def _train_digits(l2_lambda: float, epochs: int = 200) -> float:
    x, y = _digits()
    torch.manual_seed(0)
    model = SparseMLP(64, 64, 10, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(epochs):
        loss = nn.functional.cross_entropy(model(x), y)
        loss = loss + compute_l0l2_penalty(model, l0_lambda=3e-4, l2_lambda=l2_lambda)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(model.layers[0].get_sparsity())


@pytest.mark.slow  # statistical: trains a network
def test_adding_l2_does_not_stop_pruning() -> None:
    """Fixed seeds, sklearn digits. The reference package's L2 on the gate logits pulled
    them toward zero and stopped pruning; here L2 only adds to the cost of open gates."""
    without = _train_digits(0.0)
    with_l2 = _train_digits(1e-2)
    assert without > 0.2
    assert with_l2 >= without


def test_sparse_mlp_samples_its_gates_jointly_as_layer_by_layer() -> None:
    import copy

    torch.manual_seed(0)
    model = SparseMLP(20, (16, 8), 3, seed=5)
    layered = copy.deepcopy(model)
    x = torch.randn(7, 20)
    for _ in range(3):
        out = model(x)
        h = x
        for module in layered.layers:
            h = module(h)
        torch.testing.assert_close(out, h, rtol=1e-5, atol=1e-6)
        out.square().sum().backward()
        h.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), layered.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    model.eval()
    layered.eval()
    assert torch.equal(model(x), layered.layers(x))


def test_sparse_mlp_keeps_its_gate_logits_in_one_parameter() -> None:
    import copy

    model = SparseMLP(12, (10, 6), 3, seed=1)
    bank = model.gate_log_alpha
    names = [n for n, _ in model.named_parameters()]
    assert sum("log_alpha" in n for n in names) == 1
    assert bank.shape == (12 + 10 + 6,)
    first = model.layers[0].gates.log_alpha
    assert first.shape == (12,)
    assert first.data_ptr() == bank.data_ptr()  # a view, not a copy
    with torch.no_grad():
        model.layers[2].gates.log_alpha.fill_(3.0)  # writes through to the shared parameter
    assert torch.all(bank[12:22] == 3.0)
    # Old per-layer state_dicts still load; the state survives deepcopy and dtype moves.
    state = model.state_dict()
    old = {k: v for k, v in state.items() if k != "gate_log_alpha"}
    for i, (a, b) in zip((0, 2, 4), ((0, 12), (12, 22), (22, 28)), strict=True):
        old[f"layers.{i}.gates.log_alpha"] = state["gate_log_alpha"][a:b].clone()
    other = SparseMLP(12, (10, 6), 3, seed=2)
    other.load_state_dict(old)
    assert torch.equal(other.gate_log_alpha, bank)
    nested = nn.Sequential(SparseMLP(12, (10, 6), 3, seed=3))  # under a prefix, keys reversed
    nested.load_state_dict({f"0.{k}": old[k] for k in reversed(list(old))})
    assert torch.equal(nested[0].gate_log_alpha, bank)
    twin = copy.deepcopy(model).double()
    assert twin.layers[4].gates.log_alpha.dtype == torch.float64
    assert torch.equal(twin.layers[4].gates.log_alpha, bank[22:].double())
    assert twin.gate_log_alpha.data_ptr() != bank.data_ptr()
    # one gate tensor for the optimiser, with every layer's gradient in it
    x = torch.randn(5, 12)
    model(x).square().sum().backward()
    assert bank.grad is not None
    assert bank.grad.shape == bank.shape
    assert all(bool(bank.grad[a:b].abs().sum() > 0) for a, b in ((0, 12), (12, 22), (22, 28)))


@pytest.mark.slow  # statistical: trains a network
def test_sparsity_controller_holds_the_target_while_training() -> None:
    x, y = _digits()
    torch.manual_seed(0)
    model = SparseMLP(64, 64, 10, seed=0)
    ctrl = SparsityController(model, target=0.25, warmup=100)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    densities = []
    for _ in range(300):
        loss = nn.functional.cross_entropy(model(x), y) + ctrl.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctrl.step()
        densities.append(float(ctrl.density().detach()))
    assert ctrl.start == pytest.approx(0.5, abs=1e-2)  # init_sparsity=0.5 is P(z == 0)
    assert densities[24] == pytest.approx(ctrl.start + (0.25 - ctrl.start) * 25 / 100, abs=1e-4)
    assert densities[-1] == pytest.approx(0.25, abs=1e-4)
    # The optimiser, not the shift, chose which gates: they have separated.
    p = model.layers[0].gates.get_active_prob().detach()
    assert float(p.max()) > 0.9
    assert float(p.min()) < 0.05
    state = ctrl.state_dict()
    other = SparsityController(model, target=0.5)
    other.load_state_dict(state)
    assert other.goal() == ctrl.goal()


def test_lagrangian_mode_raises_its_multiplier_above_target() -> None:
    model = SparseMLP(10, 8, 2, seed=0)  # density 0.5 at start
    ctrl = SparsityController(model, target=0.25, mode="lagrangian", lr=1.0)
    assert ctrl.step() == pytest.approx(ctrl.start - 0.25, abs=1e-6)
    penalty = ctrl.penalty()
    penalty.backward()
    grads = model.gate_log_alpha.grad  # every layer's logits: one shared parameter
    assert torch.all(grads > 0)  # descending closes gates


def test_sparsity_stats_and_active_count() -> None:
    model = _scramble(SparseMLP(8, 6, 2, seed=0)).eval()
    stats = get_sparsity_stats(model)
    first = stats["layers.0"]
    layer = model.layers[0]
    open_ = int(layer.open_gates().sum())
    assert first["active_groups"] == open_
    assert first["active_params"] == open_ * 6
    gated_active = sum(s["active_params"] for s in stats.values())
    biases = 6 + 2  # L0Linear biases are not gated
    assert get_active_parameter_count(model) == gated_active + biases


# ---------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("structured", [True, False])
def test_pruned_mlp_is_smaller_and_equal(structured: bool) -> None:
    model = _scramble(SparseMLP(30, (20, 12), 5, structured=structured, seed=0)).eval()
    small = prune_model(model).eval()
    x = torch.randn(7, 30)
    assert torch.allclose(model(x), small(x), atol=1e-5)
    assert not any(isinstance(m, L0Layer) for m in small.modules())
    if structured:
        assert sum(p.numel() for p in small.parameters()) < sum(
            p.numel() for n, p in model.named_parameters() if "log_alpha" not in n
        )


def test_pruned_lenet_drops_channels_and_neurons() -> None:
    model = nn.Sequential(
        L0Conv2d(1, 6, 5, padding=2, seed=0), nn.ReLU(), nn.MaxPool2d(2),
        L0Conv2d(6, 16, 5, seed=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        L0Linear(16 * 5 * 5, 120, seed=2), nn.ReLU(), L0Linear(120, 10, seed=3),
    )  # fmt: skip
    _scramble(model, seed=3).eval()
    small = prune_model(model).eval()
    x = torch.randn(4, 1, 28, 28)
    assert torch.allclose(model(x), small(x), atol=1e-4)
    convs = [m for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].out_channels == int(model[0].open_gates().sum())
    assert convs[1].out_channels <= int(model[3].open_gates().sum())


def test_pruned_depthwise_and_standalone_layers() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dw = nn.Sequential(L0Conv2d(3, 8, 3, seed=0), nn.ReLU(),
                                    L0DepthwiseConv2d(8, 3, seed=1))  # fmt: skip
            self.head = L0Linear(8, 2, seed=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.dw(x).mean((2, 3)))

    model = _scramble(Net(), seed=5).eval()
    small = prune_model(model).eval()
    x = torch.randn(2, 3, 9, 9)
    assert torch.allclose(model(x), small(x), atol=1e-5)


def test_fine_tuning_cannot_revive_pruned_weights() -> None:
    model = _scramble(SparseMLP(10, 8, 3, structured=False, seed=0)).eval()
    small = prune_model(model)
    first = next(m for m in small.modules() if isinstance(m, nn.Linear))
    zero_before = first.weight == 0
    assert zero_before.any()
    opt = torch.optim.SGD(small.parameters(), lr=0.5)
    for _ in range(5):
        loss = small(torch.randn(16, 10)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.all(first.weight[zero_before] == 0)


# ---------------------------------------------------------------------------- schedules
def test_temperature_schedules() -> None:
    assert TemperatureScheduler().get_temperature(50) == pytest.approx(2 / 3)  # the paper's
    s = TemperatureScheduler(initial_temp=1.0, final_temp=0.1, anneal_epochs=10)
    assert s.get_temperature(0) == 1.0
    assert s.get_temperature(10) == 0.1
    assert s.get_temperature(5) == pytest.approx(0.1**0.5)
    lin = TemperatureScheduler(1.0, 0.0 + 0.5, 10, schedule="linear")
    assert lin.get_temperature(5) == pytest.approx(0.75)
    cos = TemperatureScheduler(1.0, 0.5, 10, schedule="cosine")
    assert cos.get_temperature(5) == pytest.approx(0.75)
    model = SparseMLP(4, 4, 2)
    update_temperatures(model, 0.3)
    assert all(m.temperature == 0.3 for m in model.modules() if isinstance(m, L0Layer))


def test_penalty_tracker(tmp_path: Path) -> None:
    t = PenaltyTracker()
    for v in (1.0, 2.0, 3.0):
        t.log("loss", v)
    t.log("l0", torch.tensor(5.0))
    assert t.get_history("loss") == [1.0, 2.0, 3.0]
    assert t.get_stats("loss")["mean"] == 2.0
    assert t.get_stats("missing") == {}
    t.save_to_csv(tmp_path / "h.csv")
    with open(tmp_path / "h.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "l0", "loss"]
    assert rows[2] == ["1", "", "2.0"]
    t.clear()
    assert t.get_history("loss") == []
