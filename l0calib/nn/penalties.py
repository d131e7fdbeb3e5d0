"""Penalties, sparsity statistics, a target-sparsity controller and temperature schedules.

The paper's expected penalty (Louizos et al. 2017, eq. 14 with the L2 term of section 3.2)
over the gated parameter groups ``g`` of every L0 layer::

    sum_g P(z_g != 0) * (l0_lambda * |g| + l2_lambda / 2 * ||theta_g||^2)

It is taken over gated parameters only, never over the gate logits: an L2 term on the
logits (as the reference package adds) pulls them toward 0, i.e. toward keep-probability
~0.5-0.7, and fights the pruning. The paper writes the penalty per training example: pass
the training-set size to :func:`paper_penalty` to use its ``lambda / N`` convention.
"""

from __future__ import annotations

import csv
import math
import os
import weakref
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

from l0calib._checks import finite, nonneg, positive_int
from l0calib.exceptions import ParameterError
from l0calib.hardconcrete import _WORK_DTYPES, HardConcrete, _shared_run, shift_jointly
from l0calib.nn.layers import L0Layer

__all__ = [
    "PenaltyTracker",
    "SparsityController",
    "TemperatureScheduler",
    "compute_l0_penalty",
    "compute_l0l2_penalty",
    "compute_l2_penalty",
    "get_active_parameter_count",
    "get_sparsity_stats",
    "paper_penalty",
    "update_temperatures",
]


