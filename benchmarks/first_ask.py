"""Time to the first answers in a fresh process: load, prefill a ~6.5K-token document under a
policy, then three questions (8 tokens each). What compiles or builds on first use shows as a first
answer slower than the third. Run it twice: with an empty TRITON_CACHE_DIR (a new machine), then
again (Triton's cache warm).

    python benchmarks/first_ask.py "kvzip(keep=0.42)+kivi(bits=4,residual=32)"
"""

from __future__ import annotations

import sys
import time

t0 = time.perf_counter()
import torch  # noqa: E402

import memfit  # noqa: E402
from memfit.eval.demo import demo_document  # noqa: E402


def main(policy: str) -> None:
    lm = memfit.load_model("smollm2")
    t1 = time.perf_counter()
    ctx = lm.prefill(demo_document(440, 0)[0], policy=policy)
    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)
    sync()
    t2 = time.perf_counter()
    asks = []
    for q in ["What is the vault code?", "Who is the mayor?", "What colour is the door?"]:
        s = time.perf_counter()
        lm.ask(ctx, q, max_new_tokens=8)
        sync()
        asks.append(round(time.perf_counter() - s, 3))
    print(f"{policy}: tokens {ctx.num_tokens} load {t1 - t0:.1f}s prefill {t2 - t1:.2f}s asks {asks}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "kvzip(keep=0.42)+kivi(bits=4,residual=32)")
