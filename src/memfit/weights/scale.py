"""Per-channel scales folded into the op before each layer (AWQ's search, Lin et al. 2024).

``W x = (W diag(s)) (x / s)``: a layer's input channels are scaled by ``s`` and its input divided by
``s`` where that input is made, so the model computes the same function (up to the rounding of the
folded weights) while the grid sees ``W diag(s)``. Channels with large activations get larger
weights, which a group's shared scale then resolves more finely. Folds, per Llama-style decoder
layer (Llama, Mistral, Qwen):

- q/k/v: ``input_layernorm.weight /= s``;  gate/up: ``post_attention_layernorm.weight /= s``;
- o_proj: ``v_proj``'s rows ``/= s`` (attention is linear in V; one ``s`` for the query heads of a
  KV group, which read the same value channel);
- down_proj: ``up_proj``'s rows ``/= s`` (its input is ``silu(gate) * up``).

``s = mean|x| ** alpha`` on calibration text, ``alpha`` chosen among ``ALPHAS`` for each layer and
input by the output error ``||(Q(W s) / s - W) X||^2`` of the layers that read it, ``Q`` the
config's grid (HQQ's for the methods that fit one otherwise). SmolLM2, ``hqq:3:g32:m8``:
perplexity 75.7 -> 42.9 (docs/weights.md).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from memfit.weights.grid import hqq, rtn, with_meta

ALPHAS = (0.0, 0.25, 0.5, 0.75)  # 0: no scale (the layer is left as it is)
SAMPLE = 1024  # calibration tokens a layer input keeps for the search (their mean |x| uses every token)
_NEEDS = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
          "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, checked to have the modules the folds need."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not len(layers):
        raise ValueError("scale_search needs a decoder model with model.model.layers (Llama, Mistral, Qwen)")
    for i, layer in enumerate(layers):
        for path in _NEEDS:
            try:
                layer.get_submodule(path)
            except AttributeError:
                raise ValueError(f"scale_search: decoder layer {i} has no {path}; the per-channel scales fold into "
                                 "Llama-style layers only (Llama, Mistral, Qwen)") from None
    return layers


def _inputs(layer: nn.Module) -> dict[str, tuple[nn.Linear, ...]]:
    a, m = layer.self_attn, layer.mlp
    return {"qkv": (a.q_proj, a.k_proj, a.v_proj), "o": (a.o_proj,), "gu": (m.gate_proj, m.up_proj),
            "down": (m.down_proj,)}


@torch.no_grad()
def feed(model: nn.Module, ids: torch.Tensor, layers: dict, record, batch_size: int = 4) -> None:
    """Run ``model`` on ``ids`` [n, length], ``batch_size`` sequences at a time, calling
    ``record(key, x)`` with each of ``layers``' ({key: module}) inputs as [tokens, channels] float32."""
    def hook(key):
        def f(_mod, inp):
            record(key, inp[0].detach().reshape(-1, inp[0].shape[-1]).float())
        return f

    handles = [mod.register_forward_pre_hook(hook(key)) for key, mod in layers.items()]
    try:
        for b in range(0, ids.shape[0], batch_size):
            model(ids[b : b + batch_size])
    finally:
        for h in handles:
            h.remove()