def l0_layers(model: nn.Module) -> Iterator[tuple[str, L0Layer]]:
    """Every L0 layer of ``model`` with its qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, L0Layer):
            yield name, module


def _zero(model: nn.Module) -> torch.Tensor:
    p = next(model.parameters(), None)
    return torch.zeros((), device=p.device if p is not None else None)


class _ExpectedPenalty(torch.autograd.Function):
    """``sum_g P(z_g != 0) * (l0_lambda * |g| + l2_lambda / 2 * ||theta_g||^2)`` over the
    groups of ``layers`` (``l2_lambda > 0``), with its gradient written out, as one
    autograd node: autograd through the squared group norms would add several passes over
    every gated weight per training step.

    Inputs after ``(layers, l0_lambda, l2_lambda)``: each layer's ``log_alpha``, then each
    layer's tensors of ``layer.gated_parameters()``. With ``p = P(z_g != 0) =
    sigmoid(log_alpha - c)`` and ``cost_g`` the bracket above::

        d/d log_alpha_g = p (1 - p) cost_g        d/d theta = l2_lambda * p_g * theta
    """

    @staticmethod
    def forward(ctx, layers, l0_lambda, l2_lambda, *tensors):  # type: ignore[override]
        ctx.layers, ctx.l2_lambda = layers, l2_lambda
        ctx.shapes = [(a.shape, a.dtype) for a in tensors[: len(layers)]]
        ctx.save_for_backward(*tensors[len(layers) :])
        p = _active_probs(layers)
        cost = _group_sizes(layers).to(p.dtype) * l0_lambda
        sq = torch.cat([layer.group_sq_norms().flatten() for layer in layers])
        cost.add_(sq.to(p.dtype), alpha=l2_lambda / 2)
        # d p / d log_alpha = p (1 - p): 0 for a layer without stretch (p == 1 exactly).
        ctx.slope, ctx.p = p * (1 - p) * cost, p
        return torch.dot(p, cost)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        counts = [shape.numel() for shape, _ in ctx.shapes]
        slopes = (ctx.slope * grad).split(counts)
        grads = [
            s.view(shape) if s.dtype == dtype else s.view(shape).to(dtype)
            for s, (shape, dtype) in zip(slopes, ctx.shapes, strict=True)
        ]
        thetas = iter(ctx.saved_tensors)
        scales = (ctx.p * (grad * ctx.l2_lambda)).split(counts)
        for layer, scale, (shape, _) in zip(ctx.layers, scales, ctx.shapes, strict=True):
            for _, spread in layer.gated_parameters():
                theta = next(thetas)
                grads.append(theta * spread(scale.view(shape)).to(theta.dtype))
        return (None, None, None, *grads)


def _active_probs(layers: list[L0Layer]) -> torch.Tensor:
    """``P(z_g != 0)`` of every gate of ``layers``, concatenated (flattened)."""
    gates = [layer.gates for layer in layers]
    shifts = {g._count_shift() if g.stretch else None for g in gates}
    if len(shifts) == 1 and None not in shifts:
        shared = _shared_run(gates)  # a SparseMLP's logits: already one tensor
        if shared is None or shared.dtype not in _WORK_DTYPES:
            shared = torch.cat([g._work().flatten() for g in gates])
        return torch.sigmoid(shared - shifts.pop())
    # layers with different temperatures or stretches
    return torch.cat([g.get_active_prob().flatten() for g in gates])


def _group_sizes(layers: list[L0Layer]) -> torch.Tensor:
    return torch.cat([layer.group_sizes().flatten() for layer in layers])


# Per model: the L0 cost vector ``l0_lambda * |g|`` of its gates, concatenated, with the key
# it was made for (the layers, which the model keeps alive, their gate shapes, the lambda,
# dtype and device): it is the same every training step, and making it costs more tensor
# operations than using it.
_COSTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)


def _l0_costs(
    model: nn.Module, layers: list[L0Layer], l0_lambda: float, like: torch.Tensor
) -> torch.Tensor:
    key = (
        tuple((id(m), m.gates.shape) for m in layers), l0_lambda, like.dtype, like.device,
    )  # fmt: skip
    cached = _COSTS.get(model)
    if cached is None or cached[0] != key:
        cached = (key, _group_sizes(layers).to(like.dtype) * l0_lambda)
        _COSTS[model] = cached
    return cached[1]


def _expected_penalty(model: nn.Module, l0_lambda: float, l2_lambda: float) -> torch.Tensor:
    layers = [layer for _, layer in l0_layers(model)]
    if not layers:
        return _zero(model)
    devices = {layer.gates._logits().device for layer in layers}
    if len(devices) > 1:  # a model spread over devices: layer by layer, summed on the first
        first = layers[0].gates._logits().device
        terms = [l0_lambda * m.get_l0_penalty() + l2_lambda * m.get_l2_penalty() for m in layers]
        return sum(t.to(first) for t in terms)  # type: ignore[return-value]
    if not l2_lambda:
        # Gates alone: plain autograd through a few concatenated ops is the cheaper way.
        p = _active_probs(layers)
        return torch.dot(p, _l0_costs(model, layers, l0_lambda, p))
    tensors = [layer.gates.log_alpha for layer in layers]
    tensors += [param for layer in layers for param, _ in layer.gated_parameters()]
    return _ExpectedPenalty.apply(layers, float(l0_lambda), float(l2_lambda), *tensors)


def compute_l0_penalty(model: nn.Module) -> torch.Tensor:
    """Expected number of non-zero gated parameters, ``sum_g P(z_g != 0) * |g|``."""
    return _expected_penalty(model, 1.0, 0.0)


def compute_l2_penalty(model: nn.Module) -> torch.Tensor:
    """Expected L2 term, ``sum_g P(z_g != 0) * ||theta_g||^2 / 2`` (gated parameters only)."""
    return _expected_penalty(model, 0.0, 1.0)


def compute_l0l2_penalty(
    model: nn.Module, l0_lambda: float = 1e-3, l2_lambda: float = 1e-4
) -> torch.Tensor:
    """``sum_g P(z_g != 0) * (l0_lambda * |g| + l2_lambda / 2 * ||theta_g||^2)``.

    Parameters
    ----------
    model : nn.Module containing L0 layers
    l0_lambda : float, default 1e-3
        Cost of each expected non-zero parameter.
    l2_lambda : float, default 1e-4
        Weight decay on the gated parameters, in expectation over the gates.

    Example
    -------
    >>> from l0calib.nn import L0Linear
    >>> layer = L0Linear(10, 4)
    >>> p = compute_l0l2_penalty(layer, l0_lambda=1.0, l2_lambda=0.0)
    >>> bool(torch.isclose(p, compute_l0_penalty(layer)))
    True
    """
    nonneg("l0_lambda", l0_lambda)
    nonneg("l2_lambda", l2_lambda)
    return _expected_penalty(model, l0_lambda, l2_lambda)


def paper_penalty(
    model: nn.Module, n_train: int, *, l0_lambda: float, l2_lambda: float = 0.0
) -> torch.Tensor:
    """The penalty as the paper writes it, per training example: ``compute_l0l2_penalty /
    n_train``, added to the *mean* data loss of a minibatch.

    The paper's MNIST settings, for example, are ``l0_lambda=0.1`` (LeNet-300-100) and the
    ``lambda / N`` scaling with ``N = 60,000`` (Louizos et al. 2017, section 4.1).
    """
    positive_int("n_train", n_train)
    nonneg("l0_lambda", l0_lambda)
    nonneg("l2_lambda", l2_lambda)
    return _expected_penalty(model, l0_lambda / n_train, l2_lambda / n_train)


@torch.no_grad()
def get_sparsity_stats(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per L0 layer: ``total_params`` (gated), ``active_params`` (test-time), ``sparsity``,
    ``total_groups``, ``active_groups``, ``expected_active`` (``sum P(z != 0) * |g|``)."""
    stats = {}
    for name, layer in l0_layers(model):
        sizes = layer.group_sizes().double()
        open_ = layer.open_gates().cpu()
        total = float(sizes.sum())
        active = float((sizes * open_).sum())
        stats[name or "model"] = {
            "total_params": int(total),
            "active_params": int(active),
            "sparsity": 1 - active / total,
            "total_groups": int(open_.numel()),
            "active_groups": int(open_.sum()),
            "expected_active": float(layer.get_l0_penalty()),
        }
    return stats


