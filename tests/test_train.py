"""Tests of dsv3_lab.train on a tiny stand-in language model (embedding + linear)."""

import math

import pytest
import torch
from torch import nn

from dsv3_lab.data import ToyCorpus
from dsv3_lab.train import evaluate, lr_at, next_token_loss, train


class Bigram(nn.Module):
    """forward(tokens [B, S]) -> logits [B, S, 256]."""

    def __init__(self, dim=16):
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256)

    def forward(self, tokens):
        return self.head(self.norm(self.embed(tokens)))  # [B, S, 256]


@pytest.fixture(scope="module")
def corpus():
    return ToyCorpus(seed=0, n_docs=200)


def make_model(seed=0):
    torch.manual_seed(seed)
    return Bigram()


def test_loss_decreases_and_result_fields(corpus):
    model = make_model()
    val = corpus.fixed_batches("val", 4, 8, 32, seed=1)
    before = evaluate(model, val)
    assert before == pytest.approx(math.log(256), abs=0.5)
    result = train(model, corpus.batches("train", 8, 32), steps=60, lr=1e-2, warmup=5,
                   progress=False)
    assert len(result.losses) == len(result.lrs) == 60
    assert result.metrics.keys() == {"grad_norm"} and len(result.metrics["grad_norm"]) == 60
    assert result.seconds > 0 and result.tokens_per_s > 0 and result.steps_per_s > 0
    assert result.tokens_per_s == pytest.approx(result.steps_per_s * 8 * 32)
    assert result.lrs[0] == pytest.approx(1e-2 / 5) and max(result.lrs) == pytest.approx(1e-2)
    after = evaluate(model, val)
    assert after < before - 1.5
    assert sum(result.losses[-10:]) / 10 < result.losses[0] - 1.5
    assert model.training  # evaluate restores the mode


def test_deterministic(corpus):
    runs = [train(make_model(), corpus.batches("train", 4, 16, seed=3), steps=15,
                  progress=False).losses for _ in range(2)]
    assert runs[0] == runs[1]
    other = train(make_model(), corpus.batches("train", 4, 16, seed=4), steps=15, progress=False)
    assert other.losses != runs[0]


def test_loss_fn_metrics_and_after_step(corpus):
    calls = []

    def loss_fn(model, batch):
        loss = next_token_loss(model, batch)
        return loss, {"double": 2 * loss.item()}

    def after_step(step, model, metrics):
        assert "double" in metrics and "grad_norm" in metrics
        calls.append(step)
        metrics["step"] = step
        if step >= 3:
            metrics["late"] = 1.0

    result = train(make_model(), corpus.batches("train", 4, 16), steps=6, loss_fn=loss_fn,
                   after_step=after_step, progress=False)
    assert calls == list(range(6))
    assert result.metrics["double"] == pytest.approx([2 * x for x in result.losses])
    assert result.metrics["step"] == [0, 1, 2, 3, 4, 5]
    late = result.metrics["late"]
    assert len(late) == 6 and all(math.isnan(x) for x in late[:3]) and late[3:] == [1.0] * 3


def test_after_step_sees_updated_parameters(corpus):
    model = make_model()
    seen = []
    train(model, corpus.batches("train", 4, 16), steps=2, progress=False,
          after_step=lambda step, m, _: seen.append(m.head.weight.detach().clone()))
    torch.manual_seed(0)
    assert not torch.equal(seen[0], make_model().head.weight)  # optimizer.step() already ran


def test_lr_schedule():
    lrs = [lr_at(t, 100, 1.0, 10) for t in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:-1], lrs[11:], strict=True))
    assert lr_at(0, 5, 1.0, 0) == pytest.approx(1.0)


def test_errors(corpus):
    model = make_model()
    with pytest.raises(ValueError, match="steps must be a positive int"):
        train(model, corpus.batches("train", 2, 8), steps=0, progress=False)
    with pytest.raises(TypeError, match="LongTensor"):
        train(model, iter([torch.zeros(2, 9)]), steps=1, progress=False)
    with pytest.raises(ValueError, match=r"\[B, S\+1\] with S\+1 >= 2"):
        train(model, iter([torch.zeros(2, 1, dtype=torch.long)]), steps=1, progress=False)
    with pytest.raises(ValueError, match=r"\[B, S\+1\]"):
        train(model, iter([torch.zeros(9, dtype=torch.long)]), steps=1, progress=False)
    with pytest.raises(ValueError, match="ran out after 1 of 3 steps"):
        train(model, corpus.fixed_batches("train", 1, 2, 8), steps=3, progress=False)
    with pytest.raises(TypeError, match="scalar tensor"):
        train(model, corpus.batches("train", 2, 8), steps=1, progress=False,
              loss_fn=lambda m, b: 1.0)
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, [])
    with pytest.raises(ValueError, match="logits"):
        next_token_loss(lambda t: t.float(), torch.zeros(2, 5, dtype=torch.long))


def test_trains_the_tiny_transformer(corpus):
    from dsv3_lab.config import ModelArgs
    from dsv3_lab.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelArgs.tiny())
    val = corpus.fixed_batches("val", 2, 8, 32, seed=1)
    before = evaluate(model, val)
    result = train(model, corpus.batches("train", 8, 32), steps=25, warmup=5, progress=False)
    assert result.losses[-1] < result.losses[0] - 1.0
    assert evaluate(model, val) < before - 1.0
