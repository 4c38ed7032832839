"""The assembled model: equal to transformers' DeepseekV3ForCausalLM in both directions,
state-dict round trip, cached decoding equals a full forward, generation, error cases."""

import dataclasses
import io
import os
import subprocess
import sys

import pytest
import torch

from dsv3_lab.config import ModelArgs
from dsv3_lab.hf import from_hf, to_hf
from dsv3_lab.model import Transformer, generate

CONFIGS = {
    "tiny": {},
    "no-query-compression": dict(q_lora_rank=0),
    "one-group": dict(n_expert_groups=1, n_limited_groups=1),
    "yarn-off": dict(max_seq_len=64),  # max_seq_len == original_seq_len
    "two-dense-more-groups": dict(n_layers=4, n_dense_layers=2, n_routed_experts=24,
                                  n_expert_groups=8, n_limited_groups=3, n_activated_experts=3,
                                  n_shared_experts=2),
}


def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    """A model with random weights and a random gate bias (some entries negative)."""
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norm weights: away from 1 so a missed norm shows
                p.uniform_(0.5, 1.5)
        for moe in model.moe_layers():
            moe.gate.bias.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("name", CONFIGS)
def test_equal_to_transformers_both_directions(name):
    args = ModelArgs.tiny(**CONFIGS[name])
    ours = random_model(args)
    hf = to_hf(ours)
    tokens = torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        assert (ours(tokens) - expected).abs().max() < 1e-5
        back = from_hf(hf, max_batch_size=2, max_seq_len=args.max_seq_len)
        expected_args = dataclasses.replace(args, max_batch_size=2)
        if not args.yarn_enabled:  # YaRN's fields are inactive then and not carried over
            expected_args = dataclasses.replace(expected_args, rope_factor=back.args.rope_factor)
        assert back.args == expected_args
        assert (back(tokens) - expected).abs().max() < 1e-5


def test_group_limit_binds_in_the_equivalence_test():
    """The equivalence test would be vacuous for group routing if the limit never changed a
    choice: check that it does on the same kind of inputs."""
    args = ModelArgs.tiny()
    model = random_model(args)
    unlimited = random_model(dataclasses.replace(args, n_limited_groups=args.n_expert_groups))
    gate, free_gate = model.moe_layers()[0].gate, unlimited.moe_layers()[0].gate
    free_gate.load_state_dict(gate.state_dict())
    x = torch.randn(200, args.dim)
    _, limited_idx = gate(x)
    _, free_idx = free_gate(x)
    changed = (limited_idx.sort(1).values != free_idx.sort(1).values).any(1)
    assert changed.float().mean() > 0.2


