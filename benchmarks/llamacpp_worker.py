"""Runs INSIDE the llama.cpp venv (llama-cpp-python built from source; no torch, no memfit).

Reads the samples that peer_llamacpp.py wrote (token ids made by memfit's own chat formatting, from
the same GGUF's tokenizer, so both sides see byte-identical prompts), evaluates each context once
into llama.cpp's KV cache of the asked type (f16, q8_0, q4_0; flash attention on, which llama.cpp
needs for a quantized V cache), answers every question greedily from that cache (the question's
tokens and the answer are removed after each, so every question sees the same context), and writes
records in memfit's eval schema.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import llama_cpp
from llama_cpp import Llama
from peer_common import score, textlines

# bytes a block of 32 elements takes in each KV-cache type llama.cpp offers (ggml's type sizes)
TYPES = {"f16": (llama_cpp.GGML_TYPE_F16, 64), "q8_0": (llama_cpp.GGML_TYPE_Q8_0, 34),
         "q4_0": (llama_cpp.GGML_TYPE_Q4_0, 18), "q4_1": (llama_cpp.GGML_TYPE_Q4_1, 20),
         "q5_0": (llama_cpp.GGML_TYPE_Q5_0, 22), "q5_1": (llama_cpp.GGML_TYPE_Q5_1, 24)}


def _answer(llm: Llama, context_len: int, question_ids: list[int], stop: set[int], max_new_tokens: int,
            lines: int) -> str:
    """Greedy reply to one question after the cached context, stopping like memfit's eval (the end
    of the first ``lines`` lines with text, an end-of-turn token or ``max_new_tokens``)."""
    llm.n_tokens = context_len  # eval() first drops every cached position from here on
    llm.eval(question_ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        tok = llm.sample(top_k=1, temp=0.0, repeat_penalty=1.0)
        if tok in stop:
            break
        out.append(tok)
        if textlines.lines_done(_text(llm, out), lines):
            break
        llm.eval([tok])
    return textlines.first_lines(_text(llm, out), lines)


def _text(llm: Llama, ids: list[int]) -> str:
    return llm.detokenize(ids).decode("utf-8", errors="ignore")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", required=True)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--types", default="f16,q8_0,q4_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    data = json.load(open(args.samples))
    samples = data["samples"]
    longest = max(len(s["context_ids"]) + max(len(q) for q in s["question_ids"]) for s in samples)
    n_ctx = longest + args.max_new_tokens + 8
    skipped = {}
    with open(args.out, "a") as out:
        for name in args.types.split(","):
            if name not in TYPES:
                skipped[name] = f"unknown KV type (known: {', '.join(TYPES)})"
                continue
            ggml_type, block_bytes = TYPES[name]
            label = f"llama.cpp:kv(type_k={name},type_v={name})"
            llm = Llama(model_path=args.gguf, n_ctx=n_ctx, n_batch=512, n_threads=args.threads,
                        n_threads_batch=args.threads, type_k=ggml_type, type_v=ggml_type, flash_attn=True,
                        seed=0, verbose=False)
            stop = set(data.get("stop_ids", [])) | {llm.token_eos()}
            # bytes a token holds in the cache: every layer's K and V rows, at the type's block size
            meta = llm.metadata
            arch = meta["general.architecture"]
            layers, kv_heads = int(meta[f"{arch}.block_count"]), int(meta[f"{arch}.attention.head_count_kv"])
            head_dim = int(meta.get(f"{arch}.attention.key_length")
                           or int(meta[f"{arch}.embedding_length"]) // int(meta[f"{arch}.attention.head_count"]))
            per_token = 2 * layers * kv_heads * head_dim * block_bytes // 32
            full_per_token = 2 * layers * kv_heads * head_dim * 2  # 16-bit, memfit's `none`
            for i, s in enumerate(samples):
                llm.reset()
                t0 = time.perf_counter()
                llm.eval(s["context_ids"])
                prefill_s = time.perf_counter() - t0
                n = len(s["context_ids"])
                t1 = time.perf_counter()
                replies = [_answer(llm, n, q, stop, args.max_new_tokens, lines)
                           for q, lines in zip(s["question_ids"], s["lines"])]
                prefixes = s.get("answer_prefixes") or [""] * len(replies)
                scores = [score(a, p, r) for a, p, r in zip(s["answers"], prefixes, replies)]
                rec = {
                    "task": s["task"], "length": s["length"], "seed": s["seed"], "policy": label,
                    "family": "llama.cpp:kv", "source": "llama.cpp", "tokens": n, "baseline": name == "f16",
                    "correct": sum(scores) / len(scores), "scores": scores,
                    "nbytes": n * per_token, "full_nbytes": n * full_per_token, "bytes_per_token": per_token,
                    "compression": full_per_token / per_token, "prefill_s": prefill_s,
                    "answer_s": time.perf_counter() - t1, "replies": replies, "expected": s["answers"],
                    "model": data.get("model", "model"),
                }
                out.write(json.dumps(rec) + "\n")
                out.flush()
                print(f"{label} sample {i + 1}/{len(samples)}: {rec['correct']:.2f}", file=sys.stderr)
            del llm
    print(json.dumps({"skipped": skipped}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
