"""Ragged storage: a layer whose KV heads keep different numbers of tokens (adaptive or global
eviction), stored back to back without padding."""

from __future__ import annotations

import torch

from memfit.kv.quant import KIVI, QTensor, dequantize, quantize_keys, quantize_values


class Ragged:
    """Per-head token counts that differ (adaptive eviction), stored without padding: every head's
    tokens back to back, as one flat [1, 1, T, D] sequence. With a quantizer each head's oldest
    tokens are quantized in whole key groups (so no group spans two heads) and the rest kept in
    16-bit, as the uniform window would be. Batch size 1."""

    def __init__(self, lens: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk: QTensor | None = None,
                 qv: QTensor | None = None):
        self.lens = lens  # int32 [2, H]: tokens per head, of which quantized
        self.k, self.v, self.qk, self.qv = k, v, qk, qv

    @classmethod
    def build(cls, keys: torch.Tensor, values: torch.Tensor, idx: list[torch.Tensor], quant: KIVI | None) -> "Ragged":
        ks = [keys[0, h, i] for h, i in enumerate(idx)]
        vs = [values[0, h, i] for h, i in enumerate(idx)]
        lens = [len(i) for i in idx]
        nq = [quant.spilled(n) if quant is not None else 0 for n in lens]
        flat = lambda parts: torch.cat(parts).unsqueeze(0).unsqueeze(0)  # noqa: E731
        qk = qv = None
        if sum(nq):
            qk = quantize_keys(flat([k[:q] for k, q in zip(ks, nq)]), quant.bits, quant.group, outliers=quant.outliers)
            qv = quantize_values(flat([v[:q] for v, q in zip(vs, nq)]), quant.bits, quant.value_group(keys.shape[-1]),
                                 outliers=quant.outliers)
        lens_t = torch.tensor([lens, nq], dtype=torch.int32, device=keys.device)
        return cls(lens_t, flat([k[q:] for k, q in zip(ks, nq)]), flat([v[q:] for v, q in zip(vs, nq)]), qk, qv)

    @property
    def max_len(self) -> int:
        return int(self.lens[0].max())

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"r_lens": self.lens, "r_k": self.k, "r_v": self.v}
        if self.qk is not None:
            out.update({f"r_k_{n}": t for n, t in self.qk.tensors().items()})
            out.update({f"r_v_{n}": t for n, t in self.qv.tensors().items()})
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], q: dict | None) -> "Ragged":
        qk = qv = None
        if "r_k_codes" in t:
            qk = QTensor.from_tensors(t, "r_k_", q["bits"], "token", q["kgroup"])
            qv = QTensor.from_tensors(t, "r_v_", q["bits"], "channel", q["vgroup"])
        return cls(t["r_lens"], t["r_k"], t["r_v"], qk, qv)

    def dense(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded [1, H, max_len, D] keys and values and the [1, H, max_len] mask of real entries."""
        lens, nq = self.lens[0].tolist(), self.lens[1].tolist()
        qk = dequantize(self.qk, dtype)[0, 0].split(nq) if self.qk is not None else [None] * len(lens)
        qv = dequantize(self.qv, dtype)[0, 0].split(nq) if self.qv is not None else [None] * len(lens)
        wk = self.k[0, 0].split([n - q for n, q in zip(lens, nq)])
        wv = self.v[0, 0].split([n - q for n, q in zip(lens, nq)])
        m, d = max(lens), self.k.shape[-1]
        k = self.k.new_zeros(1, len(lens), m, d, dtype=dtype)
        v = self.v.new_zeros(1, len(lens), m, self.v.shape[-1], dtype=dtype)
        mask = torch.zeros(1, len(lens), m, dtype=torch.bool, device=self.k.device)
        for h, n in enumerate(lens):
            k[0, h, :n] = torch.cat([t for t in (qk[h], wk[h]) if t is not None])
            v[0, h, :n] = torch.cat([t for t in (qv[h], wv[h]) if t is not None])
            mask[0, h, :n] = True
        return k, v, mask
