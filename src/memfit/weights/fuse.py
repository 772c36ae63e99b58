"""Projections that share an input, run as one layer: q/k/v, and gate/up (quantized or 16-bit).

At decode a GEMV's time is its weights' bytes plus a fixed cost per launch, and the small ones are all
fixed cost: on the H200 a 4-bit k or v projection of Llama-3.1-8B (1024 x 4096) took ~12.5 us for 0.55 us
of bytes. vLLM stacks them (``QKVParallelLinear``, ``MergedColumnParallelLinear``); so does
:func:`fuse_projections`, without touching the model's code: each projection becomes a :class:`Part`
of one stacked :class:`QuantLinear` (registered on the parent as ``qkv_proj`` / ``gate_up_proj``). The
first part called with an input runs the stacked layer; the others called with the same tensor take
their rows of that output; once each part has taken its rows the output is let go. The parts compare
inputs by identity (``is``), so any other call order, or a part called alone, still gets its own
product. torch.compile traces this without a graph break. 16-bit ``nn.Linear`` projections stack the same
way (:class:`StackedLinear`): at a decode batch of 8 on the H200, small bf16 GEMMs (k/v of 1024 rows) are
launch-bound too.

:func:`unfuse_projections` puts the separate layers back (``save_quantized`` wants them).
"""

from __future__ import annotations

import torch
from torch import nn

from memfit.weights.linear import QuantLinear

GROUPS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class StackedLinear(nn.Linear):
    """16-bit projections of one input stacked along their output rows (zeros for a missing bias)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def stack(cls, layers: list[nn.Linear]) -> "StackedLinear":
        w0 = layers[0].weight
        if any((m.in_features, m.weight.dtype, m.weight.device) != (layers[0].in_features, w0.dtype, w0.device)
               for m in layers):
            raise ValueError("only projections of the same input width, dtype and device stack")
        bias = None
        if any(m.bias is not None for m in layers):
            bias = torch.cat([m.bias.detach() if m.bias is not None else w0.new_zeros(m.out_features) for m in layers])
        return cls(torch.cat([m.weight.detach() for m in layers]), bias)

    def rows(self, start: int, stop: int, bias: bool = True) -> nn.Linear:
        """Rows ``start .. stop - 1`` as a Linear layer of their own (with the bias if ``bias``)."""
        w = self.weight[start:stop]
        out = nn.Linear(self.in_features, stop - start, bias=bias, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if bias:
                out.bias.copy_(self.bias[start:stop])
        return out.requires_grad_(False)


def _stack(layers: list) -> "QuantLinear | StackedLinear":
    """One layer for ``layers``: all QuantLinear or all plain 16-bit Linear; ValueError otherwise."""
    if all(isinstance(m, QuantLinear) for m in layers):
        return QuantLinear.stack(layers)
    if all(type(m) is nn.Linear for m in layers):  # exactly Linear: a subclass may compute something else
        return StackedLinear.stack(layers)
    raise ValueError("projections of different kinds")


class _Shared:
    """The stacked layer's last input and output, until every part has taken its rows (plain object:
    torch.compile tracks its attribute writes as side effects)."""

    def __init__(self, parts: int):
        self.parts, self.x, self.y, self.left = parts, None, None, 0


class Part(nn.Module):
    """Output rows ``start .. stop - 1`` of a stacked layer, called like the Linear layer it replaced."""

    def __init__(self, stacked: "QuantLinear | StackedLinear", start: int, stop: int, shared: _Shared, bias: bool):
        super().__init__()
        # not a submodule: the stacked layer is registered once, on the parent, and saved once
        self._stacked = (stacked,)
        self.start, self.stop, self._shared = start, stop, shared
        self.in_features, self.out_features = stacked.in_features, stop - start
        self.had_bias = bias  # the layer it replaced had one (the stack holds zeros for those that did not)

    @property
    def stacked(self) -> "QuantLinear | StackedLinear":
        return self._stacked[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self._shared
        if s.x is not x or s.left == 0:
            s.x, s.y, s.left = x, self.stacked(x), s.parts
        y = s.y[..., self.start : self.stop]
        s.left -= 1
        if s.left == 0:  # every part has its rows: nothing of this step is kept past it
            s.x = s.y = None
        return y

    def extra_repr(self) -> str:
        return f"rows {self.start}..{self.stop - 1} of the stacked layer"


def fuse_projections(model: nn.Module, groups: dict[str, tuple[str, ...]] | None = None) -> int:
    """Stack each module's projections named in ``groups`` (default :data:`GROUPS`) where all are
    QuantLinear layers of the same input, widths and grid (twin layers too; QDEC layers stay apart), or
    all plain 16-bit ``nn.Linear`` layers of one dtype. Returns how many stacks were made. The products
    are the same, from one launch per stack."""
    made = 0
    for parent in list(model.modules()):
        for name, members in (groups or GROUPS).items():
            layers = [getattr(parent, m, None) for m in members]
            if any(m is None for m in layers) or hasattr(parent, name):
                continue
            try:
                stacked = _stack(layers)
            except ValueError:  # not alike (or QDEC / twin, or mixed kinds): left as they are
                continue
            parent.add_module(name, stacked)
            shared, start = _Shared(len(members)), 0
            for m, layer in zip(members, layers):
                setattr(parent, m, Part(stacked, start, start + layer.out_features, shared,
                                                layer.bias is not None))
                start += layer.out_features
            made += 1
    return made


def unfuse_projections(model: nn.Module) -> int:
    """Put the separate layers back where :func:`fuse_projections` stacked them. Returns how many stacks
    were undone."""
    undone = 0
    for parent in list(model.modules()):
        parts = {n: m for n, m in parent.named_children() if isinstance(m, Part)}
        stacks = {id(p.stacked): p.stacked for p in parts.values()}
        for stacked in stacks.values():
            for n, p in parts.items():
                if p.stacked is stacked:
                    setattr(parent, n, stacked.rows(p.start, p.stop, bias=p.had_bias))
            for n, m in list(parent.named_children()):
                if m is stacked:
                    delattr(parent, n)
            undone += 1
    return undone


def is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, Part) for m in model.modules())
