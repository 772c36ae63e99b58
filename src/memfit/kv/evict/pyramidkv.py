from __future__ import annotations

from dataclasses import dataclass

from memfit.kv.evict.snapkv import SnapKV


@dataclass(frozen=True)
class PyramidKV(SnapKV):
    """PyramidKV (Cai et al., 2024): SnapKV scores, with budgets shrinking linearly with depth:
    the first layer keeps ``keep * (1 + slope)``, the last ``keep * (1 - slope)``; the average over
    layers stays ``keep``."""

    slope: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.slope < 1.0:
            raise ValueError(f"pyramidkv: slope must be in [0, 1), got {self.slope}")

    def layer_keep(self, layer: int, num_layers: int) -> float:
        if num_layers < 2:
            return self.keep
        return min(1.0, self.keep * (1 + self.slope * (1 - 2 * layer / (num_layers - 1))))
