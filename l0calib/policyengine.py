"""A drop-in for PolicyEngine's ``l0.calibration.SparseCalibrationWeights``, and entity pruning.

Switching a policyengine-us-data pipeline is one import::

    from l0calib.policyengine import SparseCalibrationWeights   # was: from l0.calibration

The constructor, ``fit``, ``forward``/``predict``, the getters, the parameters and the state
dict keep the names, defaults, shapes and behaviour of ``l0-python`` 0.6.2, with the same
model and loss:

- weights ``w_i = exp(log_weight_i) * z_i`` with a Hard Concrete gate ``z_i`` (temperature
  ``beta``, stretch interval ``(gamma, zeta)``), ``log_alpha`` clamped to
  ``[-LOG_ALPHA_BOUND, LOG_ALPHA_BOUND]`` wherever it is used; deterministic gates
  ``clamp(sigmoid(log_alpha / beta) * (zeta - gamma) + gamma, 0, 1)``;
- ``loss_type="relative"``: ``sum_k g_k ((y_k - yhat_k) / (y_k + 1))^2`` (note the ``+ 1``:
  the reference divides by ``y + 1``, not by ``|y|``); ``"mse"``: ``sum_k g_k (y_k -
  yhat_k)^2``; ``g_k`` = 1 / (size of k's group) with ``normalize_groups`` (times
  ``group_multipliers``), else 1;
- ``+ lambda_l0 * sum_i P(z_i != 0) + lambda_l2 * sum_i exp(log_weight_i)^2``;
- every ``fit()`` starts a new Adam optimizer, so a pipeline that fits in chunks keeps
  about as many records at a given ``lambda_l0`` as it did with ``l0-python``
  (``keep_optimizer=True`` continues the optimizer across calls instead);
- ``state_dict()`` holds ``log_weight`` and ``log_alpha``, so checkpoints load in either
  package.

The training itself is l0calib's engine (:mod:`l0calib.calibrate`, no second optimiser):
sparse CSR kernels with a precomputed transpose, seeded counter-based gate noise. What is
better than the reference:

- No stale matrix cache: every call uses the matrix it is given.
- ``fit(..., target_records=K)``: exactly K non-zero weights, chosen by the engine's
  survivor schedule (no ``lambda_l0`` to tune) and refitted; ``holdout=``,
  ``callback=``, ``log_path=`` as in :func:`l0calib.calibrate`.
- ``verbose`` reports through :mod:`logging` (logger ``l0calib.policyengine``) and a rich
  progress bar on a terminal, not bare prints.

:func:`prune_entities` drops the rows of every entity table that belong to a dropped
household; :mod:`l0calib.hdf5` reads and writes PolicyEngine's HDF5 datasets.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
import zlib
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn

from l0calib.calibrate import (
    HISTORY_COLUMNS,
    CalibrationResult,
    Progress,
    _CsvLog,
    _Fit,
    _Problem,
    _resolve_device,
    _result,
    _select_and_refit,
    _train,
)
from l0calib.exceptions import DataError, ParameterError
from l0calib.hardconcrete import HardConcrete
from l0calib.noise import counter_uniform
from l0calib.sparse import SparseOperator
from l0calib.targets import EstimateMatrix

__all__ = ["SparseCalibrationWeights", "prune_entities"]

log = logging.getLogger("l0calib.policyengine")

# counter_uniform streams of this class (distinct from the gates' own draw counter).
_ALPHA_JITTER, _WEIGHT_JITTER = 1 << 40, 1 << 41
# Version of the ``_extra_state`` entry a checkpoint carries (see ``state_dict``).
_EXTRA_FORMAT = 1


def _normal(seed: int, stream: int, n: int) -> torch.Tensor:
    """Standard normal numbers keyed by (seed, stream, index) (Box-Muller)."""
    idx = torch.arange(n, dtype=torch.int64)
    u1 = counter_uniform(seed, stream, idx)
    u2 = counter_uniform(seed, stream + 1, idx)
    return torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)


def _per_record(name: str, value: Any, n: int, default: float) -> np.ndarray:
    if value is None:
        return np.full(n, default)
    if np.isscalar(value):
        return np.full(n, float(value))  # type: ignore[arg-type]
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != (n,):
        raise ParameterError(f"{name} array must have shape ({n},), got {arr.shape}")
    return arr


def _check_interval(gamma: Any, zeta: Any) -> tuple[float, float]:
    gamma, zeta = float(gamma), float(zeta)
    if not (math.isfinite(gamma) and math.isfinite(zeta)):
        raise ParameterError(f"gamma and zeta must be finite, got gamma={gamma}, zeta={zeta}")
    if gamma > 0 or zeta <= 0:
        # P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta)) needs gamma <= 0 < zeta;
        # l0-python accepts other values and its L0 penalty is then NaN.
        raise ParameterError(
            f"the stretch interval needs gamma <= 0 < zeta (gates that can be exactly 0), "
            f"got gamma={gamma}, zeta={zeta}"
        )
    return gamma, zeta


class _ReferenceGates(HardConcrete):
    """l0calib's Hard Concrete gate as ``l0-python`` uses it: any stretch interval
    ``gamma <= 0 < zeta`` (not only ``zeta = 1 - gamma``), and ``log_alpha`` clamped to
    ``[-bound, bound]`` wherever it is read (so it gets no gradient beyond)."""

    bound = 20.0

    def set_interval(self, gamma: float, zeta: float) -> None:
        gamma, zeta = _check_interval(gamma, zeta)
        self.gamma, self.zeta = gamma, zeta
        self._gamma = torch.tensor(gamma, dtype=torch.float64)
        # ``stretch`` only tells HardConcrete whether a gate can be exactly 0 (it is 0 when
        # gamma is); the arithmetic reads gamma and zeta.
        self.stretch = -gamma

    def _work(self) -> torch.Tensor:
        return super()._work().clamp(-self.bound, self.bound)


class SparseCalibrationWeights(nn.Module):
    """Sparse calibration weights with L0 gates: ``l0-python``'s class, on l0calib's engine.

    Parameters
    ----------
    n_features : int
        Number of records (columns of the targets x records matrix).
    beta : float, default 2/3
        Hard Concrete temperature (> 0).
    gamma, zeta : float, default -0.1 and 1.1
        Stretch interval, ``gamma <= 0 < zeta``.
    init_keep_prob : float or array of shape (n_features,), default 0.5
        Initial ``sigmoid(log_alpha)``.
    init_weights : float or array of shape (n_features,), optional
        Initial weights (default 1).
    log_weight_jitter_sd : float, default 0.0
        Noise added to ``log_weight`` at the start of each ``fit`` (mutable attribute; the
        PolicyEngine pipeline zeroes it after the first chunk).
    log_alpha_jitter_sd : float, default 0.01
        Noise added to the initial ``log_alpha``.
    device : str, default "cpu"
    use_gates : bool, default True
    seed : int, optional
        Seeds the gate noise and the jitters. Without it a seed is drawn from torch's global
        generator (so ``torch.manual_seed`` still makes runs repeatable).
    keep_optimizer : bool, default False
        False (as ``l0-python``): every ``fit()`` starts a new Adam optimizer. True: the
        Adam state carries over from one ``fit()`` to the next (and into ``state_dict()``),
        so N chunks of E epochs equal one fit of N * E epochs. Mutable attribute.

    Attributes
    ----------
    log_weight, log_alpha : nn.Parameter of shape (n_features,)
        The parameters, as the reference names them (``model.parameters()`` yields both).
    beta, gamma, zeta : float
        Read at every use, as in the reference: assigning them changes the gates.
    result_ : CalibrationResult or None
        The report of the last ``fit``.

    Example
    -------
    >>> import numpy as np, scipy.sparse as sp
    >>> M = sp.csr_matrix(np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]))
    >>> model = SparseCalibrationWeights(3, init_weights=1.0, seed=0)
    >>> model = model.fit(M, np.array([4.0, 4.0]), lambda_l0=0.0, lr=0.1, epochs=50)
    >>> model.predict(M).shape, sorted(model.state_dict())
    (torch.Size([2]), ['log_alpha', 'log_weight'])
    """

    LOG_ALPHA_BOUND: float = 20.0

    def __init__(
        self,
        n_features: int,
        beta: float = 2 / 3,
        gamma: float = -0.1,
        zeta: float = 1.1,
        init_keep_prob: float | np.ndarray = 0.5,
        init_weights: float | np.ndarray | None = None,
        log_weight_jitter_sd: float = 0.0,
        log_alpha_jitter_sd: float = 0.01,
        device: str = "cpu",
        use_gates: bool = True,
        seed: int | None = None,
        *,
        keep_optimizer: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(n_features, bool) or not isinstance(n_features, (int, np.integer)):
            raise ParameterError(f"n_features must be a positive integer, got {n_features!r}")
        if n_features < 1:
            raise ParameterError(f"n_features must be a positive integer, got {n_features!r}")
        gamma, zeta = _check_interval(gamma, zeta)
        self.n_features = int(n_features)
        self.log_weight_jitter_sd = float(log_weight_jitter_sd)
        self.log_alpha_jitter_sd = float(log_alpha_jitter_sd)
        self.device = _resolve_device(device)
        self.use_gates = bool(use_gates)
        self.keep_optimizer = bool(keep_optimizer)
        self.seed = seed
        self.noise_seed = int(torch.randint(0, 2**62, (1,))) if seed is None else int(seed)
        self.fit_calls = 0
        self.epochs_done = 0
        n = self.n_features
        w = _per_record("init_weights", init_weights, n, 1.0)
        self.init_weights = w
        keep = np.clip(_per_record("init_keep_prob", init_keep_prob, n, 0.5), 1e-6, 1 - 1e-6)
        mu = torch.tensor(np.log(keep / (1 - keep)), dtype=torch.float32)
        if self.log_alpha_jitter_sd > 0:
            mu = mu + self.log_alpha_jitter_sd * _normal(self.noise_seed, _ALPHA_JITTER, n).float()
        gates = _ReferenceGates(
            n, temperature=beta, test_gate="median", seed=self.noise_seed, device=self.device,
        )  # fmt: skip
        gates.set_interval(gamma, zeta)
        with torch.no_grad():
            gates.log_alpha.copy_(mu.to(self.device))
        # Not a submodule: the state dict holds log_weight and log_alpha only, as the
        # reference's; the gates' log_alpha is this module's log_alpha (one Parameter).
        object.__setattr__(self, "_gates", gates)
        self._fit: _Fit | None = None
        self._pending_opt_state: dict | None = None
        self._operator: tuple[tuple, SparseOperator] | None = None
        self._final: torch.Tensor | None = None  # refitted weights after target_records
        self._final_key: tuple | None = None
        self.result_: CalibrationResult | None = None
        self.log_weight = nn.Parameter(
            torch.log(torch.tensor(w, dtype=torch.float32) + 1e-8).to(self.device)
        )
        self.log_alpha = gates.log_alpha

    # ------------------------------------------------------------------ parameters
    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("log_weight", "log_alpha") and isinstance(value, nn.Parameter):
            if tuple(value.shape) != (self.n_features,) or not value.is_floating_point():
                raise ParameterError(
                    f"{name} must be a floating Parameter of shape ({self.n_features},), got "
                    f"{value.dtype} of shape {tuple(value.shape)}"
                )
            super().__setattr__(name, value)
            if name == "log_alpha":
                self._gates._parameters["log_alpha"] = value
            # The optimizer and any refitted weights belong to the replaced Parameter.
            self._fit, self._pending_opt_state = None, None
            self._final = None
            return
        super().__setattr__(name, value)

    @property
    def gates(self) -> HardConcrete:
        """The Hard Concrete gates (their ``log_alpha`` is this model's ``log_alpha``)."""
        return self._gates

    @property
    def beta(self) -> float:
        """Hard Concrete temperature; assigning it changes the gates from then on."""
        return self._gates.temperature

    @beta.setter
    def beta(self, value: float) -> None:
        self._gates.temperature = float(value)  # ParameterError unless finite and > 0

    @property
    def gamma(self) -> float:
        """Lower end of the stretch interval (<= 0); assignable, as in the reference."""
        return self._gates.gamma

    @gamma.setter
    def gamma(self, value: float) -> None:
        self._gates.set_interval(value, self._gates.zeta)

    @property
    def zeta(self) -> float:
        """Upper end of the stretch interval (> 0); assignable, as in the reference."""
        return self._gates.zeta

    @zeta.setter
    def zeta(self, value: float) -> None:
        self._gates.set_interval(self._gates.gamma, value)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # .to() / .cuda() / .double(): the gates are not a submodule, so move their draw
        # counter here and point them at this module's (possibly new) log_alpha.
        out = super()._apply(fn, recurse)
        gates = self._gates
        gates._parameters["log_alpha"] = self._parameters["log_alpha"]
        gates._buffers["draws"] = fn(gates._buffers["draws"])
        self.device = self.log_weight.device
        self._fit, self._operator = None, None
        return out

    def __getstate__(self) -> dict[str, Any]:
        # Deep copies and pickles leave the training state's sparse tensors and threads
        # behind; a kept optimizer travels as its state dict.
        state = dict(self.__dict__)
        if self._fit is not None and self.keep_optimizer:
            state["_pending_opt_state"] = self._fit.opt.state_dict()
        state["_fit"], state["_operator"] = None, None
        return state

    # ------------------------------------------------------------------ reference getters
    def _refitted(self) -> torch.Tensor | None:
        """The weights refitted by ``fit(target_records=K)``, while the parameters are
        those they were refitted from (any change to them, a training step included,
        drops them)."""
        if self._final is not None and self._final_key != self._param_key():
            self._final = None
        return self._final

    def _param_key(self) -> tuple:
        a, w = self.log_alpha, self.log_weight
        return (id(a), a._version, id(w), w._version)

    def _sample_gates(self) -> torch.Tensor:
        """A differentiable sample of the gates (advances the gate noise by one draw)."""
        return self._gates.rsample()

    def get_deterministic_gates(self) -> torch.Tensor:
        """``clamp(sigmoid(log_alpha / beta) * (zeta - gamma) + gamma, 0, 1)``."""
        return self._gates.test_gates("median")

    def get_weights(self, deterministic: bool = False) -> torch.Tensor:
        """Weights, shape (n_features,): ``exp(log_weight) * gates``, differentiable.

        After ``fit(target_records=K)`` the deterministic weights are the refitted ones
        (exactly K non-zero, no gradient) until the parameters change.
        """
        final = self._refitted() if deterministic else None
        if final is not None:
            return final.clone()
        w = torch.exp(self.log_weight)
        if not self.use_gates:
            return w
        return w * (self.get_deterministic_gates() if deterministic else self._sample_gates())

    def _operator_for(self, M: Any, dtype: torch.dtype, device: torch.device) -> SparseOperator:
        """A differentiable product with ``M``, cached by ``M``'s content (a checksum of
        its arrays), never by its shape alone."""
        m = _csr(M, self.n_features)
        key = (m.shape, m.nnz, dtype, device,
               *(zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B"))
                 for a in (m.indptr, m.indices, m.data)))  # fmt: skip
        if self._operator is None or self._operator[0] != key:
            self._operator = (key, SparseOperator(m, dtype, device))
        return self._operator[1]

    def forward(self, M: sp.spmatrix, deterministic: bool = False) -> torch.Tensor:
        """``M @ get_weights(deterministic)``, shape (n_targets,), differentiable in
        ``log_weight`` and ``log_alpha`` (a custom training loop can train through it)."""
        w = self.get_weights(deterministic)
        return self._operator_for(M, w.dtype, w.device) @ w

    def predict(self, M: sp.spmatrix) -> torch.Tensor:
        """Estimates ``M @ get_weights(deterministic=True)`` for this matrix (never cached)."""
        with torch.no_grad():
            return self.forward(M, deterministic=True)

    def get_l0_penalty(self) -> torch.Tensor:
        """Expected number of non-zero gates, ``sum P(z != 0)``."""
        return self._gates.get_active_prob().sum()

    def get_l2_penalty(self) -> torch.Tensor:
        """``sum exp(log_weight)^2`` (the reference's L2)."""
        return (torch.exp(self.log_weight) ** 2).sum()

    def get_sparsity(self) -> float:
        """Fraction of deterministic weights that are exactly zero."""
        with torch.no_grad():
            return float((self.get_weights(deterministic=True) == 0).double().mean())

    def get_active_weights(self) -> dict:
        """``{"indices", "values", "count"}`` of the non-zero deterministic weights."""
        with torch.no_grad():
            w = self.get_weights(deterministic=True)
            mask = w > 0
            return {"indices": torch.where(mask)[0], "values": w[mask], "count": int(mask.sum())}

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any] | None:
        """What a checkpoint needs beyond ``log_weight`` and ``log_alpha``, or None when
        nothing: a kept optimizer, refitted weights."""
        opt = None
        if self.keep_optimizer:
            opt = self._fit.opt.state_dict() if self._fit is not None else self._pending_opt_state
        final = self._refitted()
        if opt is None and final is None:
            return None
        extra: dict[str, Any] = {
            "format": _EXTRA_FORMAT,
            "noise_seed": self.noise_seed,
            "draws": self._gates._draw_count(),
            "fit_calls": self.fit_calls,
            "epochs_done": self.epochs_done,
        }
        if opt is not None:
            extra["optimizer"] = opt
        if final is not None:
            extra["final_weights"] = final.detach().clone()
        return extra

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        extra = self._extra_state()
        if extra is not None:
            destination[prefix + "_extra_state"] = extra

    def _load_from_state_dict(
        self, state_dict: Any, prefix: str, local_metadata: Any, strict: bool,
        missing_keys: list, unexpected_keys: list, error_msgs: list,
    ) -> None:  # fmt: skip
        extra = state_dict.pop(prefix + "_extra_state", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)  # fmt: skip
        self._fit, self._pending_opt_state, self._final = None, None, None
        if extra is None:
            # A reference checkpoint, parameters only: the gate noise continues on a stream
            # keyed by the seed and the loaded parameters, so a resumed fit neither replays
            # the draws already used nor depends on anything but its inputs.
            crc = 0
            for p in (self.log_weight, self.log_alpha):
                data = p.detach().cpu().contiguous().numpy()
                crc = zlib.crc32(memoryview(data).cast("B"), crc)
            self.noise_seed = (self.noise_seed * 1_000_003 + crc) % 2**62
            self._gates.seed = self.noise_seed
            self._gates._buffers["draws"] = torch.zeros((), dtype=torch.int64, device=self.device)
            self._gates._draw_seen = None
            return
        if not isinstance(extra, Mapping) or extra.get("format") != _EXTRA_FORMAT:
            error_msgs.append(f"{prefix}_extra_state: not an l0calib checkpoint entry")
            return
        self.noise_seed = int(extra["noise_seed"])
        self._gates.seed = self.noise_seed
        self._gates._buffers["draws"] = torch.tensor(int(extra["draws"]), device=self.device)
        self._gates._draw_seen = None
        self.fit_calls, self.epochs_done = int(extra["fit_calls"]), int(extra["epochs_done"])
        self._pending_opt_state = extra.get("optimizer")
        final = extra.get("final_weights")
        if final is not None:
            self._final = final.to(self.device)
            self._final_key = self._param_key()

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """``log_weight`` and ``log_alpha``, as the reference's (a checkpoint either package
        loads), plus ``_extra_state`` only when the model holds what those cannot: the
        optimizer with ``keep_optimizer=True``, the refitted weights after
        ``fit(target_records=K)``. Plain tensors and numbers: loadable with
        ``torch.load(..., weights_only=True)``."""
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> Any:  # fmt: skip
        """Restore :meth:`state_dict`, or a checkpoint written by ``l0-python``."""
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ------------------------------------------------------------------ fitting
    def _problem(
        self, M: Any, y: Any, loss_type: str, target_groups: Any, normalize_groups: bool,
        group_multipliers: dict | None, holdout: Any,
    ) -> _Problem:  # fmt: skip
        m = _csr(M, self.n_features)
        yv = np.asarray(y, dtype=np.float64).ravel()
        if yv.shape != (m.shape[0],):
            raise ParameterError(f"y must have shape ({m.shape[0]},), got {yv.shape}")
        if not np.isfinite(yv).all():
            raise ParameterError("y has non-finite values")
        if loss_type not in ("mse", "relative"):
            raise ParameterError(f"loss_type must be 'mse' or 'relative', got {loss_type!r}")
        if group_multipliers is not None and target_groups is None:
            raise ParameterError("group_multipliers requires target_groups to be set")
        g = np.ones(yv.size)
        groups = None
        if target_groups is not None:
            groups = np.asarray(target_groups)
            if groups.shape != yv.shape:
                raise ParameterError(f"target_groups must have shape {yv.shape}")
            if normalize_groups:
                _, inv, counts = np.unique(groups, return_inverse=True, return_counts=True)
                g = 1.0 / counts[inv]
            for gid, mult in (group_multipliers or {}).items():
                hit = groups == gid
                if not hit.any():
                    raise ParameterError(f"group_multipliers key {gid} not found in target_groups")
                g = np.where(hit, g * mult, g)
        hold = np.zeros(yv.size, dtype=bool)
        if holdout is not None:
            h = np.asarray(holdout)
            if h.dtype == bool:
                if h.shape != hold.shape:
                    raise ParameterError(f"holdout mask must have shape {hold.shape}")
                hold = h.copy()
            else:
                hold[h.astype(np.int64)] = True
        names = tuple(f"target_{k}" for k in range(yv.size))
        em = EstimateMatrix(
            matrix=m, names=names, values=yv,
            groups=np.array([None] * yv.size if groups is None else groups, dtype=object),
            importance=np.ones(yv.size), tolerance=np.zeros(yv.size),
            weights=self.init_weights.copy(),
        )  # fmt: skip
        # The reference's loss, written as the engine's sum_k c_k (e_k / scale_k)^2.
        scale = yv + 1.0 if loss_type == "relative" else np.ones(yv.size)
        if np.any(scale == 0):
            raise ParameterError("a target of -1 makes the reference's relative loss divide by 0")
        return _Problem(
            em=em, w0=np.ones(self.n_features), holdout=hold,
            coef=np.where(hold, 0.0, g), scale=np.abs(scale), tol=np.zeros(yv.size),
            scale_floor=1.0,
        )  # fmt: skip

    def _trainer(self, pb: _Problem, lambda_l0: float, lambda_l2: float, lr: float) -> _Fit:
        """The engine's training state for this call: a new one (a new Adam optimizer, as
        the reference makes at every ``fit``), or with ``keep_optimizer`` the previous one
        (or one restored from a checkpoint) continued on this call's problem."""
        gates = self._gates if self.use_gates else None
        fit = self._fit if self.keep_optimizer else None
        if fit is not None and (fit.u is not self.log_weight or fit.gates is not gates):
            fit = None  # use_gates changed since: a new optimizer over the right parameters
        if fit is None:
            fit = _Fit(
                pb, gated=self.use_gates, lambda_l0=lambda_l0, lambda_l2=lambda_l2, lr=lr,
                temperature=self.beta, init_keep=0.5, seed=0, device=self.device,
                dtype=self.log_weight.dtype, u=self.log_weight, gates=gates,
                inflate=False, l0_per_record=False, l2_kind="square",
            )  # fmt: skip
            if self.keep_optimizer and self._pending_opt_state is not None:
                fit.opt.load_state_dict(self._pending_opt_state)
            self._pending_opt_state = None
        else:
            fit.set_problem(pb)
        fit.lambda_l2 = float(lambda_l2)
        for group in fit.opt.param_groups:
            group["lr"] = float(lr)
        return fit

    def fit(
        self,
        M: sp.spmatrix,
        y: np.ndarray,
        lambda_l0: float = 0.01,
        lambda_l2: float = 0.0,
        lr: float = 0.01,
        epochs: int = 1000,
        loss_type: str = "mse",
        verbose: bool = False,
        verbose_freq: int = 100,
        target_groups: np.ndarray | None = None,
        normalize_groups: bool = True,
        group_multipliers: dict[int, float] | None = None,
        *,
        target_records: int | None = None,
        holdout: Any = None,
        callback: Callable[[Progress], bool | None] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        log_every: int = 10,
        refit_l2: float | None = None,
    ) -> SparseCalibrationWeights:
        """Fit the weights so that ``M @ w`` matches ``y``, from the current parameters.

        The reference's arguments keep their meaning. As there, each call starts a new
        Adam optimizer (``keep_optimizer=True`` on the model continues the previous one),
        and ``epochs=0`` only applies the ``log_weight`` jitter. New, keyword-only:

        target_records : int, optional
            Keep exactly this many records: during this call the expected number of open
            gates is steered from its current value to K (``lambda_l0`` is then ignored),
            the K most likely records are kept and their weights refitted with the same
            loss. ``get_weights(deterministic=True)`` then returns those weights.
        holdout : boolean mask or indices of targets, optional
            Left out of the loss, reported in ``result_``.
        callback, log_path, log_every
            As for :func:`l0calib.calibrate`.
        refit_l2 : float, optional
            Pull of the refit toward the trained weights of the kept records (default as
            the engine's: 1e-3, or 1e-6 when every record is kept).

        Returns
        -------
        self
        """
        start = time.perf_counter()
        pb = self._problem(M, y, loss_type, target_groups, normalize_groups,
                           group_multipliers, holdout)  # fmt: skip
        n = self.n_features
        if target_records is not None and not (
            isinstance(target_records, (int, np.integer)) and 1 <= target_records <= n
        ):
            raise ParameterError(
                f"target_records must be between 1 and {n:,}, got {target_records!r}"
            )
        if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
            raise ParameterError(f"epochs must be an integer >= 0, got {epochs!r}")
        if self.log_weight_jitter_sd > 0:
            stream = _WEIGHT_JITTER + 2 * self.fit_calls
            noise = _normal(self.noise_seed, stream, n).to(self.log_weight)
            with torch.no_grad():
                self.log_weight.add_(noise * self.log_weight_jitter_sd)
        self.fit_calls += 1
        self._final = None
        self._operator = None  # the engine holds its own copy of M while it trains
        fit = self._trainer(pb, lambda_l0, lambda_l2, lr)
        fit.lambda_l0 = 0.0 if target_records is not None else float(lambda_l0)
        steered = target_records if (target_records is not None and self.use_gates) else None
        bar = _progress(verbose, int(epochs))
        user_callback = callback
        epoch0 = self.epochs_done

        def report(p: Progress) -> bool | None:
            if bar is not None:
                bar[0].update(bar[1], completed=p.epoch - epoch0,
                              status=f"mean err {p.mean_abs_rel_error:.3%}")  # fmt: skip
            if verbose and (p.epoch - epoch0) % verbose_freq == 0:
                log.info(
                    "epoch %d: loss %.4g, mean rel error %.4f%%, max %.2f%%, active %d/%d",
                    p.epoch, p.loss, 100 * p.mean_abs_rel_error, 100 * p.max_abs_rel_error,
                    self.get_active_weights()["count"], n,
                )  # fmt: skip
            return user_callback(p) if user_callback is not None else None

        with bar[0] if bar is not None else nullcontext(), _CsvLog(log_path) as csv_log:
            loop = _train(
                fit, pb, epochs=int(epochs), k_goal=steered, patience=10**9,
                callback=report, log=csv_log, log_every=log_every, epoch0=epoch0,
            )  # fmt: skip
        self.epochs_done = loop.epoch
        if target_records is not None:
            weights, _, info, scores = _select_and_refit(
                fit, pb, target_records, float(target_records), fixed=None, refit=True,
                refit_l2=refit_l2, refit_anchor="trained", refit_max_iter=2000,
            )  # fmt: skip
            self._final = torch.tensor(weights, dtype=self.log_weight.dtype, device=self.device)
            self._final_key = self._param_key()
        else:
            weights = self.get_weights(deterministic=True).detach().double().cpu().numpy()
            info, scores = {"refit_converged": True}, fit.keep_scores()
        # Only a kept optimizer is worth its memory (the engine holds a copy of M).
        self._fit = fit if self.keep_optimizer else None
        self.result_ = _result(
            # Diagnostics against the initial weights (training ran with w0 = 1).
            dataclasses.replace(pb, w0=self.init_weights),
            weights, tol=None, converged=bool(info["refit_converged"]),
            not_converged_reason="the refit did not converge",
            history=pd.DataFrame(loop.history, columns=list(HISTORY_COLUMNS)),
            n_iter=loop.epoch, start=start, seed=self.noise_seed,
            method="l0-policyengine", info=info, keep_probability=scores,
        )  # fmt: skip
        return self