def test_decoding_with_transformers_cache_matches():
    args = ModelArgs.tiny()
    ours = random_model(args)
    hf = to_hf(ours)
    tokens = torch.randint(0, args.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = hf(tokens[:, :12], use_cache=True)
        cache, theirs = out.past_key_values, [out.logits]
        mine = [ours(tokens[:, :12], 0)]
        for t in range(12, 20):
            step = hf(tokens[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = step.past_key_values
            theirs.append(step.logits)
            mine.append(ours(tokens[:, t:t + 1], t))
    assert (torch.cat(mine, 1) - torch.cat(theirs, 1)).abs().max() < 1e-5


@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
def test_cached_decoding_equals_full_forward(attn_impl):
    args = ModelArgs.tiny()
    torch.manual_seed(0)
    model = Transformer(args, attn_impl=attn_impl).double().eval()
    tokens = torch.randint(0, args.vocab_size, (3, 30))
    with torch.no_grad():
        full = model(tokens)
        parts = [model(tokens[:, :10], 0), model(tokens[:, 10:17], 10)]  # prefill, then a chunk
        parts += [model(tokens[:, t:t + 1], t) for t in range(17, 30)]  # one token per step
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-10


def test_greedy_generation_equals_argmax_of_uncached_forward():
    args = ModelArgs.tiny()
    model = random_model(args)
    prompt = torch.randint(0, args.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))
    out = generate(model, prompt, max_new_tokens=12)
    assert out.shape == (2, 20) and torch.equal(out[:, :8], prompt)
    with torch.no_grad():
        for t in range(8, 20):  # no cache: full forward over everything so far
            assert torch.equal(model(out[:, :t])[:, -1].argmax(-1), out[:, t])


def test_sampled_generation_is_reproducible_with_a_generator():
    model = random_model(ModelArgs.tiny())
    prompt = torch.zeros(1, 4, dtype=torch.long)
    a = generate(model, prompt, 10, temperature=1.0, top_k=20,
                 generator=torch.Generator().manual_seed(5))
    b = generate(model, prompt, 10, temperature=1.0, top_k=20,
                 generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_state_dict_round_trip_has_no_caches():
    args = ModelArgs.tiny()
    model = random_model(args)
    sd = model.state_dict()
    assert not any("cache" in k for k in sd)
    assert any(k.endswith("ffn.gate.bias") for k in sd)  # the balancing bias is saved
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    clone = Transformer(args).eval()
    clone.load_state_dict(torch.load(buffer))
    tokens = torch.randint(0, args.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(clone(tokens), model(tokens))


def test_training_forward_has_gradients_everywhere():
    args = ModelArgs.tiny()
    model = Transformer(args)
    tokens = torch.randint(0, args.vocab_size, (4, 32))
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    # experts that received no token in this batch legitimately have no gradient
    assert all(".experts." in n for n in no_grad)
    assert all(m.gate.bias.grad is None for m in model.moe_layers())


TWO_THREAD_RUNS = """
import torch
from dsv3_lab.config import ModelArgs
from dsv3_lab.data import ToyCorpus
from dsv3_lab.model import Transformer
from dsv3_lab.train import train

torch.set_num_threads(2)
corpus = ToyCorpus(seed=0, n_docs=200)
for _ in range(2):
    torch.manual_seed(0)
    model = Transformer(ModelArgs.tiny())
    result = train(model, corpus.batches("train", 8, 32, seed=0), 6, progress=False)
    print(torch.get_num_threads(), [repr(x) for x in result.losses])
"""


def test_training_is_deterministic_with_two_threads():
    """Same seed, same batches -> the same loss history, bit for bit (MoE dispatch included).

    In a fresh process with OMP_WAIT_POLICY=PASSIVE: under pytest-xdist the other worker keeps
    the second core busy, and two spinning OpenMP threads then took a minute instead of 1 s.
    """
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    out = subprocess.run([sys.executable, "-c", TWO_THREAD_RUNS], env=env, capture_output=True,
                         text=True, timeout=240, check=True).stdout.splitlines()
    assert len(out) == 2 and all(line.startswith("2 ['") for line in out), out
    assert out[0] == out[1]


def test_errors():
    args = ModelArgs.tiny()
    model = Transformer(args)
    with pytest.raises(ValueError, match="past max_seq_len"):
        model(torch.zeros(1, 4, dtype=torch.long), start_pos=args.max_seq_len - 2)
    with pytest.raises(ValueError, match="larger than the cache"):
        model(torch.zeros(args.max_batch_size + 1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="LongTensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\)"):
        model(torch.full((1, 4), 256))
    with pytest.raises(ValueError, match="past max_seq_len"):
        generate(model, torch.zeros(1, 200, dtype=torch.long), 100)
    with pytest.raises(ValueError, match="sigmoid"):
        to_hf(Transformer(ModelArgs.tiny(score_func="softmax")))


def test_bad_input_is_refused_clearly():
    args = ModelArgs.tiny()
    model = Transformer(args)
    prompt = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="at least one sequence and one token"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one sequence and one token"):
        model(torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"prompt \[batch>=1, seq>=1\]"):
        generate(model, torch.zeros(0, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"prompt \[batch>=1, seq>=1\]"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 2)
    with pytest.raises(TypeError, match="LongTensor of token ids"):
        generate(model, prompt.float(), 2)
    for bad in (2.0, "3", None):
        with pytest.raises(TypeError, match="max_new_tokens must be an int"):
            generate(model, prompt, bad)
    with pytest.raises(TypeError, match="temperature must be a number"):
        generate(model, prompt, 2, temperature="0.7")
    for bad in (0, -1, args.vocab_size + 1, 2.5):
        with pytest.raises(ValueError, match=r"top_k must be None or an int in \[1, vocab"):
            generate(model, prompt, 2, temperature=1.0, top_k=bad)
    out = generate(model, prompt, 2, temperature=1.0, top_k=args.vocab_size,
                   generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 5)
    with pytest.raises(ValueError, match="never written"):  # decode step past the prefill
        model(torch.zeros(1, 1, dtype=torch.long), start_pos=10)
    with pytest.raises(TypeError, match="Transformer: expected a dsv3_lab.config.ModelArgs"):
        Transformer(args.to_dict())


def test_fp8_checkpoint_without_a_scale_is_refused():
    from dsv3_lab.fp8 import from_fp8_checkpoint, to_fp8_checkpoint

    model = Transformer(ModelArgs.tiny())
    state = to_fp8_checkpoint(model)
    name = "layers.0.attn.wkv_a.weight_scale_inv"
    assert name in state
    restored = from_fp8_checkpoint(state)
    model.load_state_dict(restored)  # the complete checkpoint loads
    del state[name]
    with pytest.raises(ValueError, match=r"wkv_a.weight is torch.float8_e4m3fn but the "
                                         r"checkpoint has no layers.0.attn.wkv_a.weight_scale_inv"):
        from_fp8_checkpoint(state)
    orphan = {"x.weight_scale_inv": torch.ones(1, 1)}
    with pytest.raises(ValueError, match="x.weight_scale_inv has no weight x.weight"):
        from_fp8_checkpoint(orphan)
