"""L0-gated layers (Louizos, Welling & Kingma 2017, arXiv:1712.01312, section 4).

Every layer owns one :class:`l0calib.HardConcrete` whose gates cover *groups* of
parameters: a gate set to zero removes its whole group, so whole neurons or channels
disappear and :func:`l0calib.nn.prune_model` can build a smaller network.

- :class:`L0Linear`, ``structured=True`` (default, the paper's choice): one gate per input
  unit, the group being that unit's column of the weight matrix (``out_features``
  weights). ``structured=False``: one gate per weight (the reference ``l0`` behaviour).
- :class:`L0Conv2d`: one gate per output channel, the group being the channel's filter and
  its bias.
- :class:`L0DepthwiseConv2d`: a depthwise convolution, one gate per output channel.

Each layer exposes ``group_sizes()`` (parameters per gate), ``group_sq_norms()`` (squared
norm of each group), ``get_l0_penalty()`` (expected number of active gated parameters),
``get_l2_penalty()`` (expected ``||theta_g||^2 / 2`` over groups) and ``get_sparsity()``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from l0calib._checks import finite, positive_int
from l0calib.exceptions import ParameterError
from l0calib.hardconcrete import HardConcrete, TestGate, rsample_jointly, share_log_alpha

__all__ = ["L0Conv2d", "L0DepthwiseConv2d", "L0Layer", "L0Linear", "SparseMLP"]

PAPER_TEMPERATURE = 2 / 3


def _init_mean(init_sparsity: float, temperature: float, stretch: float = 0.1) -> float:
    """``sigmoid(log_alpha)`` at which ``P(z == 0) == init_sparsity``."""
    s = finite("init_sparsity", init_sparsity)
    if not 0.0 < s < 1.0:
        raise ParameterError(f"init_sparsity must be strictly between 0 and 1, got {s!r}")
    t = finite("temperature", temperature)
    if t <= 0:
        raise ParameterError(f"temperature must be > 0, got {t!r}")
    # P(z != 0) = sigmoid(log_alpha - t * log(-gamma / zeta)), gamma = -stretch.
    log_alpha = math.log((1 - s) / s) + t * math.log(stretch / (1 + stretch))
    return 1 / (1 + math.exp(-log_alpha))


def _same(v: torch.Tensor) -> torch.Tensor:
    return v


def _as_row(v: torch.Tensor) -> torch.Tensor:
    return v[None, :]


def _as_filter(v: torch.Tensor) -> torch.Tensor:
    return v[:, None, None, None]


def _pair(v: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, int) else tuple(v)
    if len(pair) != 2 or any(not isinstance(x, int) or x < 0 for x in pair):
        raise ParameterError(f"{name} must be an int or a pair of ints >= 0, got {v!r}")
    return pair  # type: ignore[return-value]


class L0Layer(nn.Module):
    """Base of the L0 layers: a HardConcrete ``gates`` over parameter groups."""

    gates: HardConcrete

    @property
    def temperature(self) -> float:
        """The gates' Concrete temperature (settable: see ``update_temperatures``)."""
        return self.gates.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.gates.temperature = value

    def group_sizes(self) -> torch.Tensor:
        """Number of parameters each gate removes, shape of the gates."""
        raise NotImplementedError

    def group_sq_norms(self) -> torch.Tensor:
        """Squared L2 norm of each gate's parameters, shape of the gates."""
        raise NotImplementedError

    def gated_parameters(self) -> list[tuple[nn.Parameter, Callable[[torch.Tensor], torch.Tensor]]]:
        """Each gated parameter with a map that turns a tensor of the gates' shape into one
        that broadcasts against the parameter (each element meets its group's value)."""
        raise NotImplementedError

    def active_prob(self) -> torch.Tensor:
        """``P(z_g != 0)`` per gate (differentiable)."""
        return self.gates.get_active_prob()

    def get_l0_penalty(self) -> torch.Tensor:
        """Expected number of non-zero gated parameters, ``sum_g P(z_g != 0) * |g|``."""
        return (self.active_prob() * self.group_sizes()).sum()

    def get_l2_penalty(self) -> torch.Tensor:
        """Expected L2 term, ``sum_g P(z_g != 0) * ||theta_g||^2 / 2`` (gated parameters
        only; never the gate logits)."""
        return (self.active_prob() * self.group_sq_norms()).sum() / 2

    @torch.no_grad()
    def open_gates(self) -> torch.Tensor:
        """Boolean mask of gates whose test-time value is non-zero."""
        return self.gates.test_gates() > 0

    @torch.no_grad()
    def get_sparsity(self) -> float:
        """Fraction of gated parameters removed at test time, in [0, 1]."""
        sizes = self.group_sizes().to(torch.float64)
        kept = (sizes * self.open_gates()).sum()
        return float(1 - kept / sizes.sum())

    def _gate(self) -> torch.Tensor:
        return self.gates()  # a sample in training mode, the test-time gate in eval mode


