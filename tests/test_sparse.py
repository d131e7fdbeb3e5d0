"""The engine's sparse products: A @ w forward (block-parallel on CPU), A.T @ g backward."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import l0calib.sparse as sparse
from l0calib.sparse import SparseOperator


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_products_match_scipy_and_do_not_depend_on_threads(monkeypatch, dtype) -> None:
    monkeypatch.setattr(sparse, "_BLOCK_NNZ", 97)  # many blocks on a small matrix
    monkeypatch.setattr(sparse, "_SCATTER_MIN_RECORDS", 0)
    m = sp.random(40, 700, density=0.05, format="csr", random_state=1)
    op = SparseOperator(m, dtype, "cpu")
    assert len(op._blocks) > 5
    assert sum(b[2].nnz for b in op._blocks) == m.nnz
    w = torch.rand(700, dtype=dtype, generator=torch.Generator().manual_seed(0))
    g = torch.rand(40, dtype=dtype, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    outs, grads = [], []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            x = w.clone().requires_grad_(True)
            y = op @ x
            y.backward(g)
            outs.append(y.detach())
            grads.append(x.grad)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0], grads[1])
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(outs[0].numpy(), m @ w.double().numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(grads[0].numpy(), m.T @ g.double().numpy(), rtol=tol, atol=tol)
    # The row-parallel torch product of A (used on GPUs) agrees.
    np.testing.assert_allclose(torch.mv(op.a, w).numpy(), outs[0].numpy(), rtol=tol, atol=tol)


def test_small_problems_use_the_row_product() -> None:
    m = sp.random(10, 50, density=0.2, format="csr", random_state=2)
    op = SparseOperator(m, torch.float32, "cpu")
    assert op._blocks == []
    w = torch.rand(50)
    np.testing.assert_allclose((op @ w).numpy(), m @ w.double().numpy(), rtol=1e-5)
