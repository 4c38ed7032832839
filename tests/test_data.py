"""Tests of dsv3_lab.data: byte tokenizer and the deterministic toy corpus."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3_lab.data import DOMAINS, ByteTokenizer, ToyCorpus, sample_text, unigram_entropy


@pytest.fixture(scope="module")
def corpus():
    return ToyCorpus(seed=0)


@settings(deadline=None, max_examples=25)
@given(st.text())
def test_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text


def test_tokenizer_errors():
    tok = ByteTokenizer()
    assert tok.vocab_size == 256
    with pytest.raises(ValueError, match="0..255"):
        tok.decode([65, 256])
    with pytest.raises(ValueError, match="0..255"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="expected str"):
        tok.encode(b"bytes")
    assert tok.decode([0xFF]) == "\ufffd"  # invalid UTF-8 is replaced, not raised


def test_corpus_deterministic_and_seed_dependent(corpus):
    again = ToyCorpus(seed=0)
    assert torch.equal(corpus.train_tokens, again.train_tokens)
    assert torch.equal(corpus.val_tokens, again.val_tokens)
    other = ToyCorpus(seed=1)
    n = min(corpus.train_tokens.numel(), other.train_tokens.numel())
    assert not torch.equal(corpus.train_tokens[:n], other.train_tokens[:n])
    assert sample_text("code", 3) == sample_text("code", 3)
    assert sample_text("code", 3) != sample_text("code", 4)


def test_corpus_content(corpus):
    tok = ByteTokenizer()
    assert 300_000 < corpus.train_tokens.numel() < 700_000
    assert corpus.train_tokens.dtype == torch.long and corpus.train_tokens.dim() == 1
    assert int(corpus.train_tokens.max()) < 128  # the grammars are ASCII
    docs = tok.decode(corpus.train_tokens).split("\n\n")
    assert docs == [text for _, text in corpus.train_docs]
    for domain in DOMAINS:
        n_train = len(corpus.documents("train", domain))
        n_val = len(corpus.documents("val", domain))
        assert n_train > 0 and n_val > 0
        assert abs(n_val / (n_train + n_val) - 0.1) < 0.02
        assert "\n\n" not in sample_text(domain, 0)
    assert "=" in sample_text("arithmetic") and "def " in sample_text("code")
    assert "id:" in sample_text("records") and "|city:" in sample_text("records")


def test_train_val_disjoint(corpus):
    train = {text for _, text in corpus.train_docs}
    val = {text for _, text in corpus.val_docs}
    assert len(train) == len(corpus.train_docs) and len(val) == len(corpus.val_docs)
    assert not train & val


def test_domain_tokens(corpus):
    tok = ByteTokenizer()
    total = 0
    for domain in DOMAINS:
        t = corpus.domain_tokens(domain, "val")
        assert t.dtype == torch.long
        text = tok.decode(t)
        assert text.split("\n\n") == [x for d, x in corpus.val_docs if d == domain]
        total += len(text.split("\n\n"))
    assert total == len(corpus.val_docs)
    arith = tok.decode(corpus.domain_tokens("arithmetic", "train"))
    assert "def " not in arith and "city:" not in arith


def test_batches_shapes_and_determinism(corpus):
    g = torch.Generator().manual_seed(0)
    b = corpus.batch("train", 4, 32, g)
    assert b.shape == (4, 33) and b.dtype == torch.long
    # every row is a contiguous window of the split
    data = corpus.train_tokens
    for row in b:
        starts = (data[:-32] == row[0]).nonzero().flatten()
        assert any(torch.equal(data[s:s + 33], row) for s in starts.tolist())
    it1 = corpus.batches("val", 3, 16, seed=5)
    it2 = corpus.batches("val", 3, 16, seed=5)
    for _ in range(3):
        assert torch.equal(next(it1), next(it2))
    fixed = corpus.fixed_batches("val", 3, 3, 16, seed=5)
    assert len(fixed) == 3
    again = corpus.fixed_batches("val", 3, 3, 16, 5)
    assert all(torch.equal(a, c) for a, c in zip(fixed, again, strict=True))
    assert not torch.equal(fixed[0], corpus.fixed_batches("val", 1, 3, 16, seed=6)[0])
    rec = corpus.batch("val", 2, 64, g, domain="records")
    assert "city:" in ByteTokenizer().decode(rec)


def test_errors(corpus):
    with pytest.raises(ValueError, match="unknown split 'test'"):
        corpus.batch("test", 2, 8)
    with pytest.raises(ValueError, match="unknown domain 'poetry'"):
        corpus.domain_tokens("poetry", "train")
    with pytest.raises(ValueError, match="unknown domain"):
        sample_text("poetry")
    n = corpus.val_tokens.numel()
    with pytest.raises(ValueError, match="too long for the val split"):
        corpus.batch("val", 2, n)
    corpus.batch("val", 1, n - 1)  # exactly the whole split fits
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        corpus.batch("train", 0, 8)
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        corpus.batches("train", 2, -1)
    with pytest.raises(ValueError, match="n must be a positive int"):
        corpus.fixed_batches("train", 0, 2, 8)
    with pytest.raises(ValueError, match="val_fraction"):
        ToyCorpus(val_fraction=1.0)
    with pytest.raises(ValueError, match="n_docs"):
        ToyCorpus(n_docs=5)


def test_unigram_entropy():
    assert unigram_entropy(torch.tensor([7, 7, 7])) == 0.0
    assert unigram_entropy(torch.arange(256)) == pytest.approx(torch.log(torch.tensor(256.)).item())