class L0Linear(L0Layer):
    """A linear layer with Hard Concrete gates.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool, default True
        The bias is not gated (with input gates no bias belongs to a single input unit).
    init_sparsity : float, default 0.5
        Probability that a gate is exactly zero at initialisation, ``P(z = 0)``. (The
        reference package set ``sigmoid(log_alpha) = 1 - init_sparsity``, which closes far
        fewer gates than the name says: about 17% at 0.5.)
    temperature : float, default 2/3
        The paper's Concrete temperature.
    structured : bool, default True
        One gate per input unit (whole input neurons are removed) or, with ``False``, one
        gate per weight.
    test_gate : {"paper", "median"}, default "paper"
        Test-time gate: the paper's estimator or the reference package's.
    seed : int, optional
        Seeds the gate noise (counter-based: reproducible and resumable).

    Example
    -------
    >>> layer = L0Linear(20, 5)
    >>> layer(torch.ones(3, 20)).shape
    torch.Size([3, 5])
    >>> float(layer.get_l0_penalty().detach()) > 0
    True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_sparsity: float = 0.5,
        temperature: float = PAPER_TEMPERATURE,
        structured: bool = True,
        *,
        test_gate: TestGate = "paper",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.in_features = positive_int("in_features", in_features)
        self.out_features = positive_int("out_features", out_features)
        self.structured = bool(structured)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        shape = (in_features,) if structured else (out_features, in_features)
        self.gates = HardConcrete(
            *shape, temperature=temperature, init_mean=_init_mean(init_sparsity, temperature),
            test_gate=test_gate, seed=seed,
        )  # fmt: skip
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform weights and bias, as ``torch.nn.Linear``."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ (W * z).T + b``; ``x`` of shape (..., in_features).

        ``gate``: the gates ``z`` to use (shape of ``self.gates``), e.g. from
        :func:`l0calib.hardconcrete.rsample_jointly`; by default the layer draws its own
        (training) or takes the test-time gates (eval)."""
        z = self._gate() if gate is None else gate
        if z.dtype != x.dtype:
            z = z.to(x.dtype)
        if self.structured and x.requires_grad:
            return F.linear(x * z, self.weight, self.bias)
        # Gating the weight columns gives the same product; when the input needs no
        # gradient (a first layer), it also spares the backward pass the input-gradient
        # matmul that the gate's gradient would otherwise need.
        return F.linear(x, self.weight * (z[None, :] if self.structured else z), self.bias)

    def group_sizes(self) -> torch.Tensor:
        """``out_features`` per input gate, or 1 per weight."""
        if self.structured:
            return torch.full(
                (self.in_features,), float(self.out_features), device=self.weight.device
            )
        return torch.ones(self.out_features, self.in_features, device=self.weight.device)

    def group_sq_norms(self) -> torch.Tensor:
        """Column norms (structured) or the squared weights."""
        sq = self.weight**2
        return sq.sum(0) if self.structured else sq

    def gated_parameters(self) -> list[tuple[nn.Parameter, Callable[[torch.Tensor], torch.Tensor]]]:
        """The weight; a gate covers a column (structured) or one weight."""
        return [(self.weight, _as_row if self.structured else _same)]

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The test-time weight ``W * z`` (shape (out, in)) an eval forward uses."""
        z = self.gates.test_gates().to(self.weight.dtype)
        return self.weight * (z[None, :] if self.structured else z)

    def extra_repr(self) -> str:
        """Summary shown by ``repr``."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, structured={self.structured}"
        )


class L0Conv2d(L0Layer):
    """A 2-D convolution with one Hard Concrete gate per output channel.

    A closed gate removes the channel's whole filter and its bias (the group), so the
    channel can be cut from the network. Arguments as ``torch.nn.Conv2d`` plus
    ``init_sparsity``, ``temperature``, ``test_gate`` and ``seed`` as :class:`L0Linear`.

    Example
    -------
    >>> conv = L0Conv2d(3, 8, kernel_size=3, padding=1)
    >>> conv(torch.ones(2, 3, 16, 16)).shape
    torch.Size([2, 8, 16, 16])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        bias: bool = True,
        init_sparsity: float = 0.5,
        temperature: float = PAPER_TEMPERATURE,
        *,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        test_gate: TestGate = "paper",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = positive_int("in_channels", in_channels)
        self.out_channels = positive_int("out_channels", out_channels)
        self.groups = positive_int("groups", groups)
        if in_channels % groups or out_channels % groups:
            raise ParameterError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must both be "
                f"divisible by groups ({groups})"
            )
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.gates = HardConcrete(
            out_channels, temperature=temperature, init_mean=_init_mean(init_sparsity, temperature),
            test_gate=test_gate, seed=seed,
        )  # fmt: skip
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform weights and bias, as ``torch.nn.Conv2d``."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """The convolution with every output channel (bias included) times its gate
        (``gate``: the gates to use, as for :meth:`L0Linear.forward`)."""
        out = F.conv2d(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )
        z = self._gate() if gate is None else gate
        if z.dtype != out.dtype:
            z = z.to(out.dtype)
        return out * z[None, :, None, None]

    def group_sizes(self) -> torch.Tensor:
        """Filter size (+1 for the bias) per output channel."""
        per = self.weight[0].numel() + (1 if self.bias is not None else 0)
        return torch.full((self.out_channels,), float(per), device=self.weight.device)

    def group_sq_norms(self) -> torch.Tensor:
        """Squared norm of each output channel's filter and bias."""
        sq = (self.weight**2).flatten(1).sum(1)
        return sq + self.bias**2 if self.bias is not None else sq

    def gated_parameters(self) -> list[tuple[nn.Parameter, Callable[[torch.Tensor], torch.Tensor]]]:
        """The filters (a gate covers an output channel) and the bias, if any."""
        gated = [(self.weight, _as_filter)]
        return [*gated, (self.bias, _same)] if self.bias is not None else gated

    def extra_repr(self) -> str:
        """Summary shown by ``repr``."""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, groups={self.groups}"
        )


