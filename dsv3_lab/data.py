"""Deterministic toy corpora and a byte-level tokenizer (no downloads).

Tokenizer: `ByteTokenizer` maps text to its UTF-8 bytes, so vocab_size = 256 and every string
round-trips (`decode` replaces invalid byte sequences).

Corpus: `ToyCorpus(seed)` generates documents from five *domains*, each with its own vocabulary
and grammar, so that routed experts have something to specialise on and multi-token prediction
sees both predictable and free continuations:

    arithmetic  "17+25=42; 63-8=55; 7*9=63;"            the answer follows from the operands
    code        python-ish functions with indentation   rigid syntax, small identifier set
    names       stories that introduce random names     induction: a name must be copied later
                ("Ravomel kept a cat called Tuzin...")
    prose       template sentences, a large word list   the least predictable domain
    records     "id:0042|city:oslo|temp:+12;"           rigid fields, ids count upwards

Documents are joined by "\\n\\n" into one token stream per split. The split is stratified:
the last `val_fraction` of every domain's documents is validation, and no document text appears
in both splits. Everything is a pure function of `seed` (python's `random.Random`, torch's
`Generator`), so two corpora with the same seed are identical.

API
    ByteTokenizer().encode(text) -> list[int];  .decode(ids) -> str;  .vocab_size == 256
    DOMAINS                                     tuple of domain names
    sample_text(domain, seed=0) -> str          one document, for showing examples
    unigram_entropy(tokens) -> float            H = -sum_v p_v ln p_v in nats (a loss baseline)
    ToyCorpus(seed=0, n_docs=1500, val_fraction=0.1)
        .train_docs / .val_docs                 lists of (domain, text)
        .train_tokens / .val_tokens             1-D LongTensor of the whole split
        .tokens(split, domain=None)             the same, or only one domain's documents
        .domain_tokens(domain, split)           = .tokens(split, domain)
        .batch(split, batch_size, seq_len, generator=None, domain=None)
                                                -> LongTensor [batch_size, seq_len + 1]
        .batches(split, batch_size, seq_len, seed=0, domain=None)   infinite iterator
        .fixed_batches(split, n, batch_size, seq_len, seed=0, domain=None) -> list (evaluation)

A batch row is a random window of seq_len + 1 consecutive tokens: inputs are row[:-1], targets
row[1:].
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator

import torch

DOMAINS = ("arithmetic", "code", "names", "prose", "records")
SPLITS = ("train", "val")
SEPARATOR = "\n\n"


class ByteTokenizer:
    """Text <-> UTF-8 byte ids (0..255)."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode: expected str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < 256]
        if bad:
            raise ValueError(f"ByteTokenizer.decode: ids must be in 0..255, got {bad[:5]}")
        return bytes(ids).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- domain grammars
def _arithmetic(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(14, 24)):
        op = rng.choice("+-*")
        a = rng.randint(0, 99)
        b = rng.randint(0, 9) if op == "*" else rng.randint(0, 99)
        c = a + b if op == "+" else a - b if op == "-" else a * b
        parts.append(f"{a}{op}{b}={c};")
    return " ".join(parts)


_VERBS = ("load", "count", "merge", "scale", "find", "sum", "clip", "pack", "sort", "split")
_NOUNS = ("rows", "items", "keys", "values", "nodes", "edges", "tokens", "blocks")
_VARS = ("x", "y", "n", "k", "total", "acc", "value", "size")


def _code(rng: random.Random) -> str:
    funcs = []
    for _ in range(rng.randint(2, 3)):
        a, b, v = rng.sample(_VARS, 3)
        lines = [f"def {rng.choice(_VERBS)}_{rng.choice(_NOUNS)}({a}, {b}):",
                 f"    {v} = {a} {rng.choice('+-*')} {rng.randint(1, 9)}"]
        for _ in range(rng.randint(1, 3)):
            kind = rng.randrange(3)
            if kind == 0:
                lines += [f"    for i in range({b}):", f"        {v} = {v} {rng.choice('+-*')} i"]
            elif kind == 1:
                lines += [f"    if {v} > {rng.randint(10, 99)}:", f"        {v} = {v} // 2"]
            else:
                lines.append(f"    {v} = {v} {rng.choice('+-*')} {b}")
        lines.append(f"    return {v}")
        funcs.append("\n".join(lines))
    return "\n".join(funcs)


