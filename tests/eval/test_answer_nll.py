import pytest
import torch

from memfit.eval.answer_nll import answer_logprobs, answer_nll
from memfit.eval.runner import make_samples


def test_answer_log_loss_is_paired_against_none(tiny_lm):
    samples = make_samples(tiny_lm, ["niah_multiquery"], [300], 2, 0)
    res = answer_nll(tiny_lm, samples, ["kivi(bits=8,group=16,residual=16)", "kivi(bits=2,group=16,residual=16)"],
                     progress=False)
    assert list(res) == ["none", "kivi(bits=8,group=16,residual=16)", "kivi(bits=2,group=16,residual=16)"]
    n = sum(len(s.questions) for s in samples)
    none, q8, q2 = res.values()
    assert none["dnll"] == 0 and none["kl"] == pytest.approx(0, abs=1e-9) and none["questions"] == n
    assert q2["compression"] > q8["compression"] > 1
    assert -1e-6 <= q8["kl"] < q2["kl"]  # 8 bits stay closer to the 16-bit cache's distributions than 2 bits
    assert abs(q8["dnll"]) < abs(q2["dnll"]) + 1e-6 and set(q2["per_task"]) == {"niah_multiquery"}
    # the answer's positions: as many as its tokens, log-probabilities that normalize
    ctx = tiny_lm.prefill(samples[0].context, "none")
    q = samples[0].questions[0]
    lp, ids = answer_logprobs(tiny_lm, ctx, q.text, q.answer_prefix, list(q.answers))
    assert lp.shape == (len(ids), tiny_lm.model.config.vocab_size)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(len(ids), dtype=lp.dtype))