def _activations(model: nn.Module, layers, ids: torch.Tensor, batch: int = 4):
    """Mean |x| per channel of each layer input, and ``SAMPLE`` of its tokens (a fixed random subset)."""
    gen = torch.Generator().manual_seed(0)
    per_batch = -(-SAMPLE * batch // ids.shape[0])
    sums, counts, rows = {}, {}, {}

    def record(key, x):
        sums[key] = sums.get(key, 0) + x.abs().sum(0)
        counts[key] = counts.get(key, 0) + x.shape[0]
        rows.setdefault(key, []).append(x[torch.randperm(x.shape[0], generator=gen)[:per_batch].to(x.device)])

    feed(model, ids, {(i, kind): lins[0] for i, layer in enumerate(layers) for kind, lins in _inputs(layer).items()},
         record, batch)
    return ({k: v / counts[k] for k, v in sums.items()}, {k: torch.cat(v)[:SAMPLE] for k, v in rows.items()})


def _quantized(w: torch.Tensor, method: str, bits: int, group_size: int, meta_bits: int) -> torch.Tensor:
    uc = (rtn if method == "rtn" else hqq)(w, bits, group_size)
    if meta_bits:
        uc, _ = with_meta(w, uc, meta_bits)
    return uc.dequantize().reshape(w.shape)


def _fold(layer: nn.Module, kind: str, s: torch.Tensor, kv_heads: int) -> None:
    """Scale the input channels of the layers reading ``kind`` by ``s`` and divide it out where it is made."""
    def mul(t: torch.Tensor, f: torch.Tensor) -> None:
        t.data = (t.data.float() * f).to(t.dtype)

    for lin in _inputs(layer)[kind]:
        mul(lin.weight, s)
    a, m = layer.self_attn, layer.mlp
    if kind == "qkv":
        mul(layer.input_layernorm.weight, 1 / s)
    elif kind == "gu":
        mul(layer.post_attention_layernorm.weight, 1 / s)
    elif kind == "down":
        mul(m.up_proj.weight, 1 / s[:, None])
    else:  # o: s is the same for a KV group's query heads: its first head's part divides v_proj's rows
        sv = s.reshape(kv_heads, -1, a.v_proj.out_features // kv_heads)[:, 0].reshape(-1)
        mul(a.v_proj.weight, 1 / sv[:, None])
        if a.v_proj.bias is not None:
            mul(a.v_proj.bias, 1 / sv)


@torch.no_grad()
def search_and_fold(model: nn.Module, ids: torch.Tensor, config, targets: "set[str]",
                    progress: bool = True) -> dict[str, float]:
    """Choose and fold each decoder layer's four input scales for ``config`` (a ``WeightQuant``: its
    grid, width and groups), the error counted over the layers named in ``targets`` (those
    ``quantize_`` will quantize); returns ``{"<layer>.<qkv|o|gu|down>": alpha}``. Inputs read by no
    target, or by one whose width is not a multiple of the group, keep no scale."""
    layers = decoder_layers(model)
    kv_heads = model.config.num_key_value_heads
    heads = model.config.num_attention_heads
    names = {id(mod): name for name, mod in model.named_modules()}
    mean_abs, sample = _activations(model, layers, ids)
    chosen = {}
    for i, layer in enumerate(tqdm(layers, desc="scale search", disable=not progress, leave=False)):
        for kind, lins in _inputs(layer).items():
            ws = [lin.weight.float() for lin in lins if names[id(lin)] in targets]
            if not ws or any(w.shape[1] % config.group_size for w in ws):
                chosen[f"{i}.{kind}"] = 0.0
                continue
            st = mean_abs[i, kind].clamp_min(1e-6)
            if kind == "o":  # one scale a value channel: the mean over the query heads that read it
                grouped = st.reshape(kv_heads, heads // kv_heads, -1)
                st = grouped.mean(1, keepdim=True).expand_as(grouped).reshape(-1)
            x = sample[i, kind].T.to(ws[0].device)
            best = None
            for alpha in ALPHAS:
                s = st**alpha
                s = s / (s.max() * s.min()).sqrt()  # centred in log scale: neither end grows alone
                err = 0.0
                for w in ws:
                    q = _quantized(w * s, config.method, config.bits, config.group_size, config.meta_bits) / s
                    err += ((q - w) @ x).square().sum().item()
                if best is None or err < best[0]:
                    best = (err, alpha, s)
            _, alpha, s = best
            chosen[f"{i}.{kind}"] = alpha
            if alpha:
                _fold(layer, kind, s, kv_heads)
    return chosen
