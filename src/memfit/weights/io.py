"""Saving a quantized model to a folder (safetensors + config + tokenizer) and loading it back."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from memfit.weights.linear import QuantLinear
from memfit.weights.quantize import QuantReport, WeightQuant, _set_module, set_read_bits

MANIFEST = "memfit_quant.json"
WEIGHTS = "model.safetensors"
FORMAT = 4  # 2 added quantized scale and zero (meta_bits), 3 QDEC residuals, 4 twin's low-rank factors;
READS = (1, 2, 3, 4)  # a folder is written in the oldest format that holds it


def save_quantized(model: nn.Module, tokenizer, out_dir: "str | Path", report: QuantReport) -> Path:
    """Write ``out_dir/{config.json, tokenizer files, model.safetensors, memfit_quant.json}``. Tied
    parameters are written once. The manifest is written last, so a folder without it is incomplete."""
    from memfit.weights.fuse import is_fused

    if is_fused(model):
        raise ValueError("the model's projections are stacked for decoding: call "
                         "memfit.weights.fuse.unfuse_projections(model) before saving it")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    model.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    tensors, seen = {}, {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.data_ptr(), t.shape, t.dtype)
        if key in seen:  # a tied weight (lm_head = embedding): stored once, re-tied on load
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    tmp = out / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "memfit-quant"})
    tmp.replace(out / WEIGHTS)
    layers = report.layers.values()  # the oldest format that holds the folder: older memfit reads it
    fmt = (4 if any(v.get("rank") for v in layers) else 3 if any(v.get("qdec_k") for v in layers)
           else 2 if any(v.get("meta_bits") for v in layers) else 1)
    # the scales were folded into the saved weights: loading needs nothing of them, and a config key
    # older memfit does not know would make it refuse the folder, so they stand beside the config
    config = {k: v for k, v in report.config.to_dict().items() if k != "scale_search"}
    manifest = {"format": fmt, "config": config, **({"scale_search": report.scales} if report.scales else {}),
                "layers": report.layers,
                "skipped": report.skipped, "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


def is_quantized_folder(folder: "str | Path") -> bool:
    return (Path(folder) / MANIFEST).is_file()


def load_quantized(folder: "str | Path", device: torch.device, dtype: torch.dtype | None = None,
                   read_bits: int | None = None, attn_implementation: str | None = None):
    """Rebuild the model ``save_quantized`` wrote: the architecture from config.json, QuantLinear
    layers where the manifest says, then every tensor from the safetensors file (all must be there)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder / MANIFEST} is missing or not JSON: {e}") from None
    if manifest.get("format") not in READS:
        raise ValueError(f"{folder / MANIFEST}: unsupported format {manifest.get('format')!r} (this memfit reads {READS})")
    if not (folder / WEIGHTS).is_file():
        raise ValueError(f"{folder / WEIGHTS} is missing")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    dtype = dtype or getattr(torch, manifest.get("dtype", "bfloat16"))
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kw)
    mods = dict(model.named_modules())
    for name, info in manifest["layers"].items():
        lin = mods.get(name)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"{folder}: quantized layer {name} is not a Linear layer of this architecture")
        _set_module(model, name, QuantLinear(lin.in_features, lin.out_features, info["bits"], info["group_size"],
                                             info["kind"], bias=lin.bias is not None, dtype=dtype,
                                             meta_bits=info.get("meta_bits", 0), qdec_k=info.get("qdec_k", 0),
                                             qdec_bits=info.get("qdec_bits", 8), rank=info.get("rank", 0)))
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{folder / WEIGHTS} is not a readable safetensors file: {e}") from None
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    tied = {n for n in missing if _is_tied(model, n)}
    if set(missing) - tied or unexpected:
        raise ValueError(f"{folder / WEIGHTS} does not match the architecture: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.to(device).eval()
    if read_bits is not None:
        set_read_bits(model, read_bits)
    return model, WeightQuant(**manifest["config"], scale_search=bool(manifest.get("scale_search")))


def _is_tied(model: nn.Module, name: str) -> bool:
    out = model.get_output_embeddings()
    return out is not None and name.startswith("lm_head") and out.weight is model.get_input_embeddings().weight
