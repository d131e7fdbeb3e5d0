"""The Hard Concrete gate of Louizos, Welling & Kingma (2017), arXiv:1712.01312, section 4.

One implementation, used by the calibration engine (a gate per record), the selection gates
(a gate per record or feature) and :mod:`l0calib.nn` (a gate per neuron or weight).

The distribution, with ``beta`` the temperature and ``(gamma, zeta) = (-stretch, 1 + stretch)``::

    u ~ Uniform(0, 1)
    s = sigmoid((log u - log(1 - u) + log_alpha) / beta)      # binary Concrete sample
    z = min(1, max(0, s * (zeta - gamma) + gamma))            # stretched, then clamped

``z`` is exactly 0 with positive probability, exactly 1 with positive probability, and
differentiable in ``log_alpha`` in between, so the expected number of non-zero gates,

    E[#{z != 0}] = sum sigmoid(log_alpha - beta * log(-gamma / zeta)),

is a differentiable surrogate for the L0 norm (the paper's equation 12).

At test time the paper uses ``min(1, max(0, sigmoid(log_alpha) * (zeta - gamma) + gamma))``
(section 4, "at test time"). PolicyEngine's ``l0`` package instead uses
``sigmoid(log_alpha / beta)`` inside the clamp, which is the *median* of the stretched
Concrete. We default to the paper's estimator: it does not move when the temperature is
annealed, so a model evaluated at the end of training is the model whose expected penalty
was optimised. The median moves with ``beta``: for ``beta < 1`` it pushes a gate with
``log_alpha > 0`` further open and one with ``log_alpha < 0`` further shut, reaching a hard
0/1 as ``beta -> 0``. ``test_gate="median"`` gives the reference behaviour.
See ``docs/hardconcrete.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from l0calib._checks import finite, positive_int
from l0calib.exceptions import ParameterError
from l0calib.noise import logistic_from_uniform, logistic_noise

__all__ = ["HardConcrete", "rsample_jointly", "share_log_alpha", "shift_jointly"]

TestGate = Literal["paper", "median"]
_TEST_GATES = ("paper", "median")
# Uniform draws from a torch.Generator are clamped into [_EPS, 1 - _EPS] so the logit is finite.
_EPS = 1e-6
# Seeded gates with few elements take the noise of up to _NOISE_BLOCK draws in one call, at
# most _NOISE_BLOCK_ELEMENTS numbers (a network layer's few hundred gates would otherwise pay
# the noise's per-call overhead on every step); large gate vectors take one draw at a time.
_NOISE_BLOCK = 64
_NOISE_BLOCK_ELEMENTS = 1 << 16
_WORK_DTYPES = (torch.float32, torch.float64)
# shift_to_expected solves in numpy (float64) up to this many gates in total, where torch's
# per-operation overhead would dominate.
_NUMPY_SHIFT_MAX = 1 << 14


class HardConcrete(nn.Module):
    """A tensor of Hard Concrete gates in [0, 1] with a differentiable expected L0 norm.

    Parameters
    ----------
    input_dim : int
        Number of gates (first dimension), e.g. one per survey record.
    output_dim : int, optional
        Second dimension; gates then have shape ``(input_dim, output_dim)``.
    temperature : float, default 2/3
        ``beta`` of the binary Concrete; the paper's value. Must be > 0. Mutable: annealing
        schedules set ``gate.temperature`` between steps.
    stretch : float, default 0.1
        ``gamma = -stretch``, ``zeta = 1 + stretch``. Must be >= 0; 0 gives a plain binary
        Concrete that is never exactly 0 or 1.
    init_mean : float, default 0.5
        Initial ``sigmoid(log_alpha)``, in (0, 1): the probability that a relaxed sample is
        above 1/2 (more "on" than "off"), whatever the temperature. 0.999 starts almost every
        gate open.
    init_std : float, default 0.01
        Standard deviation of the normal noise added to the initial ``log_alpha``.
    test_gate : {"paper", "median"}, default "paper"
        Deterministic gate returned in eval mode: the paper's estimator or the reference
        ``l0`` package's median (see the module docstring).
    seed : int, optional
        Makes the initialisation and every training draw reproducible without touching
        torch's global RNG. Draw ``d`` of gate ``j`` uses counter-based noise keyed by
        ``(seed, d, j)`` (:mod:`l0calib.noise`); the draw counter is saved in
        ``state_dict()``, so a reloaded module continues the same sequence.
    generator : torch.Generator, optional
        Alternative to ``seed``: a torch generator used for initialisation and draws.
        Without ``seed`` or ``generator`` the global torch RNG is used.
    index_offset : int, default 0
        With ``seed``: the global index of this module's first gate, so that a shard of a
        larger gate vector (records split across processes) draws exactly the noise the
        whole vector would. Initialisation and every draw are keyed by the global index.
    device, dtype
        Where and in which floating dtype ``log_alpha`` lives. Sampling arithmetic runs in
        at least float32 and the result is cast back, so float16 and bfloat16 gates never
        contain inf or NaN.

    Raises
    ------
    ParameterError
        If an argument is out of range.

    Example
    -------
    >>> gates = HardConcrete(1000, temperature=0.25, init_mean=0.999, seed=0)
    >>> z = gates()                      # training mode: a differentiable sample, shape (1000,)
    >>> z.shape, bool(((z >= 0) & (z <= 1)).all())
    (torch.Size([1000]), True)
    >>> _ = gates.eval()
    >>> gates.get_num_active()
    1000
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int | None = None,
        temperature: float = 2 / 3,
        stretch: float = 0.1,
        init_mean: float = 0.5,
        *,
        init_std: float = 0.01,
        test_gate: TestGate = "paper",
        seed: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        index_offset: int = 0,
    ) -> None:
        super().__init__()
        positive_int("input_dim", input_dim)
        if output_dim is not None:
            positive_int("output_dim", output_dim)
        self.temperature = temperature  # validated by the property setter
        stretch = finite("stretch", stretch)
        if stretch < 0:
            raise ParameterError(f"stretch must be >= 0, got {stretch!r}")
        init_mean = finite("init_mean", init_mean)
        if not 0.0 < init_mean < 1.0:
            raise ParameterError(
                f"init_mean must be strictly between 0 and 1, got {init_mean!r} "
                "(it is the initial sigmoid(log_alpha); use e.g. 0.999 to start almost all open)"
            )
        init_std = finite("init_std", init_std)
        if init_std < 0:
            raise ParameterError(f"init_std must be >= 0, got {init_std!r}")
        if test_gate not in _TEST_GATES:
            raise ParameterError(f"test_gate must be one of {_TEST_GATES}, got {test_gate!r}")
        if seed is not None and generator is not None:
            raise ParameterError("give seed or generator, not both")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ParameterError(f"seed must be an integer, got {seed!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise ParameterError(f"dtype must be a floating dtype, got {dtype}")

        self.input_dim = input_dim
        self.output_dim = output_dim
        self.stretch = stretch
        self.gamma = -stretch
        self.zeta = 1.0 + stretch
        self._gamma = torch.tensor(self.gamma, dtype=torch.float64)  # a 0-d operand of rsample
        self.init_mean = init_mean
        self.test_gate = test_gate
        self.seed = seed
        self.generator = generator
        if isinstance(index_offset, bool) or not isinstance(index_offset, int) or index_offset < 0:
            raise ParameterError(f"index_offset must be an integer >= 0, got {index_offset!r}")
        self.index_offset = index_offset

        shape = (input_dim,) if output_dim is None else (input_dim, output_dim)
        self._gate_shape, self._n_gates = torch.Size(shape), math.prod(shape)
        self.log_alpha = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        # Caches keyed by everything they depend on (never saved): the global indices and a
        # block of seeded noise, (key, first draw, noise of shape (draws, *shape)).
        self._index_cache: tuple[tuple, torch.Tensor] | None = None
        self._noise_cache: tuple[tuple, int, tuple[torch.Tensor, ...]] | None = None
        # rsample_jointly's block of concatenated noise when this module leads the list:
        # (key, first draw, rows, the counter tensors of those draws per module).
        self._joint_cache: tuple[tuple, int, tuple[torch.Tensor, ...], list] | None = None
        # Number of training draws taken so far: the counter of the seeded noise stream.
        self.register_buffer("draws", torch.zeros((), dtype=torch.int64, device=device))
        # The counter as a Python int, valid while ``draws`` is the tensor this module last
        # put there, unmodified since (load_state_dict copies into it in place, which bumps
        # its version): (tensor, version, count).
        self._draw_seen: tuple[torch.Tensor, int, int] | None = None
        # Set by share_log_alpha: (owner module, parameter name, offset) when the logits
        # are a slice of a parameter that several modules share.
        self._shared: tuple[nn.Module, str, int] | None = None
        self.reset_parameters(init_std=init_std)

    def __getstate__(self) -> dict[str, Any]:
        # Pickles and deep copies leave the caches behind (rebuilt on first use).
        state = super().__getstate__()
        for key in ("_index_cache", "_noise_cache", "_joint_cache", "_draw_seen"):
            state[key] = None
        return state

    def __getattr__(self, name: str) -> Any:
        # nn.Module keeps parameters in a dict and serves them from __getattr__; a module
        # whose logits live in a shared parameter serves a view of its slice instead.
        if name == "log_alpha":
            shared = self.__dict__.get("_shared")
            if shared is not None:
                owner, key, start = shared
                bank = owner._parameters[key]
                return bank[start : start + self._n_gates].view(self._gate_shape)
        return super().__getattr__(name)

    # ------------------------------------------------------------------ parameters
    @property
    def temperature(self) -> float:
        """``beta``, the Concrete temperature (> 0)."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        value = finite("temperature", value)
        if value <= 0:
            raise ParameterError(f"temperature must be > 0, got {value!r}")
        self._temperature = value

    def reset_parameters(self, *, init_std: float = 0.01) -> None:
        """Set ``log_alpha ~ Normal(logit(init_mean), init_std)`` and restart the draw counter."""
        mean = math.log(self.init_mean) - math.log1p(-self.init_mean)
        with torch.no_grad():
            if self.seed is not None:
                # A separate stream (draw -1) so initialisation never reuses training noise.
                u = self._counter_normal()
                self.log_alpha.copy_(mean + init_std * u)
            else:
                self.log_alpha.normal_(mean, init_std, generator=self.generator)
            self._buffers["draws"] = torch.zeros_like(self._buffers["draws"])

    def _counter_normal(self) -> torch.Tensor:
        # Logistic noise scaled to unit variance: a deterministic, index-keyed jitter.
        idx = self._global_index()
        noise = logistic_noise(self.seed, -1, idx, dtype=torch.float64)
        return (noise * (math.sqrt(3) / math.pi)).reshape(self.log_alpha.shape)

    def _global_index(self) -> torch.Tensor:
        n, device = self._n_gates, self._logits().device
        key = (n, device, self.index_offset)
        if self._index_cache is None or self._index_cache[0] != key:
            self._index_cache = (key, torch.arange(n, device=device) + self.index_offset)
        return self._index_cache[1]

    @property
    def shape(self) -> torch.Size:
        """Shape of the gate tensor: ``(input_dim,)`` or ``(input_dim, output_dim)``."""
        return self._gate_shape

    def _logits(self) -> nn.Parameter:
        # The parameter holding the logits (this module's own, or the shared one), for its
        # dtype and device without making a view.
        shared = self._shared
        if shared is None:
            return self._parameters["log_alpha"]
        return shared[0]._parameters[shared[1]]

    def _work(self) -> torch.Tensor:
        # Half-precision logits are upcast so the sampling arithmetic cannot overflow.
        log_alpha = self.log_alpha
        return log_alpha if log_alpha.dtype in _WORK_DTYPES else log_alpha.float()

    def _uniform_to_logistic(self, u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        u = u.to(device=self.log_alpha.device, dtype=torch.float64).clamp(_EPS, 1 - _EPS)
        return logistic_from_uniform(u, dtype=dtype)

    def _noise(self, dtype: torch.dtype) -> torch.Tensor:
        if self.seed is not None:
            return self._seeded_noise(self._draw_count(), dtype)
        gen, device = self.generator, self._logits().device
        dev = gen.device if gen is not None else device
        u = torch.rand(self.shape, generator=gen, device=dev, dtype=torch.float64)
        # logit(u) with u clamped into [_EPS, 1 - _EPS]: the logistic noise, in one op.
        noise = torch.logit(u, eps=_EPS).to(device=device)
        return noise if noise.dtype == dtype else noise.to(dtype)

    def _seeded_noise(self, draw: int, dtype: torch.dtype) -> torch.Tensor:
        """Noise of training draw ``draw`` (counter-based: the same whichever block it
        was computed in). A row of a cached block is shared: callers must not write to it."""
        key = (self.seed, dtype, self._logits().device, self.index_offset, self._gate_shape)
        cache = self._noise_cache
        if cache is None or cache[0] != key or not 0 <= draw - cache[1] < len(cache[2]):
            idx = self._global_index()
            count = min(_NOISE_BLOCK, _NOISE_BLOCK_ELEMENTS // idx.numel())
            if count <= 1:  # one draw at a time: nothing to keep
                return logistic_noise(self.seed, draw, idx, dtype=dtype).reshape(self.shape)
            block = logistic_noise(self.seed, draw, idx, dtype=dtype, count=count)
            # The rows as views made once: handing one out is then free of tensor ops.
            cache = self._noise_cache = (key, draw, block.reshape(count, *self.shape).unbind(0))
        return cache[2][draw - cache[1]]

    def _draw_count(self) -> int:
        """The draw counter ``draws`` as a Python int (read without a tensor op while the
        buffer is the one :meth:`_advance_draws` set)."""
        buf, seen = self._buffers["draws"], self._draw_seen
        if seen is not None and seen[0] is buf and seen[1] == buf._version:
            return seen[2]
        count = int(buf)
        self._draw_seen = (buf, buf._version, count)
        return count

    def _advance_draws(self, new: torch.Tensor | None = None) -> None:
        # ``new``: a ready-made counter tensor holding the next count (rsample_jointly).
        count = self._draw_count() + 1
        if new is None:
            device = self._buffers["draws"].device
            new = torch.scalar_tensor(count, dtype=torch.int64, device=device)
        # Rebind rather than add in place, so a state_dict() taken earlier keeps its count
        # (straight into _buffers: nn.Module.__setattr__ costs more than the rest).
        self._buffers["draws"] = new
        self._draw_seen = (new, new._version, count)

    # ------------------------------------------------------------------ gates
    def forward(self) -> torch.Tensor:
        """Gates: a reparameterised sample in training mode, the test-time gate in eval mode."""
        return self.rsample() if self.training else self.test_gates()

    def rsample(self, u: torch.Tensor | None = None) -> torch.Tensor:
        """Draw gates differentiably (the reparameterisation trick).

        Parameters
        ----------
        u : torch.Tensor, optional
            Uniform(0, 1) numbers of the gate shape to use instead of this module's own
            stream (the sharded engine passes record-keyed noise). Values are clamped into
            ``[1e-6, 1 - 1e-6]``. When omitted, the module's stream advances by one draw.

        Returns
        -------
        torch.Tensor
            Gates in [0, 1], same shape and dtype as ``log_alpha``; gradients flow to
            ``log_alpha`` wherever the gate is strictly between 0 and 1.
        """
        log_alpha = self._work()
        if u is None:
            noise = self._take_noise()  # only read below
        else:
            if u.shape != self.shape:
                raise ParameterError(f"u must have shape {tuple(self.shape)}, got {tuple(u.shape)}")
            noise = self._uniform_to_logistic(u, log_alpha.dtype)
        # Few ops, each with a one-op backward: a layer's few hundred gates are bound by
        # per-op overhead, not arithmetic. hardtanh is the clamp into [0, 1].
        s = torch.sigmoid(torch.add(noise, log_alpha).div_(self.temperature))
        z = F.hardtanh(torch.add(self._gamma, s, alpha=self.zeta - self.gamma), 0.0, 1.0)
        return z if z.dtype == self.log_alpha.dtype else z.to(self.log_alpha.dtype)

    def next_noise(self) -> torch.Tensor:
        """The logistic noise of the next training draw (gate shape, in ``log_alpha``'s
        dtype promoted to at least float32), advancing the draw counter: :meth:`rsample`
        is ``clamp(gamma + (zeta - gamma) * sigmoid((noise + log_alpha) / beta), 0, 1)``
        of it. The tensor is new: the caller may overwrite it."""
        noise = self._take_noise()
        cache = self._noise_cache
        if cache is not None and noise._base is not None and noise._base is cache[2][0]._base:
            noise = noise.clone()  # a row of the cached block of draws
        return noise

    def _take_noise(self) -> torch.Tensor:
        # The next draw's noise, possibly a shared row of the cached block (read only).
        dtype = self._logits().dtype
        noise = self._noise(dtype if dtype in _WORK_DTYPES else torch.float32)
        self._advance_draws()
        return noise

    @torch.no_grad()
    def sample(self, u: torch.Tensor | None = None) -> torch.Tensor:
        """Like :meth:`rsample`, without building a graph."""
        return self.rsample(u)

    def test_gates(self, estimator: TestGate | None = None) -> torch.Tensor:
        """The deterministic test-time gates.

        Parameters
        ----------
        estimator : {"paper", "median"}, optional
            ``"paper"``: ``clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)``;
            ``"median"``: ``clamp(sigmoid(log_alpha / beta) * (zeta - gamma) + gamma, 0, 1)``,
            the reference ``l0`` package's gate. Defaults to ``self.test_gate``.
        """
        estimator = self.test_gate if estimator is None else estimator
        if estimator not in _TEST_GATES:
            raise ParameterError(f"estimator must be one of {_TEST_GATES}, got {estimator!r}")
        log_alpha = self._work()
        if estimator == "median":
            log_alpha = log_alpha / self.temperature
        z = (torch.sigmoid(log_alpha) * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)
        return z.to(self.log_alpha.dtype)

    # ------------------------------------------------------------------ L0 surrogate
    def get_active_prob(self) -> torch.Tensor:
        """``P(z != 0)`` for every gate: ``sigmoid(log_alpha - beta * log(-gamma / zeta))``.

        Differentiable in ``log_alpha``; same shape as the gates, dtype at least float32.
        With ``stretch == 0`` every gate is non-zero almost surely and this is all ones.
        """
        log_alpha = self._work()
        if self.stretch == 0:
            return torch.ones_like(log_alpha)
        return torch.sigmoid(log_alpha - self._count_shift())

    def _count_shift(self) -> float:
        """``c`` in ``P(z != 0) = sigmoid(log_alpha - c)`` (needs ``stretch > 0``)."""
        return self.temperature * math.log(-self.gamma / self.zeta)

    def get_penalty(self) -> torch.Tensor:
        """Expected number of non-zero gates (a differentiable scalar): the L0 surrogate."""
        return self.get_active_prob().sum()

    @torch.no_grad()
    def shift_to_expected(
        self,
        goal: float,
        mask: torch.Tensor | None = None,
        *,
        reduce: Callable[[torch.Tensor, str], torch.Tensor] | None = None,
    ) -> float:
        """Subtract one constant from every ``log_alpha`` so the expected count hits ``goal``.

        After the call ``get_active_prob()[mask].sum() == goal`` (to 1e-6 relative; ``mask``
        defaults to every gate). This is how l0calib holds an exact expected number of
        open gates without a penalty whose strength must be tuned: the optimiser decides
        *which* gates stay open, the shift decides *how many*. Solved by safeguarded Newton
        on the shift (a float64 scalar; probabilities in the gates' precision, at least
        float32, summed in float64; up to 16,384 gates in all, on CPU, in float64 with
        numpy); returns the shift subtracted.

        Parameters
        ----------
        goal : float
            Expected number of non-zero gates among ``mask``, in ``[0, mask.sum()]``.
        mask : torch.Tensor of bool, optional
            Same shape as the gates; the gates whose count is steered.
        reduce : callable, optional
            ``reduce(tensor, op)`` with ``op`` in {"sum", "max"}: combines a float64 tensor
            across processes when this module holds one shard of the gates
            (:mod:`l0calib.distributed`); ``goal`` then counts every shard's gates.
        """
        if reduce is None and mask is None and _small_cpu(self):
            # A network layer's few hundred gates, every training step: numpy only, on a
            # view of log_alpha (the per-op overhead of torch is most of the cost here).
            return _shift_small([self], [float(goal)])[0]
        x = self._work() if mask is None else self._work()[mask]

        def total(values: list[float], op: str = "sum") -> list[float]:
            if reduce is None:
                return values
            return reduce(torch.tensor(values, dtype=torch.float64), op).tolist()

        (size,) = total([float(x.numel())])
        goal = float(goal)
        if not 0.0 <= goal <= size:
            raise ParameterError(f"goal must be in [0, {size:g}], got {goal!r}")
        if size == 0 or self.stretch == 0:
            return 0.0
        c = self._count_shift()
        xd = x.detach()
        if size <= _NUMPY_SHIFT_MAX and x.device.type == "cpu":
            # Few gates in all (chosen by the total size, so every shard of a small problem
            # takes this path): numpy in float64.
            sums = _numpy_sums(xd.numpy().astype(np.float64), c, total)
        elif x.device.type == "cpu":
            # Millions of gates: probabilities in the gates' own precision (at least
            # float32) in one buffer reused by every Newton step (no allocation per step),
            # summed by numpy in float64 (converted block by block, no float64 copy).
            p, sq = torch.empty_like(xd), torch.empty_like(xd)
            arr, arr2 = p.numpy(), sq.numpy()

            def sums(b: float) -> list[float]:
                torch.sub(xd, c + b, out=p).sigmoid_()
                torch.mul(p, p, out=sq)
                return total(
                    [float(arr.sum(dtype=np.float64)), float(arr2.sum(dtype=np.float64)),
                     float(arr2 @ arr)]
                )  # fmt: skip

        else:
            # On a GPU: the same sums by torch, one pass over the gates per Newton step.
            def sums(b: float) -> list[float]:
                q = torch.sigmoid(xd - (c + b))
                q2 = q * q
                s = torch.stack([q.sum(dtype=torch.float64), q2.sum(dtype=torch.float64),
                                 torch.dot(q2, q).double()])  # fmt: skip
                return s.tolist() if reduce is None else reduce(s, "sum").tolist()

        if x.numel():
            x_min, x_max = (float(v) for v in torch.aminmax(xd))
        else:
            x_min, x_max = math.inf, -math.inf
        # One "max" reduction gives both ends of the bracket across shards.
        x_max, neg_min = total([x_max, -x_min], "max")
        x_min = -neg_min
        lo, hi = x_min - c - 50.0, x_max - c + 50.0  # f(lo) > 0 > f(hi)
        b = _solve_shift(sums, goal, size, lo, hi)
        self.log_alpha.sub_(b)
        return b

    @torch.no_grad()
    def get_num_active(self) -> int:
        """Number of test-time gates that are non-zero."""
        return int((self.test_gates() > 0).sum())

    @torch.no_grad()
    def get_sparsity(self) -> float:
        """Fraction of test-time gates that are exactly zero, in [0, 1]."""
        return 1.0 - self.get_num_active() / self._n_gates

    def extra_repr(self) -> str:
        """Summary shown by ``repr(module)``."""
        dims = (
            f"{self.input_dim}"
            if self.output_dim is None
            else f"{self.input_dim}, {self.output_dim}"
        )
        return (
            f"{dims}, temperature={self.temperature:.4g}, stretch={self.stretch:.4g}, "
            f"init_mean={self.init_mean:.4g}, test_gate={self.test_gate!r}"
        )


def rsample_jointly(modules: Sequence[HardConcrete]) -> list[torch.Tensor]:
    """``[m.rsample() for m in modules]``, computed in one pass when it can be.

    Each module takes the noise of its own next draw (its stream advances by one). When the
    modules share temperature, stretch, device and working dtype, their gates are
    concatenated and sampled by one chain of operations: a network's layers have a few
    hundred gates each, where every tensor operation costs its fixed overhead (this is how
    :class:`l0calib.nn.SparseMLP` samples its layers' gates). The samples then equal those
    of the modules sampled one by one to rounding, not always bit for bit: torch's CPU
    kernels compute the last few elements of a tensor on a scalar path that may round the
    last bit differently from the vectorised one, and concatenation moves those elements.
    The result is deterministic all the same.

    Parameters
    ----------
    modules : sequence of HardConcrete

    Returns
    -------
    list of torch.Tensor
        One sample per module, of its gates' shape and dtype.
    """
    modules = list(modules)
    if len(modules) < 2:
        return [m.rsample() for m in modules]
    first = modules[0]
    if any(m.temperature != first.temperature or m.stretch != first.stretch for m in modules):
        return [m.rsample() for m in modules]
    log_alpha = _shared_run(modules)  # a SparseMLP's logits: already one tensor
    if log_alpha is None or log_alpha.dtype not in _WORK_DTYPES:
        works = [m._work() for m in modules]
        if len({(w.device, w.dtype) for w in works}) > 1:
            return [m.rsample() for m in modules]
        log_alpha = torch.cat([w.reshape(-1) for w in works])
    scaled = _joint_noise(modules, log_alpha.dtype) if log_alpha.device.type == "cpu" else None
    if scaled is not None:  # noise / beta, read only
        s = torch.sigmoid(torch.add(scaled, log_alpha, alpha=1.0 / first.temperature))
    else:
        noise = torch.cat([m._take_noise().reshape(-1) for m in modules])
        s = torch.sigmoid(noise.add_(log_alpha).div_(first.temperature))
    z = F.hardtanh(torch.add(first._gamma, s, alpha=first.zeta - first.gamma), 0.0, 1.0)
    out = []
    for m, part in zip(modules, z.split([m._n_gates for m in modules]), strict=True):
        if part.shape != m.shape:
            part = part.view(m.shape)
        dtype = m._logits().dtype
        out.append(part if part.dtype == dtype else part.to(dtype))
    return out


def _joint_noise(modules: list[HardConcrete], dtype: torch.dtype) -> torch.Tensor | None:
    # The next draw's noise of seeded modules, concatenated and divided by the temperature,
    # advancing each module's counter: a row of a block of _NOISE_BLOCK draws computed at
    # once (cached on the first module, with the counter tensors of those draws), so a
    # step costs no tensor operation. None when the modules are not all seeded at the
    # same draw count.
    first = modules[0]
    draw = first._draw_count()
    if any(m.seed is None or m._draw_count() != draw for m in modules):
        return None
    key = (
        tuple((id(m), m.seed, m.index_offset, m._gate_shape) for m in modules),
        first.temperature, dtype, first._logits().device,
    )  # fmt: skip
    cache = first._joint_cache
    if cache is None or cache[0] != key or not 0 <= draw - cache[1] < len(cache[2]):
        count = max(1, min(_NOISE_BLOCK, _NOISE_BLOCK_ELEMENTS // sum(m._n_gates for m in modules)))
        block = torch.cat(
            [logistic_noise(m.seed, draw, m._global_index(), dtype=dtype, count=count)
             .reshape(count, -1) for m in modules], dim=1,
        ).div_(first.temperature)  # fmt: skip
        device = first._buffers["draws"].device
        counters = [
            [
                torch.scalar_tensor(d + 1, dtype=torch.int64, device=device)
                for d in range(draw, draw + count)
            ]
            for _ in modules
        ]
        cache = first._joint_cache = (key, draw, block.unbind(0), counters)
    k = draw - cache[1]
    for m, counters in zip(modules, cache[3], strict=True):
        m._advance_draws(counters[k])
    return cache[2][k]


def share_log_alpha(
    modules: Sequence[HardConcrete], owner: nn.Module, name: str = "gate_log_alpha"
) -> nn.Parameter:
    """Move the logits of ``modules`` into one parameter ``owner.<name>``, concatenated in
    order (flattened); each module's ``log_alpha`` becomes a view of its slice.

    Nothing else changes (values, noise streams, draw counters), but an optimiser then
    sees one gate tensor instead of one per module, and :func:`rsample_jointly` and the
    penalties of :mod:`l0calib.nn` read the logits without concatenating them every step.
    ``owner.state_dict()`` holds the logits under ``name``; the modules' ``log_alpha``
    entries go. :class:`l0calib.nn.SparseMLP` does this for its layers.

    Parameters
    ----------
    modules : sequence of HardConcrete
        Each with its own ``log_alpha`` (not already shared), all of one dtype and device.
    owner : nn.Module
        The module that registers the shared parameter (usually the modules' ancestor, so
        that ``owner.to(...)`` converts it).
    name : str, default "gate_log_alpha"

    Returns
    -------
    nn.Parameter
        The shared logits, shape ``(sum of the modules' gate counts,)``.
    """
    modules = list(modules)
    if not modules:
        raise ParameterError("no modules to share log_alpha between")
    if any(m._shared is not None for m in modules):
        raise ParameterError("a module's log_alpha is already shared")
    own = [m._parameters["log_alpha"] for m in modules]
    if len({(t.dtype, t.device) for t in own}) > 1:
        raise ParameterError("the modules' log_alpha differ in dtype or device")
    bank = nn.Parameter(torch.cat([t.detach().reshape(-1) for t in own]))
    owner.register_parameter(name, bank)
    start = 0
    for m in modules:
        del m._parameters["log_alpha"]
        # Straight into __dict__: the owner is not a submodule of its own modules.
        m.__dict__["_shared"] = (owner, name, start)
        start += m._n_gates
    return bank


def _run_bounds(modules: Sequence[HardConcrete]) -> tuple[nn.Parameter, int, int] | None:
    # (shared parameter, start, end) when the modules' logits are consecutive slices of
    # one shared parameter, in order (else None).
    first = modules[0]._shared
    if first is None:
        return None
    owner, key, start = first
    end = start
    for m in modules:
        shared = m._shared
        if shared is None or shared[0] is not owner or shared[1] != key or shared[2] != end:
            return None
        end += m._n_gates
    return owner._parameters[key], start, end


def _shared_run(modules: Sequence[HardConcrete]) -> torch.Tensor | None:
    # The modules' logits as one slice of their shared parameter (see _run_bounds).
    run = _run_bounds(modules)
    if run is None:
        return None
    bank, start, end = run
    return bank if start == 0 and end == bank.numel() else bank[start:end]


def _small_cpu(m: HardConcrete) -> bool:
    la = m._logits()  # a shared parameter is 1-d: its slices are contiguous if it is
    return (
        la.device.type == "cpu" and la.dtype in _WORK_DTYPES and la.is_contiguous()
        and m._n_gates <= _NUMPY_SHIFT_MAX
    )  # fmt: skip


def shift_jointly(modules: Sequence[HardConcrete], goals: Sequence[float]) -> list[float]:
    """``[m.shift_to_expected(g) for m, g in zip(modules, goals)]``: each module's own
    shift, computed together for small CPU gates (a network's layers, every training step:
    one numpy pass over all their gates gives every module's first Newton step)."""
    modules, goals = list(modules), [float(g) for g in goals]
    if len(modules) != len(goals):
        raise ParameterError(f"got {len(modules)} modules and {len(goals)} goals")
    shifts = _shift_shared(modules, goals)
    if shifts is not None:
        return shifts
    if all(_small_cpu(m) for m in modules):
        return _shift_small(modules, goals)
    return [m.shift_to_expected(g) for m, g in zip(modules, goals, strict=True)]


# What _shift_shared keeps between calls for the last run of shared logits it solved:
# (key, (numpy view of the run, p / p^2 / p^3 buffer, each module's first index, count
# shift per gate or one for all)). A network's controller asks for the same run
# every training step.
_LAYOUT: list[Any] = [None, None]


def _shift_shared(modules: list[HardConcrete], goals: list[float]) -> list[float] | None:
    # _shift_small for small CPU modules whose logits are consecutive slices of one shared
    # parameter (a SparseMLP): the numpy pass reads the parameter's slice in place, with
    # the view and buffers kept between calls. None when the modules are not such a run.
    run = _run_bounds(modules)
    if run is None or not all(m.stretch for m in modules):
        return None
    param, start, end = run
    if not _small_cpu(modules[0]) or end - start > _NUMPY_SHIFT_MAX:
        return None
    counts = [m._n_gates for m in modules]
    _check_goals(goals, counts)
    cs = [m._count_shift() for m in modules]
    # The numpy view stays valid while the parameter keeps its storage (the view holds it).
    layout_key = (tuple(map(id, modules)), id(param), param.data_ptr(), start, end, tuple(cs))
    if _LAYOUT[0] != layout_key:
        starts = np.cumsum([0, *counts[:-1]])
        c = cs[0] if len(set(cs)) == 1 else np.repeat(cs, counts)
        src = param.detach().numpy()[start:end]
        _LAYOUT[:] = [layout_key, (src, np.empty((3, end - start)), starts, c)]
    # Inside a training loop every array touched here is out of cache (the optimiser has
    # just streamed the weights through it), so the pass touches as little as it can.
    src, powers, starts, c = _LAYOUT[1]
    sums = _sums_at_zero(src, c, powers, starts)
    shifts, lo = [], 0
    for j, (goal, count) in enumerate(zip(goals, counts, strict=True)):
        b = _shift_from(sums[0][j], sums[1][j], sums[2][j], src[lo : lo + count], cs[j], goal)
        # The slice minus its own shift cast to the logits' dtype: what sub_(b) does.
        src[lo : lo + count] -= b
        shifts.append(b)
        lo += count
    torch.autograd.graph.increment_version(param)
    return shifts


def _shift_small(modules: list[HardConcrete], goals: list[float]) -> list[float]:
    # shift_to_expected for small float32/float64 contiguous CPU gates without a mask, for
    # several modules at once: numpy only, on views of the logits made from their
    # parameters (a shared parameter once; views of log_alpha would cost tensor
    # operations). The sums at shift 0 of every module come from one pass over all gates;
    # a module whose quadratic step provably meets the tolerance from them (the usual
    # case after an optimiser step) is done, the others go through _solve_shift. The shift
    # is subtracted through the numpy view (the same rounding as torch's sub_) and
    # autograd's version counter bumped by hand.
    params: dict[int, tuple[nn.Parameter, np.ndarray]] = {}
    views = []
    for m in modules:
        param = m._logits()
        if id(param) not in params:
            params[id(param)] = (param, param.detach().numpy().reshape(-1))
        start = 0 if m._shared is None else m._shared[2]
        views.append(params[id(param)][1][start : start + m._n_gates])
    _check_goals(goals, [view.size for view in views])
    live = [i for i, (m, v) in enumerate(zip(modules, views, strict=True)) if v.size and m.stretch]
    shifts = [0.0] * len(modules)
    if not live:
        return shifts
    sizes = [views[i].size for i in live]
    xs = np.concatenate([views[i] for i in live], dtype=np.float64)
    cs = [modules[i]._count_shift() for i in live]
    starts = np.cumsum([0, *sizes[:-1]])
    c = cs[0] if len(set(cs)) == 1 else np.repeat(cs, sizes)
    sums = _sums_at_zero(xs, c, np.empty((3, xs.size)), starts)
    for j, i in enumerate(live):
        own = xs[starts[j] : starts[j] + sizes[j]]
        b = _shift_from(sums[0][j], sums[1][j], sums[2][j], own, cs[j], goals[i])
        views[i] -= b
        shifts[i] = b
    for param, _ in params.values():
        torch.autograd.graph.increment_version(param)  # views share its version counter
    return shifts


def _sums_at_zero(
    xs: np.ndarray, c: float | np.ndarray, powers: np.ndarray, starts: np.ndarray
) -> list[list[float]]:
    # [sum p, sum p^2, sum p^3] at shift 0 over each run of ``xs`` beginning at ``starts``
    # (rows of the result), ``powers`` a (3, len(xs)) float64 buffer.
    _fill_probs(xs, c, powers[0], powers[1])
    np.multiply(powers[1], powers[0], out=powers[2])
    return np.add.reduceat(powers, starts, axis=1).tolist()


def _check_goals(goals: list[float], counts: list[int]) -> None:
    for goal, count in zip(goals, counts, strict=True):
        if not 0.0 <= goal <= count:
            raise ParameterError(f"goal must be in [0, {count:g}], got {goal!r}")


def _shift_from(s1: float, s2: float, s3: float, own: np.ndarray, c: float, goal: float) -> float:
    """One module's shift, given the sums of p, p^2, p^3 at shift 0 over its logits
    ``own``: the first step when it provably meets the tolerance, else _solve_shift."""
    b = _first_step(s1, s2, s3, goal, own.size)
    if b is not None:
        return b
    own = own.astype(np.float64, copy=False)
    lo, hi = float(own.min()) - c - 50.0, float(own.max()) - c + 50.0
    return _solve_shift(_numpy_sums(own, c, None), goal, own.size, lo, hi)


def _fill_probs(xs: np.ndarray, cb: float | np.ndarray, buf: np.ndarray, sq: np.ndarray) -> None:
    # buf = sigmoid(xs - cb) and sq = buf^2, in place (float64).
    np.subtract(cb, xs, out=buf, dtype=np.float64)  # xs may be float32: exact in float64
    np.minimum(buf, 700.0, out=buf)  # exp stays finite: p >= 1e-304 instead of 0
    np.exp(buf, out=buf)
    np.add(buf, 1.0, out=buf)
    np.reciprocal(buf, out=buf)
    np.multiply(buf, buf, out=sq)


def _moments(p: np.ndarray, sq: np.ndarray) -> list[float]:
    return [float(p.sum()), float(sq.sum()), float(sq @ p)]


def _numpy_sums(
    xs: np.ndarray, c: float, total: Callable[[list[float]], list[float]] | None
) -> Callable[[float], list[float]]:
    """``sums(b) = [sum p, sum p^2, sum p^3]`` with ``p = sigmoid(xs - c - b)``, in float64
    over the float64 array ``xs`` (two buffers reused by every call), combined across
    processes by ``total`` when given."""
    buf, sq = np.empty_like(xs), np.empty_like(xs)

    def sums(b: float) -> list[float]:
        _fill_probs(xs, c + b, buf, sq)
        values = _moments(buf, sq)
        return values if total is None else total(values)

    return sums


def _quadratic_step(f: float, s1: float, s2: float, s3: float) -> tuple[float, float, float | None]:
    # f', f'' and the root nearest 0 of the quadratic model f + f' h + f'' h^2 / 2 (None if
    # the model has none or f' >= 0), from the sums [s1, s2, s3] of p, p^2, p^3.
    d1, d2 = -(s1 - s2), s1 - 3.0 * s2 + 2.0 * s3
    disc = d1 * d1 - 2.0 * d2 * f
    if d1 < 0 and disc >= 0:
        return d1, d2, -2.0 * f / (d1 - math.sqrt(disc))
    return d1, d2, None


def _model_error(f: float, d1: float, d2: float, h: float, size: float) -> float:
    # Bound on |f(b + h)|: the model's residual plus size |h|^3 / 48 (the third
    # derivative of the sigmoid is at most 1/8 in size).
    return abs(f + d1 * h + 0.5 * d2 * h * h) + size * abs(h) ** 3 / 48.0


def _first_step(s1: float, s2: float, s3: float, goal: float, size: float) -> float | None:
    """The shift from the sums at shift 0 alone, when it provably meets _solve_shift's
    tolerance (0, or the quadratic model's step); else None."""
    tol = 1e-6 * max(goal, 1.0)
    f = s1 - goal
    if abs(f) <= tol:
        return 0.0
    d1, d2, h = _quadratic_step(f, s1, s2, s3)
    if h is not None and _model_error(f, d1, d2, h, size) <= tol:
        return h
    return None


def _solve_shift(
    sums: Callable[[float], list[float]], goal: float, size: float, lo: float, hi: float
) -> float:
    """The shift ``b`` with ``f(b) = sum_i sigmoid(x_i - c - b) - goal = 0``, ``|f| <= 1e-6
    max(goal, 1)``, given ``sums(b) = [sum p, sum p^2, sum p^3]`` over ``size`` gates and a
    bracket ``f(lo) > 0 > f(hi)``.

    Steps to the root of the quadratic model ``f + f' h + f'' h^2 / 2`` (``f' = -(s1 -
    s2)``, ``f'' = s1 - 3 s2 + 2 s3``), else Newton, else bisection, always inside the
    bracket. The third derivative of the sigmoid is at most 1/8 in size, so the true value
    after a step differs from the model's by at most ``size |h|^3 / 48``: when that bound
    (plus the model's own residual) is within the tolerance, the step is taken without
    evaluating ``f`` again. After an optimiser step the shift is small, so one pass over
    the gates usually does.
    """
    tol = 1e-6 * max(goal, 1.0)
    b = 0.0 if lo < 0.0 < hi else 0.5 * (lo + hi)
    for _ in range(60):
        s1, s2, s3 = sums(b)
        f = s1 - goal
        if abs(f) <= tol:
            return b
        if f > 0:
            lo = b
        else:
            hi = b
        d1, d2, h = _quadratic_step(f, s1, s2, s3)  # f' (< 0), f'' and the model's step
        step = None
        if h is not None and lo < b + h < hi:
            if _model_error(f, d1, d2, h, size) <= tol:
                return b + h
            step = b + h
        if step is None and d1 < 0:
            step = b - f / d1
        b = step if step is not None and lo < step < hi else 0.5 * (lo + hi)
    return b
