"""Projections that share an input, run as one quantized layer: q/k/v, and gate/up.

At decode a GEMV's time is its weights' bytes plus a fixed cost per launch, and the small ones are all
fixed cost: on the H200 a 4-bit k or v projection of Llama-3.1-8B (1024 x 4096) took ~12.5 us for 0.55 us
of bytes. vLLM stacks them (``QKVParallelLinear``, ``MergedColumnParallelLinear``); so does
:func:`fuse_projections`, without touching the model's code: each projection becomes a :class:`Part`
of one stacked :class:`QuantLinear` (registered on the parent as ``qkv_proj`` / ``gate_up_proj``). The
first part called with an input runs the stacked layer; the others called with the same tensor take
their rows of that output; once each part has taken its rows the output is let go. The parts compare
inputs by identity (``is``), so any other call order, or a part called alone, still gets its own
product. torch.compile traces this without a graph break.

:func:`unfuse_projections` puts the separate layers back (``save_quantized`` wants them).
"""

from __future__ import annotations

import torch
from torch import nn

from memfit.weights.linear import QuantLinear

GROUPS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class _Shared:
    """The stacked layer's last input and output, until every part has taken its rows (plain object:
    torch.compile tracks its attribute writes as side effects)."""

    def __init__(self, parts: int):
        self.parts, self.x, self.y, self.left = parts, None, None, 0


class Part(nn.Module):
    """Output rows ``start .. stop - 1`` of a stacked layer, called like the Linear layer it replaced."""

    def __init__(self, stacked: QuantLinear, start: int, stop: int, shared: _Shared, bias: bool):
        super().__init__()
        # not a submodule: the stacked layer is registered once, on the parent, and saved once
        self._stacked = (stacked,)
        self.start, self.stop, self._shared = start, stop, shared
        self.in_features, self.out_features = stacked.in_features, stop - start
        self.had_bias = bias  # the layer it replaced had one (the stack holds zeros for those that did not)

    @property
    def stacked(self) -> QuantLinear:
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
    plain QuantLinear layers of the same input, widths and grid (QDEC and twin layers stay apart).
    Returns how many stacks were made. The products are the same, from one launch per stack."""
    made = 0
    for parent in list(model.modules()):
        for name, members in (groups or GROUPS).items():
            layers = [getattr(parent, m, None) for m in members]
            if not all(isinstance(m, QuantLinear) for m in layers) or hasattr(parent, name):
                continue
            try:
                stacked = QuantLinear.stack(layers)
            except ValueError:  # not alike (or QDEC / twin): left as they are
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
