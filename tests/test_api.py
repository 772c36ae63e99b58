import dataclasses

import pytest
import torch

import memfit
from memfit.api import LM

CONTEXT = "The vault code is 4821. The lighthouse is red. " * 6


def _generate_reference(lm: LM, question: str, max_new_tokens: int, answer_prefix: str = "") -> str:
    msgs = [{"role": "user", "content": CONTEXT + "\n\n" + question}]
    prompt = lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) + answer_prefix
    ids = lm.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = lm.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(lm.stop_ids),
                            pad_token_id=lm.tokenizer.pad_token_id)
    return answer_prefix + lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_none_policy_answers_like_generate_on_the_whole_prompt(tiny_lm):
    ctx = tiny_lm.prefill(CONTEXT, "none")
    for q in ["What is the code?", "Which colour is the lighthouse?"]:
        assert tiny_lm.ask(ctx, q, max_new_tokens=12) == _generate_reference(tiny_lm, q, 12)
    assert tiny_lm.ask(ctx, "Code?", max_new_tokens=6, answer_prefix="The code is") == \
        _generate_reference(tiny_lm, "Code?", 6, "The code is")


def test_follow_up_questions_answer_like_generate_on_the_whole_conversation(tiny_lm):
    ctx = tiny_lm.prefill(CONTEXT, "none")
    q1, q2 = "What is the code?", "And the lighthouse?"
    a1 = tiny_lm.ask(ctx, q1, max_new_tokens=8)
    msgs = [{"role": "user", "content": CONTEXT + "\n\n" + q1}, {"role": "assistant", "content": a1},
            {"role": "user", "content": q2}]
    prompt = tiny_lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) + "It is"
    ids = tiny_lm.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = tiny_lm.model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=list(tiny_lm.stop_ids),
                                 pad_token_id=tiny_lm.tokenizer.pad_token_id)
    ref = "It is" + tiny_lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert tiny_lm.ask(ctx, q2, max_new_tokens=8, answer_prefix="It is", history=[(q1, a1)]) == ref
    assert tiny_lm.ask(ctx, q1, max_new_tokens=8) == a1  # the conversation left the context as it was


@pytest.mark.parametrize("policy", ["none", "kivi(bits=4,group=16,residual=16)", "snapkv(keep=0.5,window=8)+kivi(bits=2,group=16,residual=16)"])
def test_batched_questions_equal_one_by_one_and_leave_ctx_unchanged(tiny_lm, policy):
    ctx = tiny_lm.prefill(CONTEXT, policy)
    before = {k: v.clone() for layer in ctx.cache.layers for k, v in layer.tensors().items()}
    nbytes, n = ctx.nbytes, ctx.num_tokens
    qs = ["Code?", "What colour is the lighthouse, please?", "Say something long about the vault."]
    batch = tiny_lm.ask(ctx, qs, max_new_tokens=10)
    single = [tiny_lm.ask(ctx, q, max_new_tokens=10) for q in qs]
    assert batch == single
    assert ctx.nbytes == nbytes and ctx.num_tokens == n
    after = {k: v for layer in ctx.cache.layers for k, v in layer.tensors().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("policy", ["none", "kivi(bits=4,group=16,residual=16)"])
def test_a_whole_prompt_answers_from_its_prefill_logits(tiny_lm, tmp_path, policy):
    """A prompt prefilled whole (as a server takes a plain prompt) answers from the logits its
    prefill computed, as generate on the prompt does; a context read back holds none."""
    msgs = [{"role": "user", "content": CONTEXT + "\n\nWhat is the code?"}]
    ids = tiny_lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"]
    ctx = tiny_lm.prefill_ids(ids, policy)
    assert ctx.logits.shape == (1, tiny_lm.model.config.vocab_size) and ctx.logits.dtype == torch.float32
    head = tiny_lm.prefill_ids(ids[:, :-1], policy)
    assert tiny_lm.generate(ctx, [[]], 10) == tiny_lm.generate(head, [ids[0, -1:].tolist()], 10)
    if policy == "none":
        out = tiny_lm.model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=list(tiny_lm.stop_ids),
                                     pad_token_id=tiny_lm.tokenizer.pad_token_id)
        assert tiny_lm.generate(ctx, [[]], 10)[0] == tiny_lm.tokenizer.decode(out[0, ids.shape[1]:],
                                                                               skip_special_tokens=True)
    assert tiny_lm.generate(ctx, [[], []], 10) == tiny_lm.generate(ctx, [[]], 10) * 2
    with pytest.raises(ValueError, match="at least one token"):
        tiny_lm.generate(ctx, [[], [5]], 4)
    back = memfit.load_context(ctx.save(tmp_path / "c.memfit"), tiny_lm)  # the logits are kept with the KV
    assert torch.equal(back.logits, ctx.logits) and tiny_lm.generate(back, [[]], 10) == tiny_lm.generate(ctx, [[]], 10)
    with pytest.raises(ValueError, match="does not hold"):
        tiny_lm.generate(dataclasses.replace(back, logits=None), [[]], 4)


def test_context_figures(tiny_lm):
    ctx = tiny_lm.prefill(CONTEXT * 3, "kivi(bits=2,group=16,residual=16)")
    n = ctx.num_tokens
    assert ctx.full_nbytes == n * tiny_lm.kv_bytes_per_token
    assert ctx.compression == ctx.full_nbytes / ctx.nbytes > 1
    assert "tokens=" in repr(ctx)


def test_prefill_in_chunks_equals_one_pass(tiny_lm):
    a = tiny_lm.prefill(CONTEXT, "none")
    b = tiny_lm.prefill(CONTEXT, "none", chunk_size=37)
    for la, lb in zip(a.cache.layers, b.cache.layers):
        torch.testing.assert_close(la.keys, lb.keys)


def test_sampling_is_seeded(tiny_lm):
    ctx = tiny_lm.prefill(CONTEXT, "none")
    a = tiny_lm.ask(ctx, "Code?", max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    b = tiny_lm.ask(ctx, "Code?", max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    assert a == b


def test_stop_strings_cut_the_answer(tiny_lm):
    ctx = tiny_lm.prefill(CONTEXT, "none")
    full = tiny_lm.ask(ctx, "Code?", max_new_tokens=12)
    assert len(full) > 3
    stop = full[2:4]
    cut = tiny_lm.ask(ctx, "Code?", max_new_tokens=12, stop=[stop])
    assert cut == full[: full.index(stop)]


def test_bad_input_is_named(tiny_lm):
    ctx = tiny_lm.prefill(CONTEXT, "none")
    with pytest.raises(TypeError, match="question"):
        tiny_lm.ask(ctx, [])
    with pytest.raises(TypeError, match="context"):
        tiny_lm.prefill(b"bytes", "none")
    with pytest.raises(memfit.PolicyError, match="unknown method"):
        tiny_lm.prefill(CONTEXT, "h2x(keep=0.5)")
    with pytest.raises(ValueError, match="max_new_tokens"):
        tiny_lm.ask(ctx, "q", max_new_tokens=-1)


def test_warmup_runs_the_policy_once_and_leaves_the_model_as_it_was(tiny_lm):
    ctx = tiny_lm.prefill("The vault code is 4821. " * 8, policy="none")
    before = tiny_lm.ask(ctx, "Code?", max_new_tokens=4)
    assert tiny_lm.warmup("kvzip(keep=0.5)+kivi(bits=4,group=16,residual=16)", tokens=64) > 0
    assert tiny_lm.ask(ctx, "Code?", max_new_tokens=4) == before
