"""Counter-based random noise keyed by (seed, draw, element index).

A fit that is split across processes, stopped and resumed must draw the same gate noise
for record ``i`` at draw ``d`` wherever and whenever that record is processed. A stateful
generator cannot promise that; a hash of ``(seed, draw, i)`` can. This module hashes with
SplitMix64 (Steele, Lea & Flood 2014, "Fast splittable pseudorandom number generators",
OOPSLA), whose output passes BigCrush when used as below, and maps the top 53 bits to a
double in the open interval (0, 1).

Everything is vectorised torch integer arithmetic, so the noise is generated on the device
that holds the records.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["counter_uniform", "logistic_from_uniform", "logistic_noise"]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB


def _signed(c: int) -> int:
    """Two's-complement int64 value with the same 64 bits as the unsigned constant ``c``."""
    c &= _MASK64
    return c - (1 << 64) if c >= (1 << 63) else c


def _mix_int(x: int) -> int:
    """SplitMix64 finaliser on a Python int (exact 64-bit unsigned arithmetic)."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * _MUL1) & _MASK64
    x = ((x ^ (x >> 27)) * _MUL2) & _MASK64
    return x ^ (x >> 31)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; mask off the copied sign bits to make it logical.
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix_tensor(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on an int64 tensor; products wrap modulo 2**64 as intended."""
    x = (x ^ _shr(x, 30)) * _signed(_MUL1)
    x = (x ^ _shr(x, 27)) * _signed(_MUL2)
    return x ^ _shr(x, 31)


