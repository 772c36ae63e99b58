"""Runs INSIDE the kvpress venv (kvpress pins transformers<5.3, so it cannot share memfit's).

Reads the samples that peer_kvpress.py wrote (token ids made by memfit's own chat formatting, so
both sides see byte-identical prompts), compresses each context with a kvpress press during
prefill (the question is outside the compressed part: query-agnostic), answers every question
greedily from the same compressed cache, and writes records in memfit's eval schema.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedTokenizerFast, pipeline

from peer_common import score, textlines

import kvpress  # noqa: F401  registers the "kv-press-text-generation" pipeline
from kvpress import (
    ExpectedAttentionPress,
    KnormPress,
    KVzipPress,
    PyramidKVPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)

PRESSES = {
    "streaming_llm": StreamingLLMPress,
    "snapkv": SnapKVPress,
    "expected_attention": ExpectedAttentionPress,
    "knorm": KnormPress,
    "tova": TOVAPress,
    "pyramidkv": PyramidKVPress,
    "kvzip": KVzipPress,
}


@torch.no_grad()
def _answer(model, tok, question_ids, cache, context_length: int, max_new_tokens: int, lines: int) -> str:
    """kvpress's greedy `generate_answer`, stopping like memfit's eval (end of the first line)."""
    pos = torch.arange(context_length, context_length + question_ids.shape[1]).unsqueeze(0)
    logits = model(input_ids=question_ids, past_key_values=cache, position_ids=pos, logits_to_keep=1).logits
    stop = model.generation_config.eos_token_id
    stop = set(stop if isinstance(stop, list) else [stop]) | {tok.convert_tokens_to_ids("<|im_end|>")}
    out = []
    for i in range(max_new_tokens):
        new = int(logits[0, -1].argmax())
        if new in stop:
            break
        out.append(new)
        if textlines.lines_done(tok.decode(out), lines):
            break
        logits = model(input_ids=torch.tensor([[new]]), past_key_values=cache,
                       position_ids=pos[:, -1:] + 1 + i).logits
    return tok.decode(out, skip_special_tokens=True)


def _held_bytes(cache: DynamicCache) -> tuple[int, int]:
    """(bytes of the K/V tensors held, tokens per head held in layer 0)."""
    total = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return total, cache.layers[0].keys.shape[-2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--presses", default=",".join(PRESSES))
    ap.add_argument("--ratios", default="0.75,0.875")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    data = json.load(open(args.samples))
    kw = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    tok = AutoTokenizer.from_pretrained(args.model_dir, **kw)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16, **kw).eval()
    if args.gguf_file:  # KVzipPress reloads the tokenizer from name_or_path, which cannot name a GGUF file
        tok_dir = tempfile.mkdtemp(prefix="kvpress-tok-")
        fast = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, chat_template=tok.chat_template,
                                       eos_token=tok.eos_token, bos_token=tok.bos_token, pad_token=tok.pad_token)
        fast.save_pretrained(tok_dir)  # the same backend, so the same token ids as `tok`
        model.config.name_or_path = tok_dir
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")  # for its cache helper
    full_per_token = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * \
        (getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads) * 2

    ratios = [float(r) for r in args.ratios.split(",")]
    skipped = {}
    with open(args.out, "a") as out:
        for name in args.presses.split(","):
            for ratio in ratios:
                label = f"kvpress:{name}(ratio={ratio})"
                try:
                    press = PRESSES[name](compression_ratio=ratio)
                except Exception as e:  # noqa: BLE001
                    skipped[label] = f"cannot build: {e}"
                    continue
                for i, s in enumerate(data["samples"]):
                    context_ids = torch.tensor([s["context_ids"]])
                    questions = [torch.tensor([q]) for q in s["question_ids"]]
                    t0 = time.perf_counter()
                    cache = DynamicCache()
                    try:
                        # kvpress's own prefill + greedy decoding; the answer is dropped from the
                        # cache after each question, so every question sees the same compressed context
                        with press(model):
                            model.model(input_ids=context_ids, past_key_values=cache)
                        nbytes, kept = _held_bytes(cache)
                        prefill_s = time.perf_counter() - t0
                        t1 = time.perf_counter()
                        replies = []
                        for q, n_lines in zip(questions, s["lines"]):
                            lengths = [cache.get_seq_length(li) for li in range(len(cache))]
                            replies.append(_answer(model, tok, q, cache, context_ids.shape[1], args.max_new_tokens, n_lines))
                            pipe._remove_answer_from_cache(cache, lengths)
                    except Exception as e:  # noqa: BLE001
                        skipped[label] = f"{type(e).__name__}: {e}"
                        traceback.print_exc(file=sys.stderr)
                        break
                    replies = [textlines.first_lines(r, n) for r, n in zip(replies, s["lines"])]  # as memfit's ask
                    prefixes = s.get("answer_prefixes") or [""] * len(replies)
                    scores = [score(a, p, r) for a, p, r in zip(s["answers"], prefixes, replies)]
                    n = context_ids.shape[1]
                    rec = {
                        "task": s["task"], "length": s["length"], "seed": s["seed"], "policy": label,
                        "family": f"kvpress:{name}", "source": "kvpress", "tokens": n,
                        "correct": sum(scores) / len(scores), "scores": scores,
                        "nbytes": nbytes, "full_nbytes": n * full_per_token, "bytes_per_token": nbytes / n,
                        "compression": n * full_per_token / max(1, nbytes), "kept_tokens": kept,
                        "prefill_s": prefill_s, "answer_s": time.perf_counter() - t1,
                        "replies": replies, "expected": s["answers"], "model": data.get("model", "model"),
                    }
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
                    print(f"{label} sample {i + 1}/{len(data['samples'])}: {rec['correct']:.2f}", file=sys.stderr)
    print(json.dumps({"skipped": skipped}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
