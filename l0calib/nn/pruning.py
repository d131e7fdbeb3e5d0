"""``prune_model``: a physically smaller network without the units the gates closed.

Inside an ``nn.Sequential`` the layers form a chain, and a closed gate removes more than
its own parameters: an input unit of an :class:`L0Linear` that is gated off means the
previous layer need not compute that unit at all, and an output channel of an
:class:`L0Conv2d` gated off is zero, so the next layer need not read it. ``prune_model``
works out, along each chain, which features every layer must produce and read (through
activations with ``f(0) = 0``, pooling, dropout and ``Flatten``), and rebuilds each L0
layer as a plain ``nn.Linear`` / ``nn.Conv2d`` of the reduced size, the test-time gate
folded into the weights. If the chain's first layer no longer reads some inputs, a small
:class:`SelectInputs` module in front drops them.

Zero weights that remain inside kept units (unstructured gates, or positions of a kept
channel a flattened layer never read) are held at zero by a mask
(``torch.nn.utils.prune.custom_from_mask``), so fine-tuning cannot revive them.

Outside a Sequential an L0 layer is replaced on its own: its unused inputs are selected
away; a convolution keeps its channel count (its gated channels stay zero under a mask).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from l0calib.exceptions import ParameterError
from l0calib.nn.layers import L0Conv2d, L0Layer, L0Linear

__all__ = ["SelectInputs", "prune_model"]

# Modules that map an all-zero feature (or channel) to zero and act per feature/channel.
_ZERO_PRESERVING = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Tanh, nn.ELU, nn.GELU, nn.SiLU, nn.Hardtanh,
    nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)  # fmt: skip


class SelectInputs(nn.Module):
    """Keeps the given indices along ``dim`` (1: features, or channels of an image batch)."""

    def __init__(self, indices: torch.Tensor, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("indices", indices.to(torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x.index_select(dim, indices)``."""
        return x.index_select(self.dim, self.indices)

    def extra_repr(self) -> str:
        """Summary shown by ``repr``."""
        return f"{self.indices.numel()} inputs, dim={self.dim}"