class L0DepthwiseConv2d(L0Conv2d):
    """A depthwise convolution (``groups = in_channels``), one gate per output channel.

    ``depth_multiplier`` output channels per input channel (default 1).
    """

    def __init__(
        self,
        in_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        bias: bool = True,
        init_sparsity: float = 0.5,
        temperature: float = PAPER_TEMPERATURE,
        *,
        depth_multiplier: int = 1,
        test_gate: TestGate = "paper",
        seed: int | None = None,
    ) -> None:
        positive_int("depth_multiplier", depth_multiplier)
        super().__init__(
            in_channels, in_channels * depth_multiplier, kernel_size, stride, padding, bias,
            init_sparsity, temperature, groups=in_channels, test_gate=test_gate, seed=seed,
        )  # fmt: skip
        self.depth_multiplier = depth_multiplier


class SparseMLP(nn.Module):
    """A multilayer perceptron of structured :class:`L0Linear` layers with ReLU between.

    Parameters
    ----------
    input_dim : int, default 784
    hidden_dim : int or sequence of int, default 256
        One hidden layer, or several (e.g. ``(300, 100)`` for the paper's LeNet-300-100).
    output_dim : int, default 10
    init_sparsity : float, default 0.5
    temperature : float, default 2/3
    structured : bool, default True
    seed : int, optional
        Layer ``i``'s gates are seeded with ``seed + i``.

    The layers are ``self.layers`` (an ``nn.Sequential``), so :func:`prune_model` can cut
    whole neurons out of it. The gate logits of all layers are one parameter,
    ``gate_log_alpha`` (each layer's ``gates.log_alpha`` is a view of its slice,
    :func:`l0calib.hardconcrete.share_log_alpha`), and in training mode one chain of
    operations draws every layer's gates: a few hundred gates per layer make the fixed
    cost of each tensor operation, and of each parameter an optimiser updates, the
    larger part of their cost.
    """

    def __init__(
        self,
        input_dim: int = 784,
        hidden_dim: int | tuple[int, ...] | list[int] = 256,
        output_dim: int = 10,
        init_sparsity: float = 0.5,
        temperature: float = PAPER_TEMPERATURE,
        structured: bool = True,
        *,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        hidden = [hidden_dim] if isinstance(hidden_dim, int) else list(hidden_dim)
        dims = [input_dim, *hidden, output_dim]
        modules: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
            modules.append(
                L0Linear(a, b, init_sparsity=init_sparsity, temperature=temperature,
                         structured=structured, seed=None if seed is None else seed + i)
            )  # fmt: skip
            if i < len(dims) - 2:
                modules.append(nn.ReLU())
        self.layers = nn.Sequential(*modules)
        share_log_alpha([m.gates for m in modules if isinstance(m, L0Layer)], self)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        # A state_dict saved before the logits were shared has one entry per layer.
        key = prefix + "gate_log_alpha"
        old = [
            k
            for k in state_dict
            if k.startswith(prefix + "layers.") and k.endswith(".gates.log_alpha")
        ]
        if key not in state_dict and old:
            order = {prefix + k: i for i, k in enumerate(self.state_dict(keep_vars=True))}
            old.sort(key=lambda k: order.get(k.replace(".log_alpha", ".draws"), len(order)))
            state_dict[key] = torch.cat([state_dict.pop(k).reshape(-1) for k in old])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape (batch, output_dim); ``x`` is flattened after the batch axis.

        In training mode the gates of all layers are drawn together
        (:func:`l0calib.hardconcrete.rsample_jointly`: the same samples as layer by layer,
        in one chain of operations)."""
        x = x.flatten(1)
        l0 = [m for m in self.layers if isinstance(m, L0Layer)]
        if not all(m.gates.training for m in l0):
            return self.layers(x)
        gates = iter(rsample_jointly([m.gates for m in l0]))
        for module in self.layers:
            x = module(x, next(gates)) if isinstance(module, L0Layer) else module(x)
        return x