@torch.no_grad()
def get_active_parameter_count(model: nn.Module) -> int:
    """Parameters an eval forward really uses: every non-L0 parameter, plus the gated
    parameters of open gates and the L0 layers' ungated biases (gate logits excluded)."""
    count = 0
    # gate logits are not used by an eval forward, also where several modules share them
    logits = {
        id(m._logits())
        for m in model.modules()
        if isinstance(m, HardConcrete) and m._shared is not None
    }
    for module in model.modules():
        own = {n: p for n, p in module.named_parameters(recurse=False) if id(p) not in logits}
        if isinstance(module, HardConcrete):
            continue
        if isinstance(module, L0Layer):
            sizes = module.group_sizes().double()
            count += int((sizes * module.open_gates().cpu()).sum())
            if isinstance(getattr(module, "structured", None), bool) and module.bias is not None:
                count += module.bias.numel()  # L0Linear's bias is not gated
        else:
            count += sum(p.numel() for p in own.values())
    return count


class SparsityController:
    """Steer the expected density of a model's gated parameters to a target.

    ``density`` is the expected fraction of gated parameters (or of groups, ``by="groups"``)
    that are non-zero, ``sum_g P(z_g != 0) |g| / sum_g |g|``. Two ways to hold it:

    - ``mode="project"`` (default): after each optimiser step, ``step()`` shifts the gate
      logits of each L0 layer by one constant so that the layer's expected density equals
      a goal moving linearly from the initial density to ``target`` over ``warmup`` steps
      (then staying there). Within a layer every gate covers the same number of
      parameters, so density by parameters and by groups agree per layer.
      This is the exact solution of the density constraint for the current logits, the
      same controller the calibration engine uses for ``target_records``; the optimiser
      decides which gates stay open, the shift decides how many.
    - ``mode="lagrangian"``: add ``penalty() = lam * (density - target)`` to the loss;
      ``step()`` does dual ascent on ``lam`` (``lam += lr * (density - target)``, not below
      0). Simple, but it overshoots: gates closed by a large ``lam`` get no gradient to
      reopen (measured in docs/nn.md).

    Parameters
    ----------
    model : nn.Module
    target : float
        Wanted density in (0, 1], e.g. 0.25.
    mode : {"project", "lagrangian"}, default "project"
    warmup : int, default 100
        ``project``: steps over which the goal moves to ``target``.
    lr : float, default 0.05
        ``lagrangian``: step of the multiplier per unit of density error.
    by : {"params", "groups"}, default "params"

    Example
    -------
    >>> from l0calib.nn import SparseMLP
    >>> model = SparseMLP(20, 16, 3)
    >>> ctrl = SparsityController(model, target=0.25, warmup=1)
    >>> _ = ctrl.step()
    >>> round(float(ctrl.density().detach()), 4)
    0.25
    """

    def __init__(
        self,
        model: nn.Module,
        target: float,
        *,
        mode: Literal["project", "lagrangian"] = "project",
        warmup: int = 100,
        lr: float = 0.05,
        by: Literal["params", "groups"] = "params",
    ) -> None:
        target = finite("target", target)
        if not 0.0 < target <= 1.0:
            raise ParameterError(f"target must be in (0, 1], got {target!r}")
        if by not in ("params", "groups"):
            raise ParameterError(f"by must be 'params' or 'groups', got {by!r}")
        if mode not in ("project", "lagrangian"):
            raise ParameterError(f"mode must be 'project' or 'lagrangian', got {mode!r}")
        self.layers = [layer for _, layer in l0_layers(model)]
        if not self.layers:
            raise ParameterError("the model has no L0 layer")
        self._gates = [layer.gates for layer in self.layers]
        self.target, self.lr, self.by, self.mode = target, nonneg("lr", lr), by, mode
        self.warmup = positive_int("warmup", warmup)
        self.lam = 0.0
        self.steps = 0
        self.start = float(self.density().detach())

    def _sizes(self, layer: L0Layer, like: torch.Tensor) -> torch.Tensor:
        if self.by == "params":
            return layer.group_sizes().to(like)
        return torch.ones_like(like)

    def density(self) -> torch.Tensor:
        """Expected fraction of non-zero gated parameters (or groups); differentiable."""
        num, den = 0.0, 0.0
        for layer in self.layers:
            p = layer.active_prob()
            size = self._sizes(layer, p)
            num = num + (p * size).sum()
            den = den + float(size.sum())
        return num / den  # type: ignore[return-value]

    def goal(self) -> float:
        """The density the next ``step()`` aims for (``project`` mode)."""
        f = min(1.0, self.steps / self.warmup)
        return self.start + (self.target - self.start) * f

    def penalty(self) -> torch.Tensor:
        """``lam * (density - target)`` (``lagrangian``), or 0 (``project``)."""
        if self.mode == "project":
            return torch.zeros(())
        return self.lam * (self.density() - self.target)

    def step(self) -> float:
        """Call after each optimiser step. Returns ``lam`` (lagrangian) or the shift."""
        self.steps += 1
        if self.mode == "lagrangian":
            with torch.no_grad():
                self.lam = max(0.0, self.lam + self.lr * float(self.density() - self.target))
            return self.lam
        return self._project(self.goal())  # builds no graph: numpy, or shift_to_expected

    def _project(self, goal: float) -> float:
        # Each layer is held at the goal density on its own: one shared shift lets the
        # layers with the smallest gradients (often the last hidden layer) collapse.
        gates = self._gates
        shifts = shift_jointly(gates, [goal * g._n_gates for g in gates])
        return sum(shifts) / len(shifts)

    def state_dict(self) -> dict[str, Any]:
        """The controller's state (for checkpoints)."""
        return {"lam": self.lam, "target": self.target, "lr": self.lr, "steps": self.steps,
                "start": self.start, "warmup": self.warmup, "mode": self.mode}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.lam, self.target, self.lr = float(state["lam"]), state["target"], state["lr"]
        self.steps, self.start = int(state["steps"]), float(state["start"])
        self.warmup, self.mode = int(state["warmup"]), state["mode"]


