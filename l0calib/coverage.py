"""Target coverage: every fitted target keeps enough of the records that support it.

A target is *supported* by the records with a non-zero entry in its row of the estimate
matrix. When the engine keeps only ``K`` of ``n`` records, a target held by a handful of
records can lose all of them; no reweighting of the survivors can then bring it back (its
estimate is 0, -100 %). The engine therefore requires, for every fitted target ``k``::

    kept supporters of k  >=  need_k = min(support_k, m)

with ``m = COVERAGE_RECORDS`` (3) by default: about what a 20 % random draw keeps of a
13-record income band (2.6 on average), enough that the refit can meet such a target with
weights that move by a factor of two or so, and few enough that a well-supported target
never binds. Measured on ``synthetic_survey(5_000)`` (docs/benchmarks.md), the trained
selection already keeps a supporter of every target there, and ``m = 3`` exchanged 2-5 of
1,000 records (29 of 500) at no cost in fitted error; ``m = 5`` exchanged 32-37 (100-116 of
500) and cost effective sample size (673 against 693 at 1,000; 217 against 309 at 500).

:class:`Coverage` enforces the requirement in the top-K step (:meth:`Coverage.cover`: the
best-ranked missing supporters are added and the lowest-ranked kept records that no
target needs are dropped, so the count stays exactly ``K``) and in the refit's swap rounds
(:meth:`Coverage.removable`: a record a target needs is never swapped out).
:func:`coverage_risk` says, before training, which targets a given ``K`` cannot cover.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

__all__ = ["COVERAGE_RECORDS", "Coverage", "coverage_needs", "coverage_risk"]

COVERAGE_RECORDS = 3


def coverage_needs(support: np.ndarray, fitted: np.ndarray, m: int) -> np.ndarray:
    """``min(support, m)`` for fitted targets, 0 for holdout targets; shape (n_targets,)."""
    support = np.asarray(support, dtype=np.int64)
    return np.where(np.asarray(fitted, dtype=bool), np.minimum(support, int(m)), 0)


class Coverage:
    """The supporter pattern of the targets that need coverage, and the checks on it.

    Parameters
    ----------
    matrix : scipy sparse matrix, shape (n_targets, n_records)
        The estimate matrix (or the columns of some records of it).
    need : numpy.ndarray of int, shape (n_targets,)
        Supporters each target must keep (0: no requirement).
    """

    def __init__(self, matrix: sp.spmatrix, need: np.ndarray) -> None:
        need = np.asarray(need, dtype=np.int64)
        self.rows = np.flatnonzero(need > 0)
        self.need = need[self.rows]
        sub = sp.csr_matrix(matrix)
        if self.rows.size < need.size:
            sub = sub[self.rows]
        if not (sub.data != 0).all():
            sub = sub.copy()
            sub.eliminate_zeros()
        pattern = sp.csr_matrix(
            (np.ones(sub.nnz, dtype=np.int32), sub.indices, sub.indptr), shape=sub.shape
        )
        self.by_target = pattern  # CSR: row k -> its supporters
        self.by_record = pattern.tocsc()  # CSC: column i -> the targets record i supports
        self.support = np.diff(pattern.indptr)

    @property
    def active(self) -> bool:
        """Whether any target has a requirement."""
        return self.rows.size > 0

    def _targets_of(self, i: int) -> np.ndarray:
        p = self.by_record
        return p.indices[p.indptr[i] : p.indptr[i + 1]]

    def _records_of(self, k: int) -> np.ndarray:
        p = self.by_target
        return p.indices[p.indptr[k] : p.indptr[k + 1]]

    def counts(self, kept: np.ndarray) -> np.ndarray:
        """Kept supporters of each target with a requirement."""
        return self.by_target @ kept.astype(np.int32)

    def short(self, kept: np.ndarray) -> np.ndarray:
        """Row indices (into the full matrix) of targets with fewer kept supporters than
        they need."""
        return self.rows[self.counts(kept) < self.need]

    def cover(
        self, kept: np.ndarray, order: np.ndarray, fixed: np.ndarray | None = None
    ) -> tuple[np.ndarray, int]:
        """Make ``kept`` cover every target, keeping its count.

        ``order`` ranks the records, best first. Targets short of supporters are taken
        rarest first; each gets its best-ranked missing supporters. Then as many records
        leave, lowest-ranked first, among those no target needs (``fixed`` records never
        leave). Returns (new mask, records exchanged). If ``K`` is too small to cover
        everything, the added records that could not be paid for are dropped again, worst
        first, so the count is still exact (those targets stay short; the caller says so).
        """
        if not self.active:
            return kept, 0
        cnt = self.counts(kept)
        short = np.flatnonzero(cnt < self.need)
        if short.size == 0:
            return kept, 0
        kept = kept.copy()
        n = kept.size
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(order.size)
        added: list[int] = []
        for k in short[np.lexsort((short, self.support[short]))]:
            missing = int(self.need[k] - cnt[k])
            if missing <= 0:
                continue
            sup = self._records_of(int(k))
            cand = sup[~kept[sup]]
            cand = cand[np.argsort(rank[cand], kind="stable")][:missing]
            for j in cand.tolist():
                kept[j] = True
                cnt[self._targets_of(j)] += 1
                added.append(j)
        protected = np.zeros(n, dtype=bool)
        protected[added] = True
        if fixed is not None:
            protected |= fixed
        removed = 0
        leaving = np.flatnonzero(kept & ~protected)
        for j in leaving[np.argsort(-rank[leaving], kind="stable")].tolist():
            if removed == len(added):
                break
            ts = self._targets_of(j)
            if ts.size and (cnt[ts] <= self.need[ts]).any():
                continue
            kept[j] = False
            cnt[ts] -= 1
            removed += 1
        # Not enough records to pay for the additions: undo the worst-ranked ones.
        for j in sorted(added, key=lambda i: -rank[i])[: len(added) - removed]:
            kept[j] = False
            cnt[self._targets_of(j)] -= 1
        return kept, removed

    def removable(self, kept: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Which of ``candidates`` (kept records, in the order given) can leave one after
        another without any target falling below its need. Boolean, shape like
        ``candidates``."""
        out = np.zeros(candidates.size, dtype=bool)
        if not self.active:
            out[:] = True
            return out
        cnt = self.counts(kept)
        for pos, j in enumerate(candidates.tolist()):
            ts = self._targets_of(j)
            if ts.size and (cnt[ts] <= self.need[ts]).any():
                continue
            cnt[ts] -= 1
            out[pos] = True
        return out


