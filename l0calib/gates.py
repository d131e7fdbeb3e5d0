"""Selection gates that learn: SampleGate and HybridGate pick records, FeatureGate features.

The reference ``l0`` package has these names, but nothing trains them. Here:

- :class:`SampleGate` ``.fit`` runs the calibration engine (:func:`l0calib.calibrate`) with
  ``target_records=target_samples``: the L0 gates learn which records keep the targets,
  exactly ``target_samples`` survive, and their weights are recalibrated.
- :class:`HybridGate` draws part of the sample at random (probability proportional to
  weight, seeded, optionally stratified: :func:`pps_sample`) and lets the engine choose the
  rest around it (``calibrate(always_keep=...)``), then recalibrates them all.
- :class:`FeatureGate` ``.fit`` trains an L0-gated linear model (regression or
  classification) with an exact feature budget, held by shifting the gate logits (the
  engine's controller, :meth:`HardConcrete.shift_to_expected`).

Before ``fit`` every selection is still well defined: the items with the highest keep
probability, ties broken by a seeded random key (so an untrained gate gives a seeded random
selection of exactly the requested size).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from l0calib._checks import finite, positive_int
from l0calib.calibrate import CalibrationResult, calibrate, refit
from l0calib.exceptions import ParameterError
from l0calib.hardconcrete import HardConcrete
from l0calib.noise import counter_uniform
from l0calib.targets import as_estimate_matrix

__all__ = ["FeatureGate", "HybridGate", "L0Gate", "SampleGate", "pps_sample"]

# Stream ids for counter_uniform, so the draws of different purposes never coincide.
_TIE_BREAK, _PPS = 1, 2
# An untrained gate starts with every keep-probability equal to the wanted fraction; kept
# inside (0, 1) because a logit of +-inf cannot be trained.
_INIT_CLIP = (1e-3, 0.999)


def _uniforms(seed: int, stream: int, n: int) -> np.ndarray:
    return counter_uniform(seed, stream, torch.arange(n, dtype=torch.int64)).numpy()


def _seed(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ParameterError(f"seed must be an integer, got {value!r}")
    return int(value)


def _count(name: str, value: object, n: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= n:
        raise ParameterError(f"{name} must be an integer between 0 and {n:,}, got {value!r}")
    return int(value)


def _top(scores: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Indices of the ``k`` highest scores, ties broken by a seeded key; sorted ascending."""
    key = _uniforms(seed, _TIE_BREAK, scores.size)
    order = np.lexsort((key, -scores))  # last key is primary
    return np.sort(order[:k])


def _n_items(data: Any, axis: int) -> int:
    return int(data.shape[axis])


def _take(data: Any, idx: np.ndarray, axis: int) -> Any:
    """Rows (axis 0) or columns (axis 1) of a tensor, array or DataFrame, same type back."""
    if isinstance(data, pd.DataFrame):
        return data.iloc[idx] if axis == 0 else data.iloc[:, idx]
    if isinstance(data, pd.Series) and axis == 0:
        return data.iloc[idx]
    if isinstance(data, torch.Tensor):
        return data.index_select(axis, torch.as_tensor(idx, dtype=torch.long, device=data.device))
    return np.take(np.asarray(data), idx, axis=axis)


def _like(data: Any, idx: np.ndarray) -> Any:
    """Indices as a tensor when the data is one, else as a numpy array."""
    return torch.as_tensor(idx, dtype=torch.long) if isinstance(data, torch.Tensor) else idx


def _check_len(data: Any, n: int, what: str, axis: int = 0) -> None:
    if not hasattr(data, "shape") or len(data.shape) <= axis:
        raise ParameterError(
            f"data must be a tensor, array or DataFrame with {what} on axis {axis}"
        )
    if data.shape[axis] != n:
        raise ParameterError(
            f"data has {data.shape[axis]:,} {what} on axis {axis}, the gate was made for {n:,}"
        )


