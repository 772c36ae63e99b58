"""Rotary position embedding, for keys quantized before RoPE (KVQuant): the cache takes RoPE off
the keys it quantizes and puts it back when it reads them, at each token's position.

Llama-style RoPE (``rotate_half``, transformers' ``LlamaRotaryEmbedding`` and the models that share
it): ``k_rot = k * cos + rotate_half(k) * sin`` with ``cos, sin = cos/sin(position * inv_freq) * s``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass(frozen=True)
class RoPE:
    inv_freq: torch.Tensor  # [head_dim / 2] float32
    scaling: float = 1.0  # transformers' attention_scaling (1 except for YaRN-like types)
    # inv_freq's copy on each device it was asked for: one copy, not one a decode step (and one
    # tensor, which the decode kernel builds its table of offsets for once)
    _copies: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def default(cls, head_dim: int, base: float = 10000.0, scaling: float = 1.0) -> "RoPE":
        """Llama's unscaled RoPE over ``head_dim`` channels: inv_freq = base ** (-2i / head_dim)."""
        return cls(1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim), scaling)

    def inv_freq_on(self, device: "torch.device | str") -> torch.Tensor:
        device = torch.device(device)
        if device not in self._copies:
            self._copies[device] = self.inv_freq.to(device)
        return self._copies[device]

    def kernel_args(self, device: "torch.device | str") -> dict:
        """What a ``PackedRun`` of codes stored before this RoPE needs for the decode kernel to put it back."""
        return {"rope": self.inv_freq_on(device), "rope_scaling": self.scaling}

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "RoPE | None":
        """The model's rotary embedding (the module holding ``inv_freq``), or None if it has none."""
        for m in model.modules():
            inv = getattr(m, "inv_freq", None)
            if isinstance(inv, torch.Tensor):
                return cls(inv.detach().float().cpu().clone(), float(getattr(m, "attention_scaling", 1.0)))
        return None

    def _cos_sin(self, positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(device=device, dtype=torch.float32)[:, None] * self.inv_freq_on(device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [N, D]
        return emb.cos() * self.scaling, emb.sin() * self.scaling

    def rotate(self, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """RoPE on ``k`` [B, H, N, D] at ``positions`` [N] (float32 out)."""
        cos, sin = self._cos_sin(positions, k.device)
        k = k.float()
        return k * cos + _rotate_half(k) * sin

    def unrotate(self, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`rotate` (the transpose of the rotation, over the squared scaling)."""
        cos, sin = self._cos_sin(positions, k.device)
        k = k.float()
        return (k * cos - _rotate_half(k) * sin) / (self.scaling**2)

    def shift(self, k: torch.Tensor, delta: "int | torch.Tensor") -> torch.Tensor:
        """Post-RoPE keys ``k`` [B, H, N, D] moved by ``delta`` positions (an int, or one per token
        [N]; float32 out): rotations compose, R(p + d) = R(d) R(p), so a stored document's keys can
        be placed at new positions without recomputing them (the scaling is in ``k`` already: only
        the rotation is applied)."""
        n = k.shape[-2]
        if isinstance(delta, int):  # one rotation for every token: a [D, D] matrix, one matmul
            return k.float() @ self.shift_matrix(delta, k.device)
        d = torch.as_tensor(delta)
        if d.shape != (n,):
            raise ValueError(f"delta must be an int or one per token ({n}), got shape {tuple(d.shape)}")
        cos, sin = self._cos_sin(d, k.device)
        k = k.float()
        return (k * cos + _rotate_half(k) * sin) / self.scaling

    def shift_matrix(self, delta: int, device: "torch.device | str" = "cpu") -> torch.Tensor:
        """M [D, D] (float32) with ``k.float() @ M`` = ``shift(k, delta)`` (built once, it moves every
        layer's keys): k * cos + rotate_half(k) * sin, where rotate_half(k) = k @ P (P's columns pick
        -k[j + D/2] for j < D/2, k[j - D/2] after)."""
        cos, sin = (x[0] / self.scaling for x in self._cos_sin(torch.tensor([delta]), device))
        h = cos.numel() // 2
        m = torch.diag(cos)
        i = torch.arange(h, device=device)
        m[i + h, i] = -sin[:h]
        m[i, i + h] = sin[h:]
        return m

    @staticmethod
    def apply_shift(k: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """``k`` [..., D] moved by a :meth:`shift_matrix` ``m``: one GEMM in ``k``'s own dtype where
        that is 16-bit (the matrix rounded to it: on bfloat16 keys the error grows from 0.5 to about
        0.65 of a unit in the last place, rms; 2.6x faster on a CPU), else in float32."""
        if k.dtype in (torch.bfloat16, torch.float16):
            return k @ m.to(k.dtype)
        return k.float() @ m

    def check(self, head_dim: int) -> None:
        if 2 * self.inv_freq.numel() != head_dim:
            raise ValueError(f"RoPE over {2 * self.inv_freq.numel()} channels cannot rotate keys of head_dim {head_dim} "
                             "(partial rotary embeddings are not supported for pre_rope keys)")