def coverage_risk(
    coverage: Coverage, k_free: int, names: Sequence[str], fixed: np.ndarray | None = None
) -> list[str]:
    """Targets that ``k_free`` records (besides ``fixed`` ones) may be unable to cover.

    A greedy cover, rarest target first, each taking supporters that already help the
    most other short targets first: the targets still short when it runs out of records
    are returned (an empty list when the greedy cover fits). The greedy may use more
    records than the smallest cover, so a named target is at risk, not certainly lost.
    """
    if not coverage.active:
        return []
    n = coverage.by_record.shape[1]
    kept = np.zeros(n, dtype=bool) if fixed is None else fixed.copy()
    cnt = coverage.counts(kept)
    # A record's usefulness: how many targets of small support it serves.
    rare = (coverage.support <= 4 * coverage.need).astype(np.int32)
    useful = coverage.by_record.T @ rare
    left = int(k_free)
    at_risk: list[int] = []
    short = np.flatnonzero(cnt < coverage.need)
    for k in short[np.lexsort((short, coverage.support[short]))]:
        missing = int(coverage.need[k] - cnt[k])
        if missing <= 0:
            continue
        sup = coverage._records_of(int(k))
        cand = sup[~kept[sup]]
        if cand.size > 4 * missing:  # a large target: only its best few matter
            cand = cand[np.argpartition(-useful[cand], missing)[:missing]]
        cand = cand[np.argsort(-useful[cand], kind="stable")][:missing]
        if cand.size > left:
            at_risk.append(int(k))
            continue
        left -= cand.size
        for j in cand.tolist():
            kept[j] = True
            cnt[coverage._targets_of(j)] += 1
    return [names[int(coverage.rows[k])] for k in at_risk]