def counter_uniform(
    seed: int,
    draw: int,
    index: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Uniform numbers in the open interval (0, 1), one per element of ``index``.

    The value for a given ``(seed, draw, index[j])`` never depends on the other indices,
    on the device, or on how the indices are split across processes.

    Parameters
    ----------
    seed : int
        Any integer (reduced modulo 2**64).
    draw : int
        Which draw this is (0, 1, 2...): a training step counter, say.
    index : torch.Tensor of int64, any shape
        Global element indices (for records: the record's row in the full data set).
    dtype : torch.dtype
        Output dtype. Values are computed in float64 and then cast; for float32 or lower
        the cast can round values within 2**-25 of 1 up to 1.0, so call
        :func:`logistic_noise` when the noise feeds a logit.

    Returns
    -------
    torch.Tensor
        Same shape and device as ``index``.

    Example
    -------
    >>> import torch
    >>> u = counter_uniform(0, 0, torch.arange(6))
    >>> bool(torch.equal(u[3:], counter_uniform(0, 0, torch.arange(3, 6))))
    True
    """
    return _counter_uniform_block(_streams(seed, draw, 1), index)[0].to(dtype)


def _streams(seed: int, first: int, count: int) -> list[int]:
    """The 64-bit stream keys of draws ``first .. first + count - 1`` of ``seed``."""
    base = _mix_int(seed)
    return [_mix_int(base + _GOLDEN * (d + 1)) for d in range(first, first + count)]


def _counter_uniform_block(streams: list[int], index: torch.Tensor) -> torch.Tensor:
    """float64 uniforms of shape ``(len(streams), *index.shape)``: row ``r`` is draw
    ``streams[r]``. Elementwise, so a row never depends on the other rows."""
    if index.device.type == "cpu":
        return _counter_uniform_numpy(streams, index)
    return _counter_uniform_torch(streams, index)


def _counter_uniform_torch(streams: list[int], index: torch.Tensor) -> torch.Tensor:
    """SplitMix64 of ``index * golden + stream`` in torch int64 ops (any device), mapped to
    a float64 in (0, 1)."""
    keys = torch.tensor([_signed(s) for s in streams], dtype=torch.int64, device=index.device)
    x = index.to(torch.int64).reshape(1, -1) * _signed(_GOLDEN) + keys[:, None]
    bits = _shr(_mix_tensor(x), 11)  # top 53 bits, in [0, 2**53)
    u = (bits.to(torch.float64) + 0.5) * 2.0**-53
    return u.reshape(len(streams), *index.shape)


def _counter_uniform_numpy(streams: list[int], index: torch.Tensor) -> torch.Tensor:
    """The same numbers, on CPU (numpy): bit-identical to the torch version."""
    out = _noise_numpy(streams, index, logistic=False, dtype=np.float64)
    return torch.from_numpy(out.reshape(len(streams), *index.shape))


# Numbers per step of the CPU noise: the uint64 / float64 work arrays (256 KiB) stay in
# cache through the dozen passes instead of streaming each pass through memory.
_CHUNK = 1 << 15


def _noise_numpy(
    streams: list[int], index: torch.Tensor, *, logistic: bool, dtype: type
) -> np.ndarray:
    """Uniforms (or logistic noise, ``log(u) - log(1 - u)``) of shape ``(len(streams),
    index.numel())`` in numpy's ``dtype``: SplitMix64 in numpy's uint64 arithmetic (logical
    shifts, products modulo 2**64), computed in float64 and cast at the end; chunk by chunk
    of indices."""
    ix = index.detach().to(torch.int64).numpy().reshape(-1).view(np.uint64)
    k, n = len(streams), ix.size
    out = np.empty((k, n), dtype=dtype)
    keys = np.array(streams, dtype=np.uint64)[:, None]
    step = max(1, _CHUNK // k)
    x = np.empty((k, min(step, n)), dtype=np.uint64)
    u = np.empty(x.shape, dtype=np.float64)
    v = np.empty(x.shape, dtype=np.float64) if logistic else None
    golden, mul1, mul2 = np.uint64(_GOLDEN), np.uint64(_MUL1), np.uint64(_MUL2)
    with np.errstate(over="ignore"):
        for lo in range(0, n, step):
            m = min(step, n - lo)
            xx, uu = x[:, :m], u[:, :m]
            np.add((ix[lo : lo + m] * golden)[None, :], keys, out=xx)
            xx ^= xx >> np.uint64(30)
            xx *= mul1
            xx ^= xx >> np.uint64(27)
            xx *= mul2
            xx ^= xx >> np.uint64(31)
            xx >>= np.uint64(11)  # top 53 bits, in [0, 2**53)
            np.add(xx, 0.5, out=uu, casting="unsafe")  # exact conversion, then + 0.5
            uu *= 2.0**-53
            if v is not None:
                vv = v[:, :m]
                np.negative(uu, out=vv)
                np.log1p(vv, out=vv)
                np.log(uu, out=uu)
                uu -= vv
            out[:, lo : lo + m] = uu
    return out


def logistic_noise(
    seed: int,
    draw: int,
    index: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    count: int | None = None,
) -> torch.Tensor:
    """Standard logistic noise ``log(u) - log(1 - u)`` from :func:`counter_uniform`.

    Computed in float64 (so it is finite: at most about 37.4 in magnitude), then cast.
    With ``count``, draws ``draw .. draw + count - 1`` at once, shape
    ``(count, *index.shape)``; row ``r`` equals ``logistic_noise(seed, draw + r, index)``
    bit for bit (a layer of a few hundred gates takes a block of draws in one call
    instead of paying the per-call overhead every step).
    """
    streams = _streams(seed, draw, 1 if count is None else count)
    if index.device.type == "cpu":
        # numpy's float64 log may differ from torch's in the last bit (about 1% of values);
        # after a cast to float32 the two agree. numpy saves the per-op overhead that
        # dominates for the few hundred gates of a network layer, and its chunked loop the
        # memory traffic that dominates for millions of records.
        np_dtype = {torch.float32: np.float32, torch.float64: np.float64}.get(dtype, np.float64)
        out = _noise_numpy(streams, index, logistic=True, dtype=np_dtype)
        noise = torch.from_numpy(out.reshape(len(streams), *index.shape)).to(dtype)
    else:
        noise = logistic_from_uniform(_counter_uniform_torch(streams, index), dtype=dtype)
    return noise[0] if count is None else noise


def logistic_from_uniform(u: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
    """``log(u) - log(1 - u)``, computed in float64 and cast to ``dtype``.

    ``u`` must lie in the open interval (0, 1); the result is then finite.
    """
    u = u.to(torch.float64)
    return (torch.log(u) - torch.log1p(-u)).to(dtype)