_SCHEDULES = ("constant", "linear", "exponential", "cosine")


class TemperatureScheduler:
    """Temperature of the gates per epoch (kept for the reference API).

    The paper keeps the Concrete temperature constant at 2/3, the default here. Annealing
    (``initial_temp`` high to ``final_temp`` low over ``anneal_epochs``) makes the sampled
    gates closer to 0/1 as training goes on, so training sees less gate noise late; it
    does not change the test-time gate. ``schedule`` is ``"exponential"`` (geometric),
    ``"linear"``, ``"cosine"`` or ``"constant"``.

    Example
    -------
    >>> s = TemperatureScheduler(initial_temp=1.0, final_temp=0.1, anneal_epochs=10)
    >>> s.get_temperature(0), round(s.get_temperature(5), 4), s.get_temperature(50)
    (1.0, 0.3162, 0.1)
    """

    def __init__(
        self,
        initial_temp: float = 2 / 3,
        final_temp: float = 2 / 3,
        anneal_epochs: int = 100,
        schedule: str = "exponential",
    ) -> None:
        for name, v in (("initial_temp", initial_temp), ("final_temp", final_temp)):
            if not finite(name, v) > 0:
                raise ParameterError(f"{name} must be > 0, got {v!r}")
        if schedule not in _SCHEDULES:
            raise ParameterError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}")
        self.initial_temp, self.final_temp = float(initial_temp), float(final_temp)
        self.anneal_epochs = positive_int("anneal_epochs", anneal_epochs)
        self.schedule = schedule

    def get_temperature(self, epoch: int) -> float:
        """The temperature at ``epoch`` (0-based); ``final_temp`` from ``anneal_epochs`` on."""
        if epoch >= self.anneal_epochs or self.schedule == "constant":
            return self.final_temp if epoch >= self.anneal_epochs else self.initial_temp
        f = max(epoch, 0) / self.anneal_epochs
        a, b = self.initial_temp, self.final_temp
        if self.schedule == "linear":
            return a + (b - a) * f
        if self.schedule == "cosine":
            return b + (a - b) * 0.5 * (1 + math.cos(math.pi * f))
        return a * (b / a) ** f