_SYLLABLES = ("ra", "vo", "mel", "tu", "zin", "ka", "lor", "pe", "shi", "dan", "qui", "bo", "nye",
              "fa", "gri", "os", "wen", "tha", "ix", "ul")
_PETS = ("cat", "dog", "goat", "crow", "horse", "fox")
_PLACES = ("a small village", "the old harbour", "a town by the lake", "the northern hills")
_THINGS = ("a lamp", "a map", "a key", "a drum", "a coin", "a letter")


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def _names(rng: random.Random) -> str:
    a, b, c = _name(rng), _name(rng), _name(rng)
    pet = rng.choice(_PETS)
    events = [
        f"Every morning {a} fed {b}.",
        f"One day {a} met {c} at the market.",
        f"{c} gave {a} {rng.choice(_THINGS)}.",
        f"{a} showed it to {b}, and {b} sniffed it.",
        f"{c} asked {a} where {b} was.",
        f"{b} ran away, and {a} and {c} looked for {b} everywhere.",
        f"At last {c} found {b} near the well.",
    ]
    k = rng.randint(4, len(events))
    story = [f"{a} lived in {rng.choice(_PLACES)} with a {pet} called {b}."] + events[:k]
    story.append(f"That night {a} told the story of {b} and {c} again.")
    return " ".join(story)


_DET = ("the", "a", "one", "every", "that")
_ADJ = ("quiet", "old", "bright", "cold", "green", "heavy", "small", "distant", "soft", "broken",
        "golden", "narrow", "pale", "wild", "warm", "hollow")
_NOUN = ("river", "mill", "bird", "stone", "garden", "window", "road", "forest", "bell", "cloud",
         "bridge", "field", "candle", "tower", "shadow", "meadow", "boat", "wall")
_VERB = ("runs", "waits", "sings", "falls", "turns", "rests", "shines", "drifts", "leans", "hums",
         "sleeps", "burns")
_PREP = ("past", "near", "under", "behind", "beyond", "over", "beside", "through")
_ADV = ("slowly", "again", "at dawn", "all night", "in silence", "for a while")


def _prose(rng: random.Random) -> str:
    def phrase() -> str:
        adj = f"{rng.choice(_ADJ)} " if rng.random() < 0.6 else ""
        return f"{rng.choice(_DET)} {adj}{rng.choice(_NOUN)}"

    sentences = []
    for _ in range(rng.randint(5, 9)):
        s = f"{phrase()} {rng.choice(_VERB)}"
        if rng.random() < 0.7:
            s += f" {rng.choice(_PREP)} {phrase()}"
        if rng.random() < 0.4:
            s += f" {rng.choice(_ADV)}"
        sentences.append(s + ".")
    return " ".join(sentences)


_CITIES = ("oslo", "lima", "pune", "kyiv", "rome", "baku", "oran", "nice", "graz", "hue")


def _records(rng: random.Random) -> str:
    start = rng.randint(0, 9000)
    rows = []
    for i in range(rng.randint(7, 12)):
        temp = rng.randint(-30, 35)
        rows.append(f"id:{start + i:04d}|city:{rng.choice(_CITIES)}|temp:{temp:+03d}|"
                    f"wind:{rng.randint(0, 40):02d};")
    return "\n".join(rows)


_GENERATORS = {"arithmetic": _arithmetic, "code": _code, "names": _names, "prose": _prose,
               "records": _records}


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")


def sample_text(domain: str, seed: int = 0) -> str:
    """One document of `domain`, a pure function of `seed` (for showing examples)."""
    _check_domain(domain)
    return _GENERATORS[domain](random.Random(seed))


def unigram_entropy(tokens: torch.Tensor, vocab_size: int = 256) -> float:
    """Entropy of the token frequencies in nats: the loss of the best context-free predictor."""
    counts = torch.bincount(tokens.flatten(), minlength=vocab_size).double()  # [V]
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _to_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()  # [T]


