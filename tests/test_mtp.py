"""Tests of dsv3_lab.mtp: sharing, shifts, the D = 0 limit, speculative decoding = greedy."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3_lab.config import ModelArgs, param_counts
from dsv3_lab.model import Transformer, generate
from dsv3_lab.mtp import MTP, MTPModule, mtp_loss, speculative_generate
from dsv3_lab.train import next_token_loss


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from more threads, and a busy machine makes them spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(depth=1, seed=0, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    args = ModelArgs.tiny(max_seq_len=64, max_batch_size=4, **overrides)
    model = Transformer(args)
    mtp = MTP(model, depth)  # built before the cast: sharing must survive .to(dtype)
    mtp.to(dtype)
    return model, mtp


def test_embedding_and_head_are_shared_not_copied():
    model, mtp = make(depth=2)
    for module in mtp.layers:
        assert module.embed is model.embed and module.head is model.head
        assert module.embed.weight is model.embed.weight
        assert module.head.weight is model.head.weight
        assert module.embed.weight.dtype == torch.float64
    keys = list(mtp.state_dict())
    assert sum(k.endswith("embed.weight") for k in keys) == 1  # only main.embed.weight
    assert sum(k.endswith("head.weight") for k in keys) == 1
    own = sum(p.numel() for p in mtp.parameters()) - sum(p.numel() for p in model.parameters())
    assert own == sum(p.numel() for p in mtp.layers.parameters())
    # the MTP blocks are MoE layers numbered after the main model's (released: layer 61)
    assert [m.block.layer_id for m in mtp.layers] == [3, 4]
    assert type(mtp.layers[0].block.ffn).__name__ == "MoE"
    gate_bias = mtp.layers[0].block.ffn.gate.bias.numel()  # counted by param_counts too
    assert own == 2 * (param_counts(model.args)["mtp"] - gate_bias)
    # a gradient of an MTP loss reaches the shared embedding and head
    mtp_loss(mtp, torch.randint(0, 256, (2, 9)))[0].backward()
    assert model.embed.weight.grad is not None and model.head.weight.grad is not None


def test_module_concatenates_embedding_then_hidden():
    model, mtp = make(depth=1)
    module: MTPModule = mtp.layers[0]
    h = torch.randn(1, 5, model.args.dim, dtype=torch.float64)
    t = torch.randint(0, 256, (1, 5))
    with torch.no_grad():  # zero the hidden half of eh_proj: only the embedding may matter
        module.eh_proj.weight[:, model.args.dim:] = 0
    out1 = module(h, t)[1]
    out2 = module(torch.randn_like(h), t)[1]
    torch.testing.assert_close(out1, out2)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_depth_k_at_position_i_predicts_token_i_plus_k_plus_1(depth):
    model, mtp = make(depth=depth, seed=1)
    S = 12
    batch = torch.randint(0, 256, (2, S + 1))
    hidden = model.hidden(batch[:, :-1])
    logits = mtp(batch, hidden)
    assert [tuple(x.shape) for x in logits] == [(2, S - k, 256) for k in range(1, depth + 1)]
    # the loss is the explicit chain with shifts: depth k embeds t_{i+k}, targets t_{i+k+1}
    h = hidden
    expected = F.cross_entropy(model.head(hidden).flatten(0, 1), batch[:, 1:].flatten())
    for k, module in enumerate(mtp.layers, start=1):
        h, lk = module(h[:, : S - k], batch[:, k:S])
        ce = F.cross_entropy(lk.flatten(0, 1), batch[:, k + 1:].flatten())
        expected = expected + 0.3 / depth * ce
    torch.testing.assert_close(mtp_loss(mtp, batch, lam=0.3)[0], expected)
    # causality: depth k's row i sees t_0..t_{i+k}; changing t_{i+k+1} (its target) does not
    # change it, changing t_{i+k} does
    i, k = 3, depth
    changed = batch.clone()
    changed[:, i + k + 1] = (changed[:, i + k + 1] + 1) % 256
    again = mtp(changed, model.hidden(changed[:, :-1]))[k - 1]
    torch.testing.assert_close(again[:, i], logits[k - 1][:, i])
    changed = batch.clone()
    changed[:, i + k] = (changed[:, i + k] + 1) % 256
    again = mtp(changed, model.hidden(changed[:, :-1]))[k - 1]
    assert not torch.allclose(again[:, i], logits[k - 1][:, i])


def test_depth_zero_is_plain_next_token_training():
    model, mtp = make(depth=0, dtype=torch.float32)
    batch = torch.randint(0, 256, (3, 17))
    loss, metrics = mtp_loss(mtp, batch, lam=0.3)
    assert torch.equal(loss, next_token_loss(model, batch))
    assert list(metrics) == ["main_loss"] and mtp(batch, model.hidden(batch[:, :-1])) == []


def test_dropping_mtp_leaves_main_logits_unchanged():
    model, mtp = make(depth=2)
    tokens = torch.randint(0, 256, (2, 10))
    before = model(tokens)
    mtp(tokens, model.hidden(tokens))  # running the modules touches only their own caches
    torch.testing.assert_close(model(tokens), before, rtol=0, atol=0)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), depth=st.integers(0, 3), prompt_len=st.integers(1, 12),
       new=st.integers(0, 24), vocab=st.sampled_from([2, 3, 256]))
def test_speculative_equals_greedy(seed, depth, prompt_len, new, vocab):
    model, mtp = make(depth=depth, seed=seed, vocab_size=vocab)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    tokens, stats = speculative_generate(model, mtp, prompt, new)
    assert torch.equal(tokens, generate(model, prompt, new))
    assert stats.new_tokens == new
    assert all(0 <= a <= p for a, p in zip(stats.accepted, stats.proposed, strict=True))
    if new:
        assert stats.main_forwards == 1 + (new - 1 - sum(stats.accepted))


def test_rollback_keeps_every_cache_consistent():
    """Drafts equal what the MTP chain computes from scratch on the committed tokens, and the
    main cache equals a fresh prefill, although rejected drafts were written into both."""
    model, mtp = make(depth=2, seed=1, vocab_size=2)  # a seed whose drafts are often right
    prompt = torch.randint(0, 2, (1, 6), generator=torch.Generator().manual_seed(1))
    tokens, stats = speculative_generate(model, mtp, prompt, 40)
    for a, p in zip(stats.accepted, stats.proposed, strict=True):  # both paths at both depths
        assert 0 < a < p
    # from scratch: main hidden over all committed tokens, then each depth with true tokens
    fresh = copy.deepcopy(mtp)
    N = tokens.shape[1]
    with torch.no_grad():
        hidden = fresh.main.hidden(tokens[:, :-1])  # [1, N-1, dim]
        h1, logits1 = fresh.layers[0](hidden[:, : N - 2], tokens[:, 1:N - 1])
        _, logits2 = fresh.layers[1](h1[:, : N - 3], tokens[:, 2:N - 1])
    checked = [0, 0]
    for n, k, draft, target, _accepted in stats.events:
        # depth 2 is verified only after depth 1 was accepted, so both saw committed inputs
        expected = (logits1 if k == 1 else logits2)[0, n].argmax()
        assert draft == int(expected)
        assert target == tokens[0, n + k + 1]  # the main model's greedy token there
        checked[k - 1] += 1
    assert checked[0] > 0 and checked[1] > 0
    # the main model's cache at committed positions equals a fresh prefill's
    used = N - 2  # positions 0..N-2 were fed to the main model
    for ours, ref in zip(model.layers, fresh.main.layers, strict=True):
        torch.testing.assert_close(ours.attn.kv_cache[0, :used], ref.attn.kv_cache[0, :used])
        torch.testing.assert_close(ours.attn.pe_cache[0, :used], ref.attn.pe_cache[0, :used])


def test_restarting_at_an_earlier_position_overwrites_stale_entries():
    model, _ = make(depth=0, seed=5)
    tokens = torch.randint(0, 256, (1, 12))
    full = model(tokens)
    model(tokens[:, :8])  # prefill 0..7
    model(torch.randint(0, 256, (1, 3)), 8)  # a rejected chunk written at 8..10
    torch.testing.assert_close(model(tokens[:, 8:], 8), full[:, 8:])  # resume at 8


def test_errors():
    model, mtp = make(depth=1)
    with pytest.raises(ValueError, match="batch 1"):
        speculative_generate(model, mtp, torch.zeros(2, 3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="max_seq_len"):
        speculative_generate(model, mtp, torch.zeros(1, 3, dtype=torch.long), 100)
    with pytest.raises(ValueError, match="n_draft"):
        speculative_generate(model, mtp, torch.zeros(1, 3, dtype=torch.long), 4, n_draft=2)
    other, _ = make(depth=1)
    with pytest.raises(ValueError, match="built on this model"):
        speculative_generate(other, mtp, torch.zeros(1, 3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="depth"):
        MTP(model, depth=-1)
    with pytest.raises(TypeError, match="Transformer"):
        MTP(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="too short"):
        mtp(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 1, model.args.dim))


# ---------------------------------------------------------------- transformers' MTP reference
def hf_mtp_state(mtp: MTP) -> dict[str, torch.Tensor]:
    """Our MTP modules' weights under transformers' MtpModel names (layers.{k}.mtp_block...)."""
    from dsv3_lab.hf import _LAYER

    sd = {}
    for k, module in enumerate(mtp.layers):
        for name, tensor in module.state_dict().items():
            top, _, rest = name.partition(".")
            if top in ("enorm", "hnorm", "eh_proj"):
                sd[f"layers.{k}.{name}"] = tensor
            elif top == "norm":
                sd[f"layers.{k}.post_norm.{rest}"] = tensor
            elif not rest.startswith("ffn.experts."):
                module_name, leaf = rest.rsplit(".", 1)
                leaf = "e_score_correction_bias" if rest == "ffn.gate.bias" else leaf
                sd[f"layers.{k}.mtp_block.{_LAYER[module_name]}.{leaf}"] = tensor
        experts = module.block.ffn.experts
        sd[f"layers.{k}.mtp_block.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([e.w1.weight, e.w3.weight]) for e in experts])  # [E, 2I, dim]
        sd[f"layers.{k}.mtp_block.mlp.experts.down_proj"] = torch.stack(
            [e.w2.weight for e in experts])  # [E, dim, I]
    return {k: v.detach().clone() for k, v in sd.items()}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("overrides", [{}, dict(norm_eps=1e-5, n_expert_groups=1,
                                                n_limited_groups=1)])
def test_mtp_logits_equal_transformers_mtp_model(overrides):
    """transformers.modeling_layers.MtpModel (transformers >= 5.23) on the same weights: the
    logits of the MTP head equal ours at every position (depth 1)."""
    from transformers.modeling_layers import MtpModel

    from dsv3_lab.hf import to_hf

    model, mtp = make(depth=1, dtype=torch.float32, **overrides)
    with torch.no_grad():
        for p in mtp.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)  # norms away from 1: a missed norm shows
        for moe in [m.block.ffn for m in mtp.layers] + model.moe_layers():
            moe.gate.bias.normal_(0, 0.3)
    hf = to_hf(model)
    ref = MtpModel(hf, 1).eval()
    ref.config._attn_implementation = "eager"
    ref.config._experts_implementation = "eager"
    missing, unexpected = ref.load_state_dict(hf_mtp_state(mtp), strict=False)
    assert not unexpected and all(k.startswith(("embed_tokens", "shared_head")) or
                                  "rotary" in k for k in missing), missing
    tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        hidden = model.hidden(tokens[:, :-1])  # h^0 [B, 19, dim]
        ours = mtp(tokens, hidden)[0]  # [B, 18, vocab]: row i predicts t_{i+2}
        h_hf = hf.model(tokens[:, :-1]).last_hidden_state  # after the final norm
        assert (h_hf - hidden).abs().max() < 1e-5
        length = ours.shape[1]
        pos = torch.arange(length)[None]
        h1 = ref.forward_layer(0, h_hf[:, :length], pos, None, input_ids=tokens[:, 1:1 + length])
        theirs = ref._project_to_logits(h1)
    assert (ours - theirs).abs().max() < 1e-5


@pytest.mark.filterwarnings("ignore")
def test_speculative_tokens_equal_transformers_mtp_generation(tmp_path):
    """transformers' generate(use_mtp=True) loads the MTP layer from the checkpoint (DeepSeek's
    layout: model.layers.{n_layers}.*, shared_head.norm) and decodes: same tokens as ours."""
    from safetensors.torch import load_file, save_file
    from transformers import DeepseekV3ForCausalLM

    from dsv3_lab.hf import to_hf

    model, mtp = make(depth=1, dtype=torch.float32)
    n = model.args.n_layers
    to_hf(model).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    for key, value in hf_mtp_state(mtp).items():  # MtpModel names -> checkpoint names
        key = key.replace("layers.0.mtp_block.", f"model.layers.{n}.")
        key = key.replace("layers.0.post_norm.", f"model.layers.{n}.shared_head.norm.")
        state[key.replace("layers.0.", f"model.layers.{n}.")] = value.contiguous()
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager",
                                               experts_implementation="eager").eval()
    # transformers finds the MTP weights by this pattern, hard-wired to the 671B's layer 61
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{n}.*"]
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(0))
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, use_mtp=True)
    ours, stats = speculative_generate(model, mtp, prompt, 12)
    assert stats.proposed[0] > 0
    assert ours.tolist() == theirs.tolist() == generate(model, prompt, 12).tolist()


# ----------------------------------------------------------------------------- parallel baseline
def test_parallel_heads_have_mtp_shapes_and_ignore_the_tokens_ahead():
    from dsv3_lab.mtp import ParallelMTP

    model, seq = make(depth=2)
    par = ParallelMTP(model, depth=2).to(torch.float64)  # as make() casts the MTP modules
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = model.hidden(tokens[:, :-1])  # [2, 11, dim]
        ours, theirs = par(tokens, hidden), seq(tokens, hidden)
        assert [t.shape for t in ours] == [t.shape for t in theirs]
        other = tokens.clone()
        other[:, 1:] = (other[:, 1:] + 7) % 256  # change every token after the first
        # the sequential modules read t_{i+k}, the parallel heads only h^0
        assert all(torch.equal(a, b) for a, b in zip(ours, par(other, hidden), strict=True))
        assert not torch.equal(theirs[0], seq(other, hidden)[0])
    loss, metrics = mtp_loss(par, tokens, lam=0.3)
    loss.backward()
    assert {"main_loss", "mtp1_loss", "mtp2_acc"} <= set(metrics)
    assert model.head.weight.grad is not None
    assert par.layers[1].block.attn.wo.weight.grad is not None
    # the same parameters as an MTP module, minus enorm and the 2d -> d projection
    dim = model.args.dim
    n_par = sum(p.numel() for p in par.layers[0].parameters())
    n_seq = sum(p.numel() for p in seq.layers[0].parameters())
    assert n_seq - n_par == dim + 2 * dim * dim
    assert sum(p is model.head.weight for p in par.parameters()) == 1  # shared, counted once


def test_parallel_errors():
    from dsv3_lab.mtp import ParallelMTP

    model, _ = make(depth=1)
    with pytest.raises(TypeError, match="Transformer"):
        ParallelMTP(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="depth"):
        ParallelMTP(model, depth=-1)
    with pytest.raises(ValueError, match="too short"):
        ParallelMTP(model, depth=2).double()(torch.zeros(1, 3, dtype=torch.long),
                                    model.hidden(torch.zeros(1, 2, dtype=torch.long)))
    with pytest.raises(ValueError, match="h0"):
        ParallelMTP(model).layers[0](torch.zeros(1, 3, 5))