def update_temperatures(model: nn.Module, temperature: float) -> None:
    """Set the Concrete temperature of every L0 layer of ``model``."""
    for _, layer in l0_layers(model):
        layer.temperature = temperature


class PenaltyTracker:
    """Collects named scalars per step (losses, penalties, sparsity) for later inspection."""

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = {}

    def log(self, name: str, value: float | torch.Tensor) -> None:
        """Append ``value`` to the series ``name``."""
        self.history.setdefault(name, []).append(float(value))

    def get_history(self, name: str) -> list[float]:
        """The series ``name`` (empty if never logged)."""
        return list(self.history.get(name, []))

    def get_stats(self, name: str) -> dict[str, float]:
        """``mean``, ``std``, ``min``, ``max``, ``last`` of the series (empty dict if none)."""
        xs = self.history.get(name, [])
        if not xs:
            return {}
        t = torch.tensor(xs, dtype=torch.float64)
        std = float(t.std()) if len(xs) > 1 else 0.0
        return {"mean": float(t.mean()), "std": std, "min": float(t.min()),
                "max": float(t.max()), "last": xs[-1]}  # fmt: skip

    def clear(self) -> None:
        """Forget every series."""
        self.history.clear()

    def save_to_csv(self, filepath: str | os.PathLike[str]) -> None:
        """Write ``step`` plus one column per series (blank where a series is shorter)."""
        from l0calib.io import atomic_path

        names = sorted(self.history)
        length = max((len(v) for v in self.history.values()), default=0)
        with atomic_path(filepath) as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", *names])
            for i in range(length):
                w.writerow([i, *(self.history[n][i] if i < len(self.history[n]) else ""
                                 for n in names)])  # fmt: skip