def _dense_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias an eval forward uses, gates folded in."""
    with torch.no_grad():
        if isinstance(layer, L0Linear):
            return layer.effective_weight(), None if layer.bias is None else layer.bias.clone()
        if isinstance(layer, L0Conv2d):
            z = layer.gates.test_gates().to(layer.weight.dtype)
            w = layer.weight * z[:, None, None, None]
            b = None if layer.bias is None else layer.bias * z
            return w, b
        w = layer.weight.detach().clone()
        return w, None if layer.bias is None else layer.bias.detach().clone()


def _is_depthwise(layer: nn.Module) -> bool:
    return layer.groups > 1 and layer.groups == layer.in_channels == layer.out_channels


def _kind(m: nn.Module) -> str:
    if isinstance(m, (L0Linear, nn.Linear)):
        return "linear"
    if isinstance(m, (L0Conv2d, nn.Conv2d)):
        if m.groups == 1:
            return "conv"
        return "depthwise" if _is_depthwise(m) else "barrier"
    if isinstance(m, _ZERO_PRESERVING):
        return "pass"
    if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
        return "flatten"
    return "barrier"


def _prune_chain(mods: list[nn.Module]) -> nn.Sequential:
    kinds = [_kind(m) for m in mods]
    n = len(mods)
    dense = [_dense_weight(m) if k in ("linear", "conv", "depthwise") else None
             for m, k in zip(mods, kinds, strict=True)]  # fmt: skip
    # Forward: which features are identically zero after each layer, and which inputs
    # each layer can use.
    zero: torch.Tensor | None = None
    used_in: list[torch.Tensor | None] = [None] * n
    flat_size: list[int] = [0] * n
    for i, k in enumerate(kinds):
        if k == "linear":
            w, _ = dense[i]  # type: ignore[misc]
            use = (w != 0).any(0)
            used_in[i] = use if zero is None else use & ~zero
            zero = None
        elif k == "conv":
            w, b = dense[i]  # type: ignore[misc]
            used_in[i] = torch.ones(w.shape[1], dtype=torch.bool) if zero is None else ~zero
            zero = (w.flatten(1) == 0).all(1) & (b == 0 if b is not None else True)
        elif k == "depthwise":
            w, b = dense[i]  # type: ignore[misc]
            used_in[i] = torch.ones(w.shape[0], dtype=torch.bool)
            zero = (w.flatten(1) == 0).all(1) & (b == 0 if b is not None else True)
        elif k == "flatten":
            nxt = next((mods[j] for j in range(i + 1, n) if kinds[j] == "linear"), None)
            if zero is None or nxt is None or nxt.in_features % zero.numel():
                zero = None
                kinds[i] = "barrier"
            else:
                flat_size[i] = nxt.in_features // zero.numel()
                zero = zero.repeat_interleave(flat_size[i])
        elif k == "barrier":
            zero = None
    # Backward: which outputs each layer must produce, and which inputs it then reads.
    keep_out: list[torch.Tensor | None] = [None] * n
    keep_in: list[torch.Tensor | None] = [None] * n
    needed: torch.Tensor | None = None  # None = every feature
    for i in range(n - 1, -1, -1):
        k = kinds[i]
        if k in ("linear", "conv"):
            keep_out[i] = needed
            keep_in[i] = used_in[i]
            needed = used_in[i]
        elif k == "depthwise":
            keep_out[i] = needed
            keep_in[i] = needed
        elif k == "flatten" and needed is not None:
            channels = needed.view(-1, flat_size[i]).any(1)
            expanded = channels.repeat_interleave(flat_size[i])
            # The linear layer after the Flatten must read every position of a kept channel.
            j = next(j for j in range(i + 1, n) if kinds[j] == "linear")
            keep_in[j] = expanded
            needed = channels
        elif k == "barrier":
            needed = None
    out: list[nn.Module] = []
    if needed is not None and not bool(needed.all()):
        out.append(SelectInputs(torch.nonzero(needed).flatten()))
    for i, (m, k) in enumerate(zip(mods, kinds, strict=True)):
        if k in ("linear", "conv", "depthwise"):
            out.append(_rebuild(m, k, dense[i], keep_in[i], keep_out[i]))  # type: ignore[arg-type]
        else:
            out.append(_prune_children(m))
    return nn.Sequential(*out)


def _rebuild(
    m: nn.Module,
    kind: str,
    wb: tuple[torch.Tensor, torch.Tensor | None],
    keep_in: torch.Tensor | None,
    keep_out: torch.Tensor | None,
) -> nn.Module:
    w, b = wb
    rows = torch.arange(w.shape[0]) if keep_out is None else torch.nonzero(keep_out).flatten()
    w = w[rows]
    b = None if b is None else b[rows]
    if kind != "depthwise":
        cols = torch.arange(w.shape[1]) if keep_in is None else torch.nonzero(keep_in).flatten()
        w = w[:, cols]
    if kind == "linear":
        new: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    else:
        groups = w.shape[0] if kind == "depthwise" else 1
        new = nn.Conv2d(
            w.shape[1] * groups, w.shape[0], tuple(m.kernel_size), stride=m.stride,
            padding=m.padding, dilation=m.dilation, groups=groups, bias=b is not None,
        )  # fmt: skip
    new = new.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    if bool((w == 0).any()):
        torch_prune.custom_from_mask(new, "weight", (w != 0))
    return new


def _prune_children(module: nn.Module) -> nn.Module:
    """Replace L0 layers and Sequential chains anywhere inside ``module`` (in place)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Sequential):
            setattr(module, name, _prune_chain(list(child)))
        elif isinstance(child, L0Layer):
            setattr(module, name, _prune_single(child))
        else:
            _prune_children(child)
    return module


def _prune_single(layer: L0Layer) -> nn.Module:
    chain = _prune_chain([layer])
    return chain[0] if len(chain) == 1 else chain


def prune_model(model: nn.Module, threshold: float = 0.0) -> nn.Module:
    """A copy of ``model`` with gated-off units removed and L0 layers made plain.

    Parameters
    ----------
    model : nn.Module
        Any model containing :mod:`l0calib.nn` layers; it is not modified.
    threshold : float, default 0.0
        Test-time gates at or below this value are treated as closed. With the default,
        the pruned model's outputs equal the gated model's eval outputs (to float
        rounding); a positive threshold trades accuracy for size.

    Returns
    -------
    nn.Module
        Same class for containers; ``nn.Linear`` / ``nn.Conv2d`` (possibly preceded by a
        :class:`SelectInputs`) in place of the L0 layers. Put it in ``eval()`` mode like
        the original to compare outputs.

    Example
    -------
    >>> from l0calib.nn import SparseMLP
    >>> model = SparseMLP(20, 16, 3, init_sparsity=0.5, seed=0).eval()
    >>> small = prune_model(model).eval()
    >>> x = torch.randn(4, 20)
    >>> torch.allclose(model(x), small(x), atol=1e-5)
    True
    """
    if not 0.0 <= threshold < 1.0:
        raise ParameterError(f"threshold must be in [0, 1), got {threshold!r}")
    model = copy.deepcopy(model)
    if threshold > 0:
        with torch.no_grad():
            for layer in model.modules():
                if isinstance(layer, L0Layer):
                    closed = layer.gates.test_gates() <= threshold
                    layer.gates.log_alpha[closed] = -1e4
    if isinstance(model, nn.Sequential):
        return _prune_chain(list(model))
    if isinstance(model, L0Layer):
        return _prune_single(model)
    return _prune_children(model)
