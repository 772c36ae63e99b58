from __future__ import annotations

from dataclasses import dataclass

from memfit.kv.evict.base import Eviction, Observation
from memfit.lazy import lazy_module

torch = lazy_module("torch")


@dataclass(frozen=True)
class StreamingLLM(Eviction):
    """StreamingLLM (Xiao et al., 2023): keep the first ``sinks`` tokens and a window of the most
    recent ones. The window is ``window`` tokens if given, else whatever ``keep`` leaves after the sinks."""

    sinks: int = 4
    window: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0:
            raise ValueError(f"streaming: sinks must be >= 0, got {self.sinks}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"streaming: window must be >= 1, got {self.window}")

    def budget(self, n: int, keep: float | None = None) -> int:
        if self.window is not None:
            return min(n, self.sinks + self.window)
        return max(super().budget(n, keep), min(n, self.sinks + 1))

    def score(self, keys: torch.Tensor, values: torch.Tensor, obs: Observation) -> torch.Tensor:
        b, h, n, _ = keys.shape
        pos = torch.arange(n, device=keys.device, dtype=torch.float32)
        pos[: self.sinks] = float(n + 1)  # sinks outrank every recent token
        return pos.expand(b, h, n)