# ----------------------------------------------------------------------------- the corpus
class ToyCorpus:
    """A deterministic multi-domain corpus; see the module docstring for the API."""

    def __init__(self, seed: int = 0, n_docs: int = 1500, val_fraction: float = 0.1):
        _positive("n_docs", n_docs)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        per_domain = n_docs // len(DOMAINS)
        n_val = max(1, round(per_domain * val_fraction))
        if per_domain - n_val < 1:
            raise ValueError(f"n_docs={n_docs} is too small for val_fraction={val_fraction}: "
                             f"every domain needs a train and a val document "
                             f"(n_docs >= {2 * len(DOMAINS)})")
        self.seed, self.n_docs, self.val_fraction = seed, n_docs, val_fraction
        rng = random.Random(seed)
        seen: set[str] = set()
        self.train_docs: list[tuple[str, str]] = []
        self.val_docs: list[tuple[str, str]] = []
        for domain in DOMAINS:
            docs = []
            while len(docs) < per_domain:
                text = _GENERATORS[domain](rng)
                if text not in seen:  # no document may appear twice (or in both splits)
                    seen.add(text)
                    docs.append((domain, text))
            self.train_docs += docs[: per_domain - n_val]
            self.val_docs += docs[per_domain - n_val:]
        rng.shuffle(self.train_docs)
        rng.shuffle(self.val_docs)
        self._tokens: dict[tuple[str, str | None], torch.Tensor] = {}
        self.train_tokens = self.tokens("train")
        self.val_tokens = self.tokens("val")

    def __repr__(self) -> str:
        return (f"ToyCorpus(seed={self.seed}, docs={len(self.train_docs)}+{len(self.val_docs)}, "
                f"tokens={self.train_tokens.numel()}+{self.val_tokens.numel()})")

    def documents(self, split: str, domain: str | None = None) -> list[tuple[str, str]]:
        """The (domain, text) documents of `split`, optionally only those of `domain`."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if domain is not None:
            _check_domain(domain)
        docs = self.train_docs if split == "train" else self.val_docs
        return [d for d in docs if domain is None or d[0] == domain]

    def tokens(self, split: str, domain: str | None = None) -> torch.Tensor:
        """1-D LongTensor of the split's documents (of one domain if given), "\\n\\n"-joined."""
        key = (split, domain)
        if key not in self._tokens:
            docs = self.documents(split, domain)
            self._tokens[key] = _to_tensor(SEPARATOR.join(text for _, text in docs))
        return self._tokens[key]

    def domain_tokens(self, domain: str, split: str) -> torch.Tensor:
        """Tokens of one domain in one split (for per-domain evaluation)."""
        _check_domain(domain)
        return self.tokens(split, domain)

    def batch(self, split: str, batch_size: int, seq_len: int,
              generator: torch.Generator | None = None, domain: str | None = None) -> torch.Tensor:
        """Random windows of seq_len + 1 tokens: LongTensor [batch_size, seq_len + 1]."""
        _positive("batch_size", batch_size)
        _positive("seq_len", seq_len)
        data = self.tokens(split, domain)  # [T]
        n_starts = data.numel() - seq_len  # windows [s, s + seq_len] must fit
        if n_starts < 1:
            where = split if domain is None else f"{split}/{domain}"
            raise ValueError(f"seq_len={seq_len} is too long for the {where} split "
                             f"({data.numel()} tokens; need seq_len + 1 <= {data.numel()})")
        starts = torch.randint(0, n_starts, (batch_size,), generator=generator)  # [B]
        return data[starts[:, None] + torch.arange(seq_len + 1)]  # [B, seq_len + 1]

    def batches(self, split: str, batch_size: int, seq_len: int, seed: int = 0,
                domain: str | None = None) -> Iterator[torch.Tensor]:
        """An infinite, deterministic iterator of `batch(...)` draws (one generator per call)."""
        self.batch(split, 1, seq_len, torch.Generator().manual_seed(0), domain)  # fail early
        _positive("batch_size", batch_size)
        generator = torch.Generator().manual_seed(seed)

        def draw() -> Iterator[torch.Tensor]:
            while True:
                yield self.batch(split, batch_size, seq_len, generator, domain)

        return draw()

    def fixed_batches(self, split: str, n: int, batch_size: int, seq_len: int, seed: int = 0,
                      domain: str | None = None) -> list[torch.Tensor]:
        """The first `n` batches of `batches(..., seed)`: a fixed evaluation set."""
        _positive("n", n)
        return list(itertools.islice(self.batches(split, batch_size, seq_len, seed, domain), n))


def bits_per_byte(loss_nats: float) -> float:
    """Convert a per-byte cross-entropy in nats to bits per byte."""
    return loss_nats / math.log(2)
