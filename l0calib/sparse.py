"""Sparse matrix-vector products for the estimate matrix, with a precomputed transpose.

The calibration engine computes ``A @ w`` (targets x records times records) forward and
``A.T @ g`` backward every step. Autograd through ``torch.sparse`` would rebuild index
structures each step; here the transpose ``A.T`` (one row per record) is built once as a
CSR tensor and a small autograd function computes both directions from it:

- backward, ``A.T @ g``: a CSR product reading the small targets-vector ``g`` (cache
  resident), streaming over the non-zeros;
- forward, ``A @ w``: on CPU with at least 250,000 records, the same CSR arrays read as
  ``(A.T).T`` by scipy, which adds each record's column into the targets vector in record
  order: a streaming pass instead of gathering ``w`` at random columns (1.3x faster on one
  thread at 500,000 records, 1.85x at 2.5 million, ``docs/benchmarks.md``). The records
  are cut into a fixed number of blocks (about a million non-zeros each) whose partial
  sums run on ``torch.get_num_threads()`` threads (scipy releases the GIL) and are added
  in block order, so the result does not depend on the number of threads. With fewer
  records ``w`` stays in cache and torch's CSR product of ``A`` (row-parallel) is faster
  (3.4x at 100,000 records); on a GPU it is used too. ``A`` is built on first use.

Both products are deterministic (fixed summation order). int32 indices are used whenever
the sizes allow (about twice as fast as int64 on CPU, measured in ``docs/benchmarks.md``).
"""

from __future__ import annotations

import itertools
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp
import torch

__all__ = ["SparseOperator"]

_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}
# Non-zeros per block of the CPU forward product, and the most blocks.
_BLOCK_NNZ = 2**20
_MAX_BLOCKS = 64
# From this many records the CPU forward streams over A.T instead of gathering w.
_SCATTER_MIN_RECORDS = 250_000


def _index_type(m: sp.csr_matrix) -> type:
    return np.int64 if max(m.nnz, *m.shape) >= 2**31 - 1 else np.int32


def _csr_arrays(m: sp.csr_matrix, dtype: torch.dtype) -> tuple[np.ndarray, ...]:
    itype = _index_type(m)
    # Straight to the working dtype, without copies of arrays already in it: a float64
    # intermediate would cost 8 bytes per non-zero at the peak.
    values = m.data.astype(_NUMPY.get(dtype, np.float64), copy=False)
    return m.indptr.astype(itype, copy=False), m.indices.astype(itype, copy=False), values


def _csr_tensor(
    arrays: tuple[np.ndarray, ...], shape: tuple[int, int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    indptr, indices, values = (torch.from_numpy(a) for a in arrays)
    with warnings.catch_warnings():
        # torch flags CSR support as beta on construction; the operations used here are stable.
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(indptr, indices, values.to(dtype), size=shape, device=device)


class _MatVec(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, op: SparseOperator) -> torch.Tensor:  # type: ignore[override]
        ctx.op = op
        return op.forward(w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return torch.mv(ctx.op.at, grad.contiguous()), None


class SparseOperator:
    """``A.T`` as a CSR tensor on one device, for differentiable ``A @ w``.

    Parameters
    ----------
    matrix : scipy.sparse matrix, shape (n_targets, n_records)
    dtype : torch.dtype
    device : torch.device or str
    """

    def __init__(self, matrix: sp.spmatrix, dtype: torch.dtype, device: torch.device | str) -> None:
        self._matrix = sp.csr_matrix(matrix)
        self.shape = self._matrix.shape
        self.device = torch.device(device)
        self.dtype = dtype
        at = self._matrix.T.tocsr()
        self.at = _csr_tensor(_csr_arrays(at, dtype), at.shape, dtype, self.device)
        self._a: torch.Tensor | None = None
        # On CPU, scipy views of blocks of records over the very same arrays (no copy of the
        # non-zeros) for the streaming forward.
        self._blocks: list[tuple[int, int, sp.csr_matrix]] = []
        self._pool: ThreadPoolExecutor | None = None
        self._pool_threads = 0
        if self.device.type == "cpu" and dtype in _NUMPY and at.shape[0] >= _SCATTER_MIN_RECORDS:
            # Views of the tensor's own buffers (torch may have copied the numpy arrays).
            indptr, indices, values = (
                t.numpy() for t in (self.at.crow_indices(), self.at.col_indices(), self.at.values())
            )
            n_blocks = int(min(_MAX_BLOCKS, max(1, at.nnz // _BLOCK_NNZ)))
            cuts = np.searchsorted(indptr, np.linspace(0, at.nnz, n_blocks + 1)[1:-1])
            bounds = [0, *sorted(set(int(c) for c in cuts) - {0, at.shape[0]}), at.shape[0]]
            for lo, hi in itertools.pairwise(bounds):
                s, e = int(indptr[lo]), int(indptr[hi])
                block = sp.csr_matrix(
                    (values[s:e], indices[s:e], indptr[lo : hi + 1] - indptr[lo]),
                    shape=(hi - lo, at.shape[1]), copy=False,
                )  # fmt: skip
                self._blocks.append((lo, hi, block))

    @property
    def a(self) -> torch.Tensor:
        """``A`` itself as a CSR tensor (built on first use)."""
        if self._a is None:
            self._a = _csr_tensor(
                _csr_arrays(self._matrix, self.dtype), self.shape, self.dtype, self.device
            )
        return self._a

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """``A @ w`` without autograd (see the module docstring for which kernel)."""
        if not self._blocks:
            return torch.mv(self.a, w)
        x = w.detach().numpy()

        def part(block: tuple[int, int, sp.csr_matrix]) -> np.ndarray:
            lo, hi, m = block
            return m.T @ x[lo:hi]

        threads = min(torch.get_num_threads(), len(self._blocks))
        if threads > 1:
            if self._pool is None or self._pool_threads != threads:
                if self._pool is not None:
                    self._pool.shutdown(wait=False)
                self._pool = ThreadPoolExecutor(threads, thread_name_prefix="l0calib-spmv")
                self._pool_threads = threads
            parts = list(self._pool.map(part, self._blocks))
        else:
            parts = [part(b) for b in self._blocks]
        out = np.array(parts[0], dtype=_NUMPY[self.dtype])
        for p in parts[1:]:
            out += p
        return torch.from_numpy(out)

    def __matmul__(self, w: torch.Tensor) -> torch.Tensor:
        """``A @ w`` for ``w`` of shape (n_records,); differentiable in ``w``."""
        return _MatVec.apply(w, self)
