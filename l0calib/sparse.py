"""Sparse matrix-vector products for the estimate matrix, with a precomputed transpose.

The calibration engine computes ``A @ w`` (targets x records times records) forward and
``A.T @ g`` backward every step. Autograd through ``torch.sparse`` would rebuild index
structures each step; here both ``A`` and ``A.T`` are built once as CSR tensors and a small
autograd function uses one for each direction. Row-wise CSR products are deterministic.

int32 indices are used whenever the sizes allow (about twice as fast as int64 on CPU,
measured in ``docs/benchmarks.md``).
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch

__all__ = ["SparseOperator"]


def _csr_tensor(m: sp.csr_matrix, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    big = max(m.nnz, *m.shape) >= 2**31 - 1
    itype = np.int64 if big else np.int32
    with warnings.catch_warnings():
        # torch flags CSR support as beta on construction; the operations used here are stable.
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            torch.from_numpy(m.indptr.astype(itype)),
            torch.from_numpy(m.indices.astype(itype)),
            torch.from_numpy(m.data.astype(np.float64)).to(dtype),
            size=m.shape,
            device=device,
        )


class _MatVec(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, a: torch.Tensor, at: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.at = at
        return torch.mv(a, w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return torch.mv(ctx.at, grad.contiguous()), None, None


class SparseOperator:
    """``A`` and ``A.T`` as CSR tensors on one device, for differentiable ``A @ w``.

    Parameters
    ----------
    matrix : scipy.sparse matrix, shape (n_targets, n_records)
    dtype : torch.dtype
    device : torch.device or str
    """

    def __init__(self, matrix: sp.spmatrix, dtype: torch.dtype, device: torch.device | str) -> None:
        csr = sp.csr_matrix(matrix)
        self.shape = csr.shape
        self.device = torch.device(device)
        self.dtype = dtype
        self.a = _csr_tensor(csr, dtype, self.device)
        self.at = _csr_tensor(csr.T.tocsr(), dtype, self.device)

    def __matmul__(self, w: torch.Tensor) -> torch.Tensor:
        """``A @ w`` for ``w`` of shape (n_records,); differentiable in ``w``."""
        return _MatVec.apply(w, self.a, self.at)