def pps_sample(
    weights: Any,
    k: int,
    *,
    seed: int = 0,
    strata: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``k`` records without replacement, with probability proportional to weight.

    Uses the exponential-key method of Efraimidis & Spirakis (2006, "Weighted random
    sampling with a reservoir", IPL 97(5)): record ``i`` gets key ``log(u_i) / w_i`` with
    ``u_i`` uniform, keyed by (seed, record index) so the draw does not depend on how the
    records are split, and the ``k`` largest keys are taken. With ``strata``, ``k`` is
    first shared out in proportion to each stratum's total weight (largest remainders, at
    most the stratum's size), then drawn within each stratum.

    Parameters
    ----------
    weights : array-like, shape (n,)
        Non-negative weights; records of weight 0 are drawn only when nothing else is left.
    k : int
        Records to draw, ``0 <= k <= n``.
    seed : int, default 0
    strata : array-like, shape (n,), optional
        A stratum label per record.

    Returns
    -------
    indices : numpy.ndarray of int64, shape (k,)
        Sorted ascending.
    design_weights : numpy.ndarray, shape (k,)
        Each drawn record's expansion weight, ``W_h / k_h`` (its stratum's total weight over
        the records drawn from it): the Horvitz-Thompson weight when inclusion is exactly
        proportional to weight, so the drawn sample carries the total weight.

    Example
    -------
    >>> idx, dw = pps_sample([1.0, 1.0, 2.0, 4.0], 2, seed=0)
    >>> len(idx), float(dw.sum())
    (2, 8.0)
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1:
        raise ParameterError(f"weights must be 1-D, got shape {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ParameterError("weights must be finite and >= 0")
    n = w.size
    k = _count("k", k, n)
    seed = _seed(seed)
    u = _uniforms(seed, _PPS, n)
    with np.errstate(divide="ignore"):
        key = np.where(w > 0, np.log(u) / np.where(w > 0, w, 1.0), -np.inf)
    labels = np.zeros(n, dtype=np.int64) if strata is None else _strata_codes(strata, n)
    chosen, design = [], []
    for h, k_h in _allocate(labels, w, k).items():
        members = np.flatnonzero(labels == h)
        if k_h == 0:
            continue
        order = members[np.lexsort((members, -key[members]))][:k_h]
        chosen.append(order)
        total = float(w[members].sum())
        design.append(np.full(k_h, total / k_h if total > 0 else members.size / k_h))
    if not chosen:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    idx = np.concatenate(chosen)
    dw = np.concatenate(design)
    order = np.argsort(idx)
    return idx[order].astype(np.int64), dw[order]


def _strata_codes(strata: Any, n: int) -> np.ndarray:
    s = pd.Series(np.asarray(strata))
    if len(s) != n:
        raise ParameterError(f"strata has {len(s):,} labels, expected one per record ({n:,})")
    if s.isna().any():
        raise ParameterError(
            f"strata has a missing label at record {int(np.flatnonzero(s.isna())[0])}"
        )
    return pd.factorize(s, sort=True)[0].astype(np.int64)


def _allocate(labels: np.ndarray, w: np.ndarray, k: int) -> dict[int, int]:
    """Share ``k`` among strata in proportion to total weight (largest remainders, capped)."""
    codes = np.unique(labels)
    size = np.array([(labels == h).sum() for h in codes])
    total = np.array([w[labels == h].sum() for h in codes])
    share = total if total.sum() > 0 else size.astype(float)
    alloc = np.zeros(codes.size, dtype=np.int64)
    left = k
    open_ = np.ones(codes.size, dtype=bool)
    while left > 0:
        quota = left * share * open_ / max(float((share * open_).sum()), 1e-300)
        add = np.minimum(np.floor(quota).astype(np.int64), size - alloc)
        rest = left - int(add.sum())
        if rest > 0:
            # Largest remainders first; ties to the lower stratum code.
            room = (size - alloc - add) > 0
            order = np.lexsort((codes, -(quota - np.floor(quota))))
            for j in order:
                if rest == 0:
                    break
                if room[j] and open_[j]:
                    add[j] += 1
                    rest -= 1
        alloc += add
        left = k - int(alloc.sum())
        open_ = alloc < size
        if left > 0 and not open_.any():  # pragma: no cover - k <= n guarantees room
            break
        if left > 0 and add.sum() == 0:
            # Open strata have zero share: give the rest by size.
            share = np.where(open_, size - alloc, 0).astype(float)
    return dict(zip(codes.tolist(), alloc.tolist(), strict=True))


class L0Gate(nn.Module):
    """A vector of Hard Concrete gates over items (records or features).

    The base of :class:`SampleGate` and :class:`FeatureGate`, with the reference ``l0``
    package's methods: ``get_gates()`` (a sample in training mode, the deterministic gate
    in eval mode), ``apply_gates(x, dim)``, ``get_penalty()`` (expected number of open
    gates), ``get_active_indices(threshold)``.

    Parameters
    ----------
    size : int
        Number of items.
    temperature : float, default 0.5
    init_mean : float, default 0.5
        Initial keep-probability ``sigmoid(log_alpha)``, strictly between 0 and 1.
    seed : int, default 0
        Seeds the gate noise and the tie-break of selections.
    """

    def __init__(
        self, size: int, temperature: float = 0.5, init_mean: float = 0.5, *, seed: int = 0
    ) -> None:
        super().__init__()
        self.size = positive_int("size", size)
        self.seed = _seed(seed)
        self.temperature = temperature
        self.init_mean = init_mean
        self.gates = HardConcrete(size, temperature=temperature, init_mean=init_mean, seed=seed)

    def get_gates(self) -> torch.Tensor:
        """Gate values, shape (size,): sampled in training mode, deterministic in eval."""
        return self.gates()

    def apply_gates(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """``x`` multiplied by the gates along ``dim`` (which must have ``size`` entries)."""
        if x.shape[dim] != self.size:
            raise ParameterError(f"x has {x.shape[dim]} entries on dim {dim}, expected {self.size}")
        shape = [1] * x.dim()
        shape[dim] = self.size
        return x * self.get_gates().reshape(shape).to(x.dtype)

    def get_penalty(self) -> torch.Tensor:
        """Expected number of non-zero gates (differentiable)."""
        return self.gates.get_penalty()

    @torch.no_grad()
    def get_active_indices(self, threshold: float = 0.5) -> torch.Tensor:
        """Indices whose keep-probability ``P(z != 0)`` exceeds ``threshold``."""
        return torch.nonzero(self.gates.get_active_prob() > threshold).flatten()

    @torch.no_grad()
    def keep_probability(self) -> np.ndarray:
        """``P(z != 0)`` per item, float64 numpy."""
        return self.gates.get_active_prob().double().numpy()

    @torch.no_grad()
    def _set_keep_probability(self, p: np.ndarray) -> None:
        """Load learned keep-probabilities into the gate logits (inverse of get_active_prob)."""
        q = np.clip(p, 1e-6, 1 - 1e-6)
        shift = self.gates.temperature * math.log(-self.gates.gamma / self.gates.zeta)
        la = np.log(q) - np.log1p(-q) + shift
        self.gates.log_alpha.copy_(torch.as_tensor(la, dtype=self.gates.log_alpha.dtype))

    def _select(self, k: int) -> np.ndarray:
        return _top(self.keep_probability(), k, self.seed)


def _init_mean(k: int, n: int) -> float:
    return float(np.clip(k / n, *_INIT_CLIP))


class SampleGate(L0Gate):
    """Choose exactly ``target_samples`` records that keep the calibration targets.

    Parameters
    ----------
    n_samples : int
        Number of records ``n``.
    target_samples : int
        Records to keep, ``0 <= target_samples <= n_samples``.
    temperature : float, default 0.25
        Hard Concrete temperature of the gates (passed to the engine by :meth:`fit`).
    seed : int, default 0
        Seeds the engine's gate noise and the tie-break of an untrained selection.

    Attributes (after :meth:`fit`)
    ------------------------------
    result_ : CalibrationResult
        The engine's result (report, diagnostics, history).
    weights_ : numpy.ndarray, shape (n_samples,)
        Recalibrated weights, 0 for records not selected.
    indices_ : numpy.ndarray, shape (target_samples,)
        The selected records, ascending.

    Example
    -------
    >>> import numpy as np
    >>> gate = SampleGate(n_samples=10, target_samples=4)
    >>> data, idx = gate.select_samples(np.arange(10.0))   # untrained: seeded, exactly 4
    >>> len(idx)
    4
    """

    def __init__(
        self, n_samples: int, target_samples: int, temperature: float = 0.25, *, seed: int = 0
    ) -> None:
        n_samples = positive_int("n_samples", n_samples)
        target_samples = _count("target_samples", target_samples, n_samples)
        super().__init__(n_samples, temperature, _init_mean(target_samples, n_samples), seed=seed)
        self.n_samples = n_samples
        self.target_samples = target_samples
        self.result_: CalibrationResult | None = None
        self.weights_: np.ndarray | None = None
        self.indices_: np.ndarray | None = None

    def fit(self, matrix: Any, targets: Any = None, *, weights: Any = None, **options: Any
            ) -> SampleGate:  # fmt: skip
        """Learn which ``target_samples`` records keep the targets, and their weights.

        Runs :func:`l0calib.calibrate` with ``target_records=target_samples`` (plus any
        ``options`` it takes: ``epochs``, ``holdout``, ``lambda_l2``, ``device``,
        ``callback``...); ``seed`` and ``temperature`` default to the gate's.

        Parameters
        ----------
        matrix, targets, weights
            As for :func:`l0calib.calibrate`; the matrix must have ``n_samples`` records.

        Returns
        -------
        self
        """
        if self.target_samples == 0:
            raise ParameterError("target_samples is 0: there is nothing to fit")
        em = as_estimate_matrix(matrix, targets)
        if em.n_records != self.n_samples:
            raise ParameterError(
                f"the matrix has {em.n_records:,} records, the gate was made for {self.n_samples:,}"
            )
        options.setdefault("seed", self.seed)
        options.setdefault("temperature", self.gates.temperature)
        res = calibrate(em, weights=weights, target_records=self.target_samples, **options)
        self._store(res)
        return self

    def _store(self, res: CalibrationResult) -> None:
        self.result_ = res
        self.weights_ = res.weights
        self.indices_ = np.flatnonzero(res.kept)
        if res.keep_probability is not None:
            self._set_keep_probability(res.keep_probability)

    def _indices(self) -> np.ndarray:
        return self.indices_ if self.indices_ is not None else self._select(self.target_samples)

    def select_samples(self, data: Any) -> tuple[Any, Any]:
        """The selected rows of ``data`` (tensor, array or DataFrame; same type back).

        After :meth:`fit`: the records the engine kept. Before: the ``target_samples``
        records with the highest keep-probability, ties broken by the seeded key.

        Returns
        -------
        selected_data, indices
            ``indices`` ascending (a tensor when ``data`` is one).
        """
        _check_len(data, self.n_samples, "samples")
        idx = self._indices()
        return _take(data, idx, 0), _like(data, idx)

    def select_weighted_samples(self, data: Any, weights: Any = None) -> tuple[Any, Any, Any]:
        """The selected rows with their weights.

        After :meth:`fit` the weights are the recalibrated ``weights_`` (``weights`` is not
        needed). Before, they are ``weights`` inflated by ``n_samples / target_samples``
        (the expansion weight of an equal-probability draw).

        Returns
        -------
        selected_data, selected_weights, indices
            ``selected_weights`` has the type of ``weights`` (numpy if not given).
        """
        _check_len(data, self.n_samples, "samples")
        idx = self._indices()
        if self.weights_ is not None:
            sel = self.weights_[idx]
            if isinstance(weights, torch.Tensor):
                sel = torch.as_tensor(sel, dtype=weights.dtype)
        else:
            if weights is None:
                raise ParameterError("give weights, or call fit() first")
            _check_len(weights, self.n_samples, "weights")
            factor = self.n_samples / max(self.target_samples, 1)
            sel = _take(weights, idx, 0) * factor
        return _take(data, idx, 0), sel, _like(data, idx)


def _fractions(l0: object, rand: object) -> tuple[float, float]:
    a, b = finite("l0_fraction", l0), finite("random_fraction", rand)
    for name, v in (("l0_fraction", a), ("random_fraction", b)):
        if not 0.0 <= v <= 1.0:
            raise ParameterError(f"{name} must be between 0 and 1, got {v!r}")
    if a + b > 1.0 + 1e-9:
        raise ParameterError(f"l0_fraction + random_fraction must be at most 1, got {a + b:g}")
    if a + b == 0:
        raise ParameterError("l0_fraction and random_fraction are both 0: nothing to select")
    return a, b


class HybridGate(nn.Module):
    """Keep ``target_items`` records: some chosen by the L0 engine, the rest at random.

    The two parts always add up: ``n_l0 + n_random == target_items``, with ``n_l0 =
    round(target_items * l0_fraction / (l0_fraction + random_fraction))``. (Fractions
    summing below 1 give the split, not a smaller sample: the reference package silently
    returned fewer items than asked.)

    :meth:`fit` draws the random part first (probability proportional to weight, seeded,
    optionally stratified), then lets the engine choose the L0 part around it and
    recalibrates every kept record together.

    Parameters
    ----------
    n_items : int
    l0_fraction, random_fraction : float, default 0.25 and 0.75
        Shares of the L0 and random parts, each in [0, 1], summing to at most 1.
    target_items : int, optional
        Records to keep; default ``round(0.2 * n_items)``.
    temperature : float, default 0.25
    seed : int, default 0
        Seeds the random part, the engine and tie-breaks.

    Attributes (after :meth:`fit`)
    ------------------------------
    result_ : CalibrationResult
    weights_ : numpy.ndarray, shape (n_items,)
    indices_ : numpy.ndarray, ascending
    types_ : numpy.ndarray of str, ``"l0"`` or ``"random"`` per entry of ``indices_``

    Example
    -------
    >>> import numpy as np
    >>> hybrid = HybridGate(n_items=100, l0_fraction=0.25, random_fraction=0.75, target_items=20)
    >>> hybrid.n_l0, hybrid.n_random
    (5, 15)
    >>> _, idx, types = hybrid.select(np.arange(100))
    >>> len(idx), int((types == "random").sum())
    (20, 15)
    """

    def __init__(
        self,
        n_items: int,
        l0_fraction: float = 0.25,
        random_fraction: float = 0.75,
        target_items: int | None = None,
        temperature: float = 0.25,
        *,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.n_items = positive_int("n_items", n_items)
        self.l0_fraction, self.random_fraction = _fractions(l0_fraction, random_fraction)
        if target_items is None:
            target_items = round(0.2 * n_items)
        self.target_items = _count("target_items", target_items, n_items)
        self.seed = _seed(seed)
        share = self.l0_fraction / (self.l0_fraction + self.random_fraction)
        self.n_l0 = round(self.target_items * share)
        self.n_random = self.target_items - self.n_l0
        self.l0_gate = SampleGate(n_items, self.n_l0, temperature, seed=seed)
        self.result_: CalibrationResult | None = None
        self.weights_: np.ndarray | None = None
        self.indices_: np.ndarray | None = None
        self.types_: np.ndarray | None = None

    def get_penalty(self) -> torch.Tensor:
        """Expected number of open L0 gates."""
        return self.l0_gate.get_penalty()

    def fit(
        self,
        matrix: Any,
        targets: Any = None,
        *,
        weights: Any = None,
        strata: Any = None,
        **options: Any,
    ) -> HybridGate:
        """Draw the random part, let the engine choose the L0 part, recalibrate both.

        The random part is :func:`pps_sample` (``strata`` optional). Its records start the
        engine at their design weight ``W_h / k_h`` (their Horvitz-Thompson weight) and are
        held in the sample (``calibrate(always_keep=...)``); the engine picks ``n_l0`` more
        from the rest and refits all ``target_items`` weights. With ``n_l0 == 0`` only the
        refit runs (:func:`l0calib.refit`). ``options`` go to the engine.

        Returns
        -------
        self
        """
        if self.target_items == 0:
            raise ParameterError("target_items is 0: there is nothing to fit")
        em = as_estimate_matrix(matrix, targets)
        n = em.n_records
        if n != self.n_items:
            raise ParameterError(
                f"the matrix has {n:,} records, the gate was made for {self.n_items:,}"
            )
        w0 = em.weights if weights is None else np.asarray(weights, dtype=np.float64)
        if w0.shape != (n,):
            raise ParameterError(f"weights must have shape ({n},), got {w0.shape}")
        seed = options.setdefault("seed", self.seed)
        rand_idx, design = pps_sample(w0, self.n_random, seed=seed, strata=strata)
        start = w0.copy()
        k = self.target_items
        # The engine anchors kept records at w * n / K: choose w so the random ones sit at
        # their design weight.
        start[rand_idx] = design * k / n
        if self.n_l0 == 0:
            anchor = np.zeros(n)
            anchor[rand_idx] = design
            # Only the refit runs: pass on the engine options that concern it.
            same = (
                "holdout",
                "normalize_groups",
                "loss",
                "scale_floor",
                "tol",
                "max_error",
                "bounds",
            )
            kw = {k: options[k] for k in same if k in options}
            if options.get("refit_l2") is not None:
                kw["lambda_l2"] = options["refit_l2"]
            if "refit_max_iter" in options:
                kw["max_iter"] = options["refit_max_iter"]
            res = refit(em, rand_idx, weights=anchor, keep_all=True, **kw)
        else:
            options.setdefault("temperature", self.l0_gate.gates.temperature)
            res = calibrate(em, weights=start, target_records=k, always_keep=rand_idx, **options)
        self.l0_gate._store(res)
        self.result_, self.weights_ = res, res.weights
        self.indices_ = np.flatnonzero(res.kept)
        is_random = np.zeros(n, dtype=bool)
        is_random[rand_idx] = True
        self.types_ = np.where(is_random[self.indices_], "random", "l0")
        return self

    def select(self, data: Any, random_seed: int | None = None) -> tuple[Any, Any, np.ndarray]:
        """The selected rows, their indices (ascending) and each one's type.

        After :meth:`fit`: the fitted selection. Before: a seeded equal-probability draw of
        ``n_random`` records, then the ``n_l0`` records with the highest L0 keep-probability
        among the rest (ties broken by a seeded key).

        Parameters
        ----------
        data : tensor, array or DataFrame with ``n_items`` rows
        random_seed : int, optional
            Seed of the untrained random draw (default: the gate's seed). The fitted
            selection is fixed by :meth:`fit`, so it cannot be given after it.

        Returns
        -------
        selected, indices, types
            ``types[j]`` is ``"l0"`` or ``"random"`` for ``indices[j]``.
        """
        _check_len(data, self.n_items, "items")
        if self.indices_ is not None:
            if random_seed is not None:
                raise ParameterError(
                    "the selection was fixed by fit(); pass seed= to the constructor or fit()"
                )
            idx, types = self.indices_, self.types_
        else:
            seed = self.seed if random_seed is None else _seed(random_seed)
            rand_idx, _ = pps_sample(np.ones(self.n_items), self.n_random, seed=seed)
            scores = self.l0_gate.keep_probability().copy()
            scores[rand_idx] = -np.inf
            l0_idx = _top(scores, self.n_l0, seed)
            idx = np.sort(np.concatenate([rand_idx, l0_idx]))
            is_random = np.zeros(self.n_items, dtype=bool)
            is_random[rand_idx] = True
            types = np.where(is_random[idx], "random", "l0")
        return _take(data, idx, 0), _like(data, idx), types


class FeatureGate(L0Gate):
    """Choose at most ``max_features`` features by training an L0-gated linear model.

    :meth:`fit` trains ``y ~ (z * B) x + b`` on standardised features with one Hard Concrete
    gate per feature: the expected number of open gates is held on a schedule from
    ``n_features`` down to ``max_features`` (the calibration engine's controller), the
    ``max_features`` gates most likely open are kept, and an unpenalised model is refitted
    on them (least squares, or multinomial logistic regression with a tiny ridge).

    Parameters
    ----------
    n_features : int
    max_features : int
        ``1 <= max_features <= n_features``.
    temperature : float, default 2/3
        The paper's value. (The reference package used 0.1; on our support-recovery
        benchmark 2/3 recovered as many or more true features, docs/benchmarks.md.)
    seed : int, default 0

    Attributes (after :meth:`fit`)
    ------------------------------
    coef_ : numpy.ndarray, shape (n_features,) or (n_classes, n_features)
        In the units of ``X``; 0 for features not selected.
    intercept_ : float or numpy.ndarray of shape (n_classes,)
    selected_ : numpy.ndarray, the selected feature indices, ascending
    classes_ : numpy.ndarray (classification only)
    history_ : pandas.DataFrame, per epoch: loss, expected_active
    """

    def __init__(
        self, n_features: int, max_features: int, temperature: float = 2 / 3, *, seed: int = 0
    ) -> None:
        n_features = positive_int("n_features", n_features)
        max_features = positive_int("max_features", max_features)
        if max_features > n_features:
            raise ParameterError(
                f"max_features ({max_features}) must be at most n_features ({n_features})"
            )
        super().__init__(n_features, temperature, _init_mean(max_features, n_features), seed=seed)
        self.n_features = n_features
        self.max_features = max_features
        self.selected_: np.ndarray | None = None
        self.coef_: np.ndarray | None = None
        self.intercept_: Any = None
        self.classes_: np.ndarray | None = None
        self.history_: pd.DataFrame | None = None
        self._task: str | None = None

    def fit(
        self,
        X: Any,
        y: Any,
        task: Literal["regression", "classification"] = "regression",
        *,
        epochs: int = 1000,
        lr: float = 0.05,
        lambda_l2: float = 1e-4,
    ) -> FeatureGate:
        """Learn the support of a sparse linear model with exactly ``max_features`` features.

        Parameters
        ----------
        X : array-like, shape (n_obs, n_features)
        y : array-like, shape (n_obs,)
            Real values (regression) or class labels (classification).
        task : {"regression", "classification"}
        epochs : int, default 1000
            Full-batch Adam steps.
        lr : float, default 0.05
        lambda_l2 : float, default 1e-4
            L2 on the coefficients during training (in expectation over the gates).

        Returns
        -------
        self
        """
        if task not in ("regression", "classification"):
            raise ParameterError(f"task must be 'regression' or 'classification', got {task!r}")
        x = _matrix(X, self.n_features)
        yv = np.asarray(y)
        if yv.shape != (x.shape[0],):
            raise ParameterError(f"y must have shape ({x.shape[0]},), got {yv.shape}")
        positive_int("epochs", epochs)
        mean, std = x.mean(axis=0), x.std(axis=0)
        std = np.where(std > 0, std, 1.0)
        xs = torch.as_tensor((x - mean) / std, dtype=torch.float64)
        if task == "regression":
            yf = yv.astype(np.float64)
            if not np.isfinite(yf).all():
                raise ParameterError("y has non-finite values")
            y_mean, y_std = float(yf.mean()), float(yf.std()) or 1.0
            target = torch.as_tensor((yf - y_mean) / y_std, dtype=torch.float64)
            n_out = 1
        else:
            classes, codes = np.unique(yv, return_inverse=True)
            if classes.size < 2:
                raise ParameterError("classification needs at least two classes in y")
            target = torch.as_tensor(codes, dtype=torch.long)
            n_out = classes.size
        selected = self._train(xs, target, task, n_out, epochs, lr, lambda_l2)
        self._refit(xs, target, task, n_out, selected, mean, std)
        if task == "regression":
            self.coef_ = self.coef_ * y_std  # type: ignore[operator]
            self.intercept_ = y_mean + self.intercept_ * y_std
        else:
            self.classes_ = classes
        self.selected_, self._task = selected, task
        return self

    def _train(
        self,
        xs: torch.Tensor,
        target: torch.Tensor,
        task: str,
        n_out: int,
        epochs: int,
        lr: float,
        lambda_l2: float,
    ) -> np.ndarray:
        p = self.n_features
        gates = self.gates
        gates.train()
        gates.log_alpha.data = gates.log_alpha.data.double()
        coef = torch.zeros(p, n_out, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(n_out, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([coef, bias, gates.log_alpha], lr=lr)
        ramp = max(1, int(0.6 * epochs))
        history = []
        for epoch in range(1, epochs + 1):
            opt.zero_grad(set_to_none=True)
            z = gates.rsample().double()
            out = xs @ (coef * z[:, None]) + bias
            if task == "regression":
                fit = torch.mean((out[:, 0] - target) ** 2)
            else:
                fit = nn.functional.cross_entropy(out, target)
            prob = gates.get_active_prob()
            loss = fit + lambda_l2 * (prob * (coef**2).sum(1)).sum()
            loss.backward()
            opt.step()
            goal = p - (p - self.max_features) * min(1.0, epoch / ramp)
            gates.shift_to_expected(goal)
            history.append((epoch, float(loss.detach()), goal))
        self.history_ = pd.DataFrame(history, columns=["epoch", "loss", "expected_active"])
        gates.eval()
        return _top(self.keep_probability(), self.max_features, self.seed)

    def _refit(
        self,
        xs: torch.Tensor,
        target: torch.Tensor,
        task: str,
        n_out: int,
        selected: np.ndarray,
        mean: np.ndarray,
        std: np.ndarray,
    ) -> None:
        xsel = xs[:, selected]
        coef = np.zeros((n_out, self.n_features))
        if task == "regression":
            design = torch.cat([xsel, torch.ones(xs.shape[0], 1, dtype=xs.dtype)], 1).numpy()
            sol, *_ = np.linalg.lstsq(design, target.numpy(), rcond=None)
            beta, b = sol[:-1][None, :], np.array([sol[-1]])
        else:
            w = torch.zeros(selected.size, n_out, dtype=torch.float64, requires_grad=True)
            b_t = torch.zeros(n_out, dtype=torch.float64, requires_grad=True)
            opt = torch.optim.LBFGS([w, b_t], max_iter=500, line_search_fn="strong_wolfe")

            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = nn.functional.cross_entropy(xsel @ w + b_t, target) + 1e-6 * (w**2).sum()
                loss.backward()
                return loss

            opt.step(closure)
            beta, b = w.detach().numpy().T, b_t.detach().numpy()
        # Back to the units of X: x_s = (x - mean) / std.
        coef[:, selected] = beta / std[selected]
        intercept = b - coef @ mean
        self.coef_ = coef[0] if task == "regression" else coef
        self.intercept_ = float(intercept[0]) if task == "regression" else intercept

    def predict(self, X: Any) -> np.ndarray:
        """Predictions of the refitted model: values (regression) or class labels."""
        if self.coef_ is None:
            raise ParameterError("call fit() first")
        x = _matrix(X, self.n_features)
        if self._task == "regression":
            return x @ self.coef_ + self.intercept_
        scores = x @ self.coef_.T + self.intercept_
        return self.classes_[np.argmax(scores, axis=1)]  # type: ignore[index]

    def _features(self) -> np.ndarray:
        return self.selected_ if self.selected_ is not None else self._select(self.max_features)

    def select_features(self, data: Any) -> tuple[Any, Any]:
        """The selected columns of ``data`` (tensor, array or DataFrame; same type back).

        After :meth:`fit`: the learned support. Before: the ``max_features`` features with
        the highest keep-probability, ties broken by the seeded key.

        Returns
        -------
        selected_data, feature_indices
        """
        _check_len(data, self.n_features, "features", axis=1)
        idx = self._features()
        return _take(data, idx, 1), _like(data, idx)

    def select_features_with_names(
        self, data: Any, feature_names: Sequence[str] | None = None
    ) -> tuple[Any, list[str]]:
        """Like :meth:`select_features`, returning the selected features' names.

        ``feature_names`` defaults to a DataFrame's column labels.
        """
        if feature_names is None:
            if not isinstance(data, pd.DataFrame):
                raise ParameterError("give feature_names, or pass a DataFrame")
            feature_names = [str(c) for c in data.columns]
        if len(feature_names) != self.n_features:
            raise ParameterError(
                f"feature_names has {len(feature_names)} names, expected {self.n_features}"
            )
        selected, idx = self.select_features(data)
        return selected, [feature_names[int(i)] for i in idx]

    @torch.no_grad()
    def get_feature_importance(self) -> torch.Tensor:
        """Keep-probability ``P(z != 0)`` per feature, shape (n_features,)."""
        return self.gates.get_active_prob()


def _matrix(X: Any, p: int) -> np.ndarray:
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    x = np.asarray(X, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != p:
        raise ParameterError(f"X must have shape (n_obs, {p}), got {x.shape}")
    if not np.isfinite(x).all():
        raise ParameterError("X has non-finite values")
    return x
