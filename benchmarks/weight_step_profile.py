"""Where a compiled decode step's time goes: CUDA kernel time per layer, by kernel, on a random-weight
Llama-3.1-8B shape cut to a few layers (GPU). The step is torch.compile'd and run without a CUDA graph
under torch.profiler (a kernel's own time is the same in a graph); the output layer runs once a step, so
its row reads ``1 / layers`` a layer.

    PYTHONPATH=src python benchmarks/weight_step_profile.py --bits 4     # 16: bf16 weights
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import StaticCache

from memfit.bench import _random_llama8b, kernel_times
from memfit.hfcompat import with_cache
from memfit.kv.static import allow_recompiles
from memfit.weights import WeightQuant, quantize_
from memfit.weights.fuse import fuse_projections


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, default=4, help="weight width; 16 keeps bf16 weights")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--no-fuse", action="store_true", help="leave q/k/v and gate/up apart")
    ap.add_argument("--top", type=int, default=18)
    args = ap.parse_args()
    model = _random_llama8b(args.layers, "sdpa")
    if args.bits < 16:
        quantize_(model, WeightQuant(bits=args.bits, group_size=64, method="rtn"), progress=False)
        if not args.no_fuse:
            fuse_projections(model)
    n = args.prompt
    cache = StaticCache(config=model.config, max_cache_len=n + 16)
    ids = torch.randint(0, model.config.vocab_size, (1, n), device="cuda")
    with torch.no_grad():
        model(ids, **with_cache(model, cache), use_cache=True, logits_to_keep=1,
              cache_position=torch.arange(n, device="cuda"))
        tok, pos, kw = ids[:, -1:].clone(), torch.tensor([n], device="cuda"), with_cache(model, cache)
        lengths = [la.cumulative_length for la in getattr(cache, "layers", [])
                   if torch.is_tensor(getattr(la, "cumulative_length", None))]

        def step():
            for t in lengths:  # rewind: every step writes slot n
                t.fill_(n)
            return model(tok, cache_position=pos, use_cache=True, **kw).logits

        step()  # eager first: quantized layers build their kernel's copy of the codes
        allow_recompiles(4 * args.layers)
        compiled = torch.compile(step, dynamic=False)
        for _ in range(5):
            compiled()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                compiled()
            torch.cuda.synchronize()
    rows = kernel_times(prof)
    per = 10 * args.layers
    print(f"{args.bits}-bit: kernel time {sum(t for _, _, t in rows) / per:.1f} us a layer")
    for name, count, t in rows[: args.top]:
        print(f"{t / per:8.2f} us a layer  x{count / per:.2f}  {name}")


if __name__ == "__main__":
    main()