def _csr(M: Any, n: int) -> sp.csr_matrix:
    if sp.issparse(M):
        m = M.tocsr().astype(np.float64)
    else:
        m = sp.csr_matrix(np.asarray(M, dtype=np.float64))
    if m.ndim != 2 or m.shape[1] != n:
        raise ParameterError(f"M must have shape (n_targets, {n}), got {m.shape}")
    if m.nnz and not np.isfinite(m.data).all():
        raise ParameterError("M has non-finite values")
    return m


def _progress(verbose: bool, epochs: int):
    """A rich progress bar on a terminal when verbose, else None."""
    if not (verbose and sys.stderr.isatty()):
        return None
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("[bold]fitting"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), transient=True,
    )  # fmt: skip
    return bar, bar.add_task("fit", total=epochs, status="")


def prune_entities(
    tables: Mapping[str, pd.DataFrame],
    kept_household_ids: Any,
    *,
    links: Mapping[str, str] | None = None,
    person_entity: str = "person",
) -> dict[str, pd.DataFrame]:
    """Drop every row of every entity table that belongs to a dropped household.

    Parameters
    ----------
    tables : mapping of entity name -> DataFrame
        E.g. ``{"person": ..., "tax_unit": ..., "spm_unit": ..., "household": ...}``.
    kept_household_ids : array-like
        Ids of the households that remain.
    links : mapping of entity name -> link column, optional
        The column holding each row's household id. Defaults: ``person_household_id`` for
        ``person_entity``, ``household_id`` for ``household``, ``<entity>_household_id``
        otherwise.
    person_entity : str, default "person"

    Returns
    -------
    dict of entity name -> DataFrame
        The kept rows of each table, in input order.

    Raises
    ------
    DataError
        A link column is missing, a row links to a household that is not in the household
        table (when one is given), or a group entity (``tax_unit``...) has rows in two
        households (detected through its own id column, ``<entity>_id``, when present).

    Example
    -------
    >>> hh = pd.DataFrame({"household_id": [1, 2]})
    >>> tu = pd.DataFrame({"tax_unit_id": [10, 20], "tax_unit_household_id": [1, 2]})
    >>> out = prune_entities({"household": hh, "tax_unit": tu}, [2])
    >>> out["tax_unit"]["tax_unit_id"].tolist()
    [20]
    """
    links = dict(links or {})
    kept = pd.Index(np.asarray(kept_household_ids))
    known = None
    if "household" in tables:
        col = links.get("household", "household_id")
        if col not in tables["household"].columns:
            raise DataError(f"household table: link column '{col}' is missing")
        known = pd.Index(tables["household"][col])
    out = {}
    for entity, frame in tables.items():
        default = (
            "person_household_id" if entity == person_entity
            else "household_id" if entity == "household"
            else f"{entity}_household_id"
        )  # fmt: skip
        col = links.get(entity, default)
        if col not in frame.columns:
            raise DataError(f"{entity} table: link column '{col}' is missing")
        ids = frame[col]
        if known is not None and entity != "household":
            unknown = ~ids.isin(known)
            if unknown.any():
                row = int(np.flatnonzero(unknown.to_numpy())[0])
                value = ids.iloc[row]
                value = value.item() if hasattr(value, "item") else value
                raise DataError(
                    f"{entity} table data row {row + 1}: {col}={value!r} is not a household id"
                )
        own = f"{entity}_id"
        if entity not in (person_entity, "household") and own in frame.columns:
            spread = frame.groupby(own)[col].nunique()
            split = spread[spread > 1]
            if len(split):
                first = split.index[0]
                first = first.item() if hasattr(first, "item") else first
                raise DataError(
                    f"{entity} table: {own}={first!r} belongs to {int(split.iloc[0])} "
                    "households; a group entity must sit inside one household"
                )
        out[entity] = frame.loc[ids.isin(kept).to_numpy()]
    return out
