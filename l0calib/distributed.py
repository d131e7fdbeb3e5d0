"""The calibration engine on several processes with ``torch.distributed``.

Records are split across ranks in contiguous blocks (columns of the targets x records
matrix). Each rank holds only its block, its weights, gates and optimizer state. Per step a
rank computes its partial estimates ``A_r w_r`` (one value per target) and a single
``all_reduce`` sums them; the loss is then known on every rank, and each rank
back-propagates into its own records. Everything else the engine does is reduced the same
way: the expected number of survivors and the logit shift that holds it on schedule
(Newton on the shift, two scalars per iteration), the penalties of the reported loss, the
exact global top-K (a bisection over all-reduced counts on the scores' float64 bit
patterns, ties going to the lower global record index), the holdout report.

The refit is a small convex problem over the kept records only: every rank receives the
kept records' columns (K columns of the matrix, plus a reserve of the next-best records for
swaps) and solves the same L-BFGS-B problem, so every rank holds the same answer and keeps
its own records' weights. That is K sparse columns per rank, not the microdata.

Gate noise is keyed by (seed, draw, global record index), so a sharded run draws exactly
the noise a single process would: with the same inputs and seed, the weights agree to
float64 rounding (reductions add in a different order) and the kept set is the same.

Use it from a ``torchrun`` script (see ``docs/scaling.md``)::

    import torch.distributed as dist
    from l0calib.distributed import calibrate_shard, shard_bounds

    dist.init_process_group("gloo")
    start, stop = shard_bounds(n_records, dist.get_rank(), dist.get_world_size())
    result = calibrate_shard(A[:, start:stop], t, weights=w0[start:stop], offset=start,
                             n_total=n_records, target_records=20_000)
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.distributed as dist

from l0calib._checks import nonneg_int, positive_int, ratio_bounds
from l0calib.calibrate import (
    HISTORY_COLUMNS,
    MAX_ERROR,
    CalibrationResult,
    Progress,
    _check_options,
    _CsvLog,
    _default_refit_l2,
    _Fit,
    _history_frame,
    _Loop,
    _Problem,
    _problem,
    _ratio_summary,
    _refit_subset,
    _resolve_device,
    _resolve_dtype,
    _result,
    _selection_mode,
    _train,
)
from l0calib.coverage import COVERAGE_RECORDS, Coverage, coverage_needs
from l0calib.diagnostics import WeightDiagnostics
from l0calib.exceptions import DataError, ParameterError, listed
from l0calib.targets import EstimateMatrix
from l0calib.threads import available_cores, choose_threads, limit_threads

__all__ = ["calibrate_shard", "load_shard", "shard_bounds"]

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def shard_bounds(n_records: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous block of ``n_records`` records.

    Blocks differ in size by at most one record; the first ``n_records % world_size``
    ranks get the larger ones.

    Example
    -------
    >>> [shard_bounds(10, r, 3) for r in range(3)]
    [(0, 4), (4, 7), (7, 10)]
    """
    positive_int("world_size", world_size)
    if not 0 <= rank < world_size:
        raise ParameterError(f"rank must be in [0, {world_size}), got {rank}")
    base, extra = divmod(n_records, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def load_shard(
    microdata: str | os.PathLike[str],
    targets: Any,
    persons: str | os.PathLike[str] | None = None,
    *,
    rank: int,
    world_size: int,
    id_column: str = "household_id",
    weight_column: str = "household_weight",
    person_household_column: str = "person_household_id",
) -> tuple[pd.DataFrame, pd.DataFrame | None, EstimateMatrix, int, int]:
    """Read this rank's share of the microdata and build its block of the estimate matrix.

    Only rows ``shard_bounds(n, rank, world_size)`` of the households file are read (the
    overlapping row groups of a Parquet file), and only the persons of those households.
    A target no record of this block contributes to is allowed here:
    :func:`calibrate_shard` checks support over every block.

    Returns
    -------
    households, persons, matrix, offset, n_total
    """
    from l0calib.io import count_rows, read_table
    from l0calib.targets import build_estimate_matrix

    n_total = count_rows(microdata)
    start, stop = shard_bounds(n_total, rank, world_size)
    households = read_table(microdata, rows=(start, stop))
    person_frame = None
    if persons is not None:
        ids = households[id_column].to_numpy() if id_column in households else []
        person_frame = read_table(persons, where=(person_household_column, ids))
    em = build_estimate_matrix(
        households, targets, person_frame, id_column=id_column, weight_column=weight_column,
        person_household_column=person_household_column, allow_zero_support=True,
        table_names={"households": str(microdata), "persons": str(persons)},
    )  # fmt: skip
    return households, person_frame, em, start, n_total


class _Comm:
    """All-reduce and all-gather over a process group (the default one if None)."""

    def __init__(self, group: Any = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ParameterError(
                "calibrate_shard needs an initialised torch.distributed process group "
                "(dist.init_process_group, e.g. under torchrun)"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    def reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        x = t.detach().clone()
        dist.all_reduce(x, op=_OPS[op], group=self.group)
        return x

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out


def _top_k(scores: np.ndarray, k: int, offset: int, comm: _Comm) -> np.ndarray:
    """Mask of this shard's records among the global top ``k`` scores (scores in [0, 1]).

    Ties at the threshold go to the lowest global record index, as a stable sort of all
    the scores would. Only counts cross the network.
    """
    bits = np.asarray(scores, dtype=np.float64).view(np.int64)  # monotone for x >= 0

    def count(threshold: int) -> int:
        return int(comm.reduce(torch.tensor(int((bits >= threshold).sum())), "sum"))

    lo, hi = 0, int(np.float64(1.0).view(np.int64)) + 1  # count(lo) >= k > count(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(mid) >= k:
            lo = mid
        else:
            hi = mid
    above = bits > lo
    n_above = int(comm.reduce(torch.tensor(int(above.sum())), "sum"))
    ties = np.flatnonzero(bits == lo)
    tie_counts = comm.gather(int(ties.size))
    before = sum(tie_counts[: comm.rank])
    take = max(0, min(ties.size, k - n_above - before))
    mask = above.copy()
    mask[ties[:take]] = True
    return mask


def _stack_kept(
    comm: _Comm, pb: _Problem, mask: np.ndarray, offset: int, scores: np.ndarray,
    base: np.ndarray,
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Every rank's ``mask`` columns, in global record order (identical on every rank)."""
    idx = np.flatnonzero(mask)
    part = (pb.em.matrix[:, idx].tocsc(), idx + offset, pb.w0[idx], scores[idx], base[idx])
    parts = comm.gather(part)
    matrix = sp.hstack([p[0] for p in parts], format="csr")
    return matrix, *(np.concatenate([p[i] for p in parts]) for i in range(1, 5))


def _save(path: Path, fit: _Fit, loop: _Loop, fingerprint: dict[str, str] | None = None) -> None:
    state = {
        "fingerprint": dict(fingerprint or {}),
        "u": fit.u.detach().cpu(),
        "gates": None if fit.gates is None else {
            k: v.detach().cpu() for k, v in fit.gates.state_dict().items()
        },
        "optimizer": fit.opt.state_dict(),
        "loop": {k: getattr(loop, k) for k in
                 ("epoch", "survivors", "shift", "best", "since_best", "start", "done")},
        "history": torch.tensor(
            [[math.nan if v is None else float(v) for v in row] for row in loop.history],
            dtype=torch.float64,
        ).reshape(-1, len(HISTORY_COLUMNS)),
    }  # fmt: skip
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load(path: Path, fit: _Fit, fingerprint: dict[str, str] | None = None) -> _Loop:
    try:
        state = torch.load(path, weights_only=True, map_location=fit.device)
        if not isinstance(state, dict) or "loop" not in state:
            raise ValueError("not an l0calib checkpoint")
    except Exception as exc:  # truncated or foreign file: name it, no traceback
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"{path}: cannot resume from this checkpoint (truncated or not an l0calib "
            f"checkpoint: {reason}); remove it or start without --resume"
        ) from None
    _check_fingerprint(path, state.get("fingerprint") or {}, fingerprint or {})
    with torch.no_grad():
        fit.u.copy_(state["u"])
    if fit.gates is not None:
        fit.gates.load_state_dict(state["gates"])
    fit.opt.load_state_dict(state["optimizer"])
    loop = _Loop(**state["loop"])
    for row in state["history"].tolist():
        goal = None if math.isnan(row[6]) else row[6]
        loop.history.append((int(row[0]), *row[1:6], goal, *row[7:]))
    return loop


def _check_fingerprint(path: Path, then: dict[str, str], now: dict[str, str]) -> None:
    """Refuse to resume a checkpoint written for other inputs or options, naming them."""
    differ = [k for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]
    if not differ:
        return
    shown = [
        f"{k} (checkpoint: {then.get(k, 'not recorded')}, now: {now.get(k, 'not given')})"
        if not k.startswith("file ") else f"{k} (its contents changed)"
        for k in differ
    ]  # fmt: skip
    raise DataError(
        f"{path}: the checkpoint was written for other inputs or options: {'; '.join(shown)}; "
        "resume with the same ones, or start without --resume"
    )


def calibrate_shard(
    matrix: Any,
    targets: Any = None,
    *,
    offset: int,
    n_total: int,
    weights: Any = None,
    target_records: int | None = None,
    lambda_l0: float | None = None,
    lambda_l2: float | None = None,
    epochs: int = 600,
    lr: float = 0.05,
    loss: Literal["relative", "squared"] = "relative",
    normalize_groups: bool = True,
    holdout: Any = None,
    tol: float | None = None,
    temperature: float = 0.25,
    init_keep: float = 0.99,
    scale_floor: float = 1.0,
    refit: bool = True,
    refit_l2: float | None = None,
    refit_max_iter: int = 2000,
    patience: int = 100,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    callback: Callable[[Progress], bool | None] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    log_every: int = 10,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    fingerprint: dict[str, str] | None = None,
    threads: int | None = None,
    group: Any = None,
    bounds: tuple[float, float] | None = None,
    max_error: float | None = MAX_ERROR,
    coverage: int = COVERAGE_RECORDS,
) -> CalibrationResult:
    """:func:`l0calib.calibrate` on this rank's block of records, under a process group.

    Every rank calls it with its own contiguous block; options must be the same on every
    rank. Options are those of :func:`l0calib.calibrate` (``refit_anchor`` is "initial",
    ``always_keep`` is not offered; the coverage guarantee holds as in a single process,
    but no :class:`~l0calib.CoverageWarning` is given before training; no exchange rounds
    (:mod:`l0calib.exchange`) follow the refit, so a sharded run equals a single process
    with ``exchange_rounds=0``), plus:

    Parameters
    ----------
    matrix : EstimateMatrix, scipy sparse matrix or array, shape (n_targets, n_block)
        This rank's columns of the estimate matrix (every target, this block's records).
    offset : int
        Global index of this block's first record.
    n_total : int
        Records over all ranks.
    checkpoint_dir : path, optional
        Every ``checkpoint_every`` epochs each rank writes ``rank<r>.pt`` there (parameters,
        optimizer, gate-noise counter, schedule and early-stopping state, history) with
        ``torch.save``; ``resume=True`` loads it (``torch.load(weights_only=True)``) and
        continues: the result equals an uninterrupted run's.
    fingerprint : dict of str -> str, optional
        What the run depends on (input file hashes, options), saved in every checkpoint;
        resuming with a different one is a :class:`DataError` naming the differing keys.
        A truncated or foreign checkpoint is a :class:`DataError` naming the file.
    threads : int, optional
        Threads for this rank (as for :func:`l0calib.calibrate`), at most the available
        cores divided by the number of ranks on this machine (``LOCAL_WORLD_SIZE`` under
        torchrun, else every rank).
    group : process group, optional
        Default: the default group.

    Returns
    -------
    CalibrationResult
        ``weights``, ``kept`` and ``keep_probability`` for this block's records;
        ``report``, ``history`` and ``info`` for the whole problem (the same on every rank);
        ``diagnostics`` reduced over every rank (its ``ratio_quartiles`` are NaN: quartiles
        are not computed across shards).
    """
    start_time = time.perf_counter()
    comm = _Comm(group)
    pb = _problem(matrix, targets, weights, holdout, normalize_groups=normalize_groups,
                  loss=loss, scale_floor=scale_floor, allow_empty=True)  # fmt: skip
    em, n = pb.em, pb.em.n_records
    sizes = comm.gather((n, int(offset)))
    if sum(s[0] for s in sizes) != n_total:
        raise ParameterError(
            f"the blocks hold {sum(s[0] for s in sizes):,} records, n_total is {n_total:,}"
        )
    expect = np.cumsum([0] + [s[0] for s in sizes])[:-1].tolist()
    if [s[1] for s in sizes] != expect:
        raise ParameterError(
            f"block offsets must be contiguous in rank order: got {[s[1] for s in sizes]}"
        )
    _check_options(n_total, target_records, lambda_l0, lambda_l2, epochs, lr, temperature,
                   init_keep, patience, log_every, tol, refit_max_iter)  # fmt: skip
    # Zero support is judged over every block, not this one.
    support = comm.reduce(torch.tensor(em.support(), dtype=torch.float64), "sum").numpy()
    empty = [em.names[k] for k in np.flatnonzero((support == 0) & pb.fitted)]
    if empty:
        raise ParameterError(f"{len(empty)} fitted target(s) have no record contributing: "
                             f"{listed(empty)}")  # fmt: skip
    bounds = ratio_bounds(bounds)
    coverage = nonneg_int("coverage", coverage)
    if max_error is not None and not (isinstance(max_error, (int, float)) and max_error >= 0):
        raise ParameterError(f"max_error must be a number >= 0, got {max_error!r}")
    need = coverage_needs(support, pb.fitted, coverage)
    dev, tdtype = _resolve_device(device), _resolve_dtype(dtype)
    selection, lambda_l2, refit_l2 = _selection_mode(
        target_records, n_total, int(pb.fitted.sum()), lambda_l2, refit_l2
    )
    k_goal = target_records
    gated = (k_goal is not None and k_goal < n_total) or bool(lambda_l0)
    n_threads = choose_threads(n, em.matrix.nnz, threads)
    # The ranks on this machine share its cores: no more busy threads than cores in all
    # (torchrun says how many ranks run here; local workers are all here).
    local = int(os.environ.get("LOCAL_WORLD_SIZE", comm.world))
    n_threads = min(n_threads, max(1, available_cores() // max(local, 1)))
    with limit_threads(n_threads):
        fit = _Fit(
            pb, gated=gated, lambda_l0=float(lambda_l0 or 0.0), lambda_l2=lambda_l2, lr=lr,
            temperature=temperature, init_keep=init_keep, seed=seed, device=dev, dtype=tdtype,
            reduce=comm.reduce, n_total=n_total, index_offset=int(offset), bounds=bounds,
        )  # fmt: skip
        ckpt = None
        if checkpoint_dir is not None:
            ckpt = Path(checkpoint_dir) / f"rank{comm.rank}.pt"
            ckpt.parent.mkdir(parents=True, exist_ok=True)
        state = None
        if resume:
            if ckpt is None or not ckpt.exists():
                raise ParameterError(f"resume=True but there is no checkpoint {ckpt}")
            state = _load(ckpt, fit, fingerprint)
        with _CsvLog(log_path if comm.rank == 0 else None) as log:
            if not gated and refit:
                # As in calibrate(): without gates the refit (anchored on the initial weights)
                # solves the whole problem and training cannot change it.
                loop = _Loop(epoch=0, survivors=float(n_total), start=float(n_total))
            else:
                loop = _train(
                    fit, pb, epochs=epochs, k_goal=k_goal if gated else None, patience=patience,
                    callback=callback, log=log, log_every=log_every, resume=state,
                    checkpoint=(lambda st: _save(ckpt, fit, st, fingerprint))
                    if ckpt is not None else None,
                    checkpoint_every=checkpoint_every,
                )  # fmt: skip
            weights_out, info = _select_and_refit_shard(
                comm, fit, pb, k_goal, loop.survivors, offset=int(offset), refit=refit,
                refit_l2=refit_l2, refit_max_iter=refit_max_iter, need=need, bounds=bounds,
            )  # fmt: skip
            estimates = _global_estimates(comm, em, weights_out)
            if log.path is not None:
                log.write(loop.epoch + 1, float("nan"), em.names, em.values, estimates)
        info.update({
            "target_records": target_records, "gate_shift_final": loop.shift,
            "selection": selection, "lambda_l2": lambda_l2,
            "rank": comm.rank, "world_size": comm.world, "offset": int(offset),
            "threads": n_threads, "device": str(dev), "dtype": str(tdtype).removeprefix("torch."),
            "bounds": list(bounds) if bounds is not None else None,
        })  # fmt: skip
        return _result(
            pb,
            weights_out,
            tol=tol,
            converged=bool(info["refit_converged"]),
            not_converged_reason=f"the refit did not converge: {info.get('refit_message', '')}",
            history=_history_frame(loop.history),
            n_iter=loop.epoch,
            start=start_time,
            seed=seed,
            method="l0-sharded",
            info=info,
            keep_probability=fit.keep_scores(),
            estimates=estimates,
            diagnostics=_reduced_diagnostics(comm, weights_out, pb.w0),
            max_error=max_error,
        )


def _global_estimates(comm: _Comm, em: EstimateMatrix, w: np.ndarray) -> np.ndarray:
    local = torch.tensor(em.matrix @ w, dtype=torch.float64)
    return comm.reduce(local, "sum").numpy()


def _select_and_refit_shard(
    comm: _Comm, fit: _Fit, pb: _Problem, k_goal: int | None, survivors: float, *,
    offset: int, refit: bool, refit_l2: float | None, refit_max_iter: int,
    need: np.ndarray, bounds: tuple[float, float] | None,
) -> tuple[np.ndarray, dict[str, Any]]:  # fmt: skip
    n_total = fit.n_total
    gated_w, _ = fit.trained_weights(n_total / max(survivors, 1.0))
    scores = fit.keep_scores()
    kept = gated_w > 0 if k_goal is None else _top_k(scores, k_goal, offset, comm)
    n_kept = int(comm.reduce(torch.tensor(int(kept.sum())), "sum"))
    before = np.where(kept, gated_w, 0.0)
    est = _global_estimates(comm, pb.em, before)
    rel = np.abs(est - pb.em.values) / np.maximum(np.abs(pb.em.values), pb.scale_floor)
    prior = {"mean_abs_rel_error_before_refit": float(rel[pb.fitted].mean()),
             "max_abs_rel_error_before_refit": float(rel[pb.fitted].max())}  # fmt: skip
    if not (refit and n_kept):
        return before, {"refit_converged": True, **prior}
    if refit_l2 is None:
        refit_l2 = _default_refit_l2(n_kept, n_total)
    # The kept records plus a reserve of the next best, for the refit's swaps. Every rank
    # solves the same problem; if the swaps use up the reserve, a larger one is gathered,
    # so the outcome is the one a single process (with every record at hand) reaches.
    reserve = 0 if k_goal is None else min(n_total - k_goal, max(100, k_goal // 20))
    base = pb.w0 * (n_total / n_kept)
    # Coverage (l0calib.coverage): the targets the global top-K leaves short of supporters
    # bring each rank's best missing supporters of theirs into the pool, so every rank can
    # make the single-process exchange on the pooled columns.
    covering = k_goal is not None and k_goal < n_total and bool(need.any())
    extra = np.zeros(fit.n, dtype=bool)
    if covering:
        local = Coverage(pb.em.matrix, need)
        counts = comm.reduce(torch.tensor(local.counts(kept), dtype=torch.int64), "sum").numpy()
        for k in np.flatnonzero(counts < local.need):
            sup = local._records_of(int(k))
            cand = sup[~kept[sup]]
            cand = cand[np.lexsort((cand, -scores[cand]))][: int(local.need[k] - counts[k])]
            extra[cand] = True
    while True:
        pool = kept if reserve == 0 else _top_k(scores, k_goal + reserve, offset, comm)  # type: ignore[operator]
        m, gidx, w0, sc, b = _stack_kept(comm, pb, pool | extra, offset, scores, base)
        sub_em = EstimateMatrix(
            matrix=m, names=pb.em.names, values=pb.em.values, groups=pb.em.groups,
            importance=pb.em.importance, tolerance=pb.em.tolerance, weights=w0,
        )  # fmt: skip
        sub = _Problem(em=sub_em, w0=w0, holdout=pb.holdout, coef=pb.coef, scale=pb.scale,
                       tol=pb.tol, scale_floor=pb.scale_floor)  # fmt: skip
        order = np.lexsort((gidx, -sc))  # best first, ties to the lower global index
        sub_kept = np.zeros(gidx.size, dtype=bool)
        sub_kept[order[:n_kept]] = True
        cover, exchanged = None, 0
        if covering:
            cover = Coverage(m, need)
            sub_kept, exchanged = cover.cover(sub_kept, order)
        rb = None if bounds is None else (np.full(gidx.size, bounds[0]),
                                          np.full(gidx.size, bounds[1]))  # fmt: skip
        w_sub, info = _refit_subset(sub, sub_kept, b, refit_l2, refit_max_iter,
                                    exact=k_goal is not None, order=order, coverage=cover,
                                    ratio_bounds=rb)  # fmt: skip
        if reserve == 0 or info["refit_swaps"] < reserve or reserve >= n_total - k_goal:  # type: ignore[operator]
            break
        reserve = min(n_total - k_goal, 4 * reserve)  # type: ignore[operator]
    info.update(prior, refit_reserve=reserve,
                weight_ratio_inflated=_ratio_summary(w_sub, b))  # fmt: skip
    if cover is not None:
        info["coverage_exchanged"] = exchanged
        info["coverage_short"] = [pb.em.names[k] for k in cover.short(w_sub != 0)]
    mine = (gidx >= offset) & (gidx < offset + fit.n)
    out = np.zeros(fit.n)
    out[gidx[mine] - offset] = w_sub[mine]
    return out, info


def _reduced_diagnostics(comm: _Comm, w: np.ndarray, w0: np.ndarray) -> WeightDiagnostics:
    kept = w != 0
    usable = kept & (w0 > 0)
    ratio = w[usable] / w0[usable]
    sums = comm.reduce(torch.tensor([float(kept.sum()), w.sum(), (w**2).sum(), w0.sum(),
                                     float(w.size)], dtype=torch.float64), "sum")  # fmt: skip
    extremes = comm.reduce(torch.tensor([ratio.max() if ratio.size else -math.inf,
                                         -ratio.min() if ratio.size else -math.inf],
                                        dtype=torch.float64), "max")  # fmt: skip
    n_kept, total, sq, total0, n = sums.tolist()
    ess = total**2 / sq if sq > 0 else 0.0
    nan = float("nan")
    return WeightDiagnostics(
        n_records=int(n), n_kept=int(n_kept), effective_sample_size=ess,
        design_effect=n_kept * sq / total**2 if total > 0 else nan,
        ratio_min=-float(extremes[1]), ratio_max=float(extremes[0]),
        ratio_quartiles=(nan, nan, nan), total_weight=total, initial_total_weight=total0,
    )  # fmt: skip
