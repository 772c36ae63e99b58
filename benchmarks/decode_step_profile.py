"""Where memfit's compiled static decode step goes: CUDA kernel time a step, by kernel, after a
``batch`` x ``context`` prefill of a random-weight Llama-3.1-8B shape under any policy the static path
takes (GPU). The step runs as ``GraphDecoder(..., compile=True)`` does, but without the CUDA graph, under
torch.profiler (a kernel's own time is the same in a graph).

    PYTHONPATH=src python benchmarks/decode_step_profile.py -p "kivi(bits=4)"   # 8 x 32K, 32 layers
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import memfit.kv.attention  # noqa: F401  registers the memfit attention implementation
from memfit.bench import _evicted_batch, _random_llama8b, kernel_times
from memfit.hfcompat import with_cache
from memfit.kv.cache import CompressedCache
from memfit.kv.policy import parse_policy
from memfit.kv.static import GraphDecoder
from memfit.weights.fuse import fuse_projections


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-p", "--policy", default="kivi(bits=4)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--no-fuse", action="store_true", help="leave q/k/v and gate/up apart")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    model = _random_llama8b(args.layers)
    if not args.no_fuse:
        fuse_projections(model)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.context), device="cuda")
    if parse_policy(args.policy).evictions:  # each row prefilled, scored and compressed alone, as bench decode does
        cache = _evicted_batch(model, ids, args.policy, 2048)
    else:
        cache = CompressedCache.for_model(model, args.policy)
        with torch.no_grad():
            for s in range(0, args.context, 2048):
                model(ids[:, s : s + 2048], **with_cache(model, cache), use_cache=True, logits_to_keep=1)
    dec = GraphDecoder(model, cache.to_static(max_new_tokens=64), graph=False, compile=True)
    tok = ids[:, -1:].clone()
    for _ in range(4):  # compile, then run what was compiled
        tok = dec.step(tok).argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    steps = 4
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            tok = dec.step(tok).argmax(-1, keepdim=True)
        torch.cuda.synchronize()
    rows = kernel_times(prof)
    print(f"{args.policy}: kernel time {sum(t for _, _, t in rows) / steps / 1e3:.3f} ms a step")
    for name, count, t in rows[: args.top]:
        print(f"{t / steps / 1e3:8.3f} ms a step  x{count / steps:5.0f}  {name}")


if __name__ == "__main__":
    main()
