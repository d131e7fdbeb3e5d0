"""How many threads a fit uses, chosen by problem size.

Every parallel part of a fit synchronises at the end of each operation (torch's intra-op
threads, the BLAS behind numpy and scipy, the sparse product's thread pool). When another
busy process shares the cores, a thread that loses its core holds the whole operation up
until the scheduler returns to it, a few milliseconds later; an epoch of a 100,000-record
fit is hundreds of operations of tens of microseconds each, so on 2 cores with one other
CPU-bound process it ran several times slower on 2 threads than on 1 (see
``docs/benchmarks.md``). Operations long against a time slice (millions of records) lose
little that way and gain from every core. So a fit uses, unless told otherwise::

    1 thread                   below LARGE_RECORDS records and LARGE_NONZEROS non-zeros
    every available core       above

The count depends only on the problem and the cores this process may use, never on the
momentary load, so the same inputs and seed give the same weights on a machine whether it
is busy or not (reductions may be ordered differently on another thread count). The same
count is given to torch and, through ``threadpoolctl``, to the BLAS libraries, and the
previous settings are restored afterwards; one of them is busy at a time (training runs on
torch, the refit's factorisations on BLAS), so busy threads never outnumber the count.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from l0calib._checks import positive_int

__all__ = ["available_cores", "choose_threads", "limit_threads"]

# From this many records (or non-zeros) per process, a fit's operations are long enough
# against a scheduler time slice for extra threads to pay even on a busy machine.
LARGE_RECORDS = 2_000_000
LARGE_NONZEROS = 20_000_000


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity; ``os.cpu_count()`` elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def choose_threads(n_records: int, nonzeros: int, requested: int | None = None) -> int:
    """The thread count for a fit of ``n_records`` records with ``nonzeros`` non-zeros.

    ``requested`` (``threads=``, ``--threads``) is used as given, capped at the available
    cores. Otherwise 1 for problems below :data:`LARGE_RECORDS` records and
    :data:`LARGE_NONZEROS` non-zeros, else every available core.
    """
    cores = available_cores()
    if requested is not None:
        return min(positive_int("threads", requested), cores)
    if n_records < LARGE_RECORDS and nonzeros < LARGE_NONZEROS:
        return 1
    return cores


@contextmanager
def limit_threads(threads: int) -> Iterator[None]:
    """Run the block on ``threads`` torch intra-op threads and (with ``threadpoolctl``)
    ``threads`` BLAS threads; the previous settings are restored on exit."""
    import torch

    before = torch.get_num_threads()
    limiter = None
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        threadpool_limits = None
    if threads != before:
        torch.set_num_threads(threads)
    try:
        if threadpool_limits is not None:
            limiter = threadpool_limits(limits=threads, user_api="blas")
        yield
    finally:
        if limiter is not None:
            limiter.restore_original_limits()
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
