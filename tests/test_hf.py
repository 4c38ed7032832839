"""dsv3_lab <-> transformers for every family member: DeepseekV2ForCausalLM (V2, V2-Lite) and
DeepseekV3ForCausalLM (V3/R1/V3.1, Moonlight, Kimi K2) on tiny random models shaped like each;
float32 and float64, any expert width; every HF config field mapped or refused by name."""

import dataclasses

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV3Config

from dsv3_lab.config import ModelArgs
from dsv3_lab.hf import HF_FIELDS, HF_IGNORED, from_hf, from_hf_config, to_hf, to_hf_config
from dsv3_lab.model import Transformer

# Tiny models shaped like each published member (the published values scaled down; what makes
# each one different is kept: scoring, bias, group ranking, query compression, shared experts,
# route_scale, YaRN or not, rope_theta, eps, betas).
V2 = dict(score_func="softmax", gate_bias=False, n_shared_experts=2, route_scale=16.0,
          mscale=0.707, n_mtp_layers=0)  # group-limited greedy: 4 groups, 2 kept; no MTP
FAMILY = {
    "V2": V2,
    "V2-Lite": dict(V2, n_expert_groups=1, n_limited_groups=1, q_lora_rank=0, route_scale=1.0),
    "V3/R1/V3.1": {},
    "Moonlight": dict(q_lora_rank=0, n_shared_experts=2, max_seq_len=64, rope_theta=50000.0,
                      norm_eps=1e-5, n_expert_groups=1, n_limited_groups=1),
    "Kimi K2": dict(n_expert_groups=1, n_limited_groups=1, beta_fast=1, beta_slow=1,
                    rope_theta=50000.0, norm_eps=1e-5, rope_factor=32.0),
}


def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    """Random weights; norm weights away from 1 and a random gate bias, so a missed norm or a
    missed bias shows in the logits."""
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
        for moe in model.moe_layers():
            if moe.gate.bias is not None:
                moe.gate.bias.normal_(0, 0.3)
    return model.eval()


def tokens(args, seed=1):
    return torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", FAMILY)
def test_family_member_equals_transformers_both_directions(name):
    args = ModelArgs.tiny(**FAMILY[name])
    ours = random_model(args)
    hf = to_hf(ours)
    expected_class = "DeepseekV2ForCausalLM" if name.startswith("V2") else "DeepseekV3ForCausalLM"
    assert type(hf).__name__ == expected_class
    x = tokens(args)
    with torch.no_grad():
        expected = hf(x).logits
        assert (ours(x) - expected).abs().max() < 1e-5
        back = from_hf(hf, max_batch_size=2, max_seq_len=args.max_seq_len)
        want = dataclasses.replace(args, max_batch_size=2)
        if not args.yarn_enabled:  # YaRN's fields are inactive then and not carried over
            want = dataclasses.replace(want, rope_factor=1.0, mscale=1.0)
        assert back.args == want
        assert (back(x) - expected).abs().max() < 1e-5


def test_v2_group_ranking_binds_in_the_equivalence_test():
    """V2 ranks groups by their best score; on the V2-shaped inputs the V3 rule (top-2 sum)
    keeps other groups for a large share of tokens, so the equivalence test above checks it."""
    args = ModelArgs.tiny(**V2)
    gate = random_model(args).moe_layers()[0].gate
    x = torch.randn(300, args.dim, generator=torch.Generator().manual_seed(3))
    scores = torch.nn.functional.linear(x, gate.weight).softmax(-1)  # [N, E]
    grouped = scores.view(300, args.n_expert_groups, -1)  # [N, G, E/G]
    by_max = grouped.amax(-1).topk(args.n_limited_groups, -1).indices.sort(-1).values
    by_top2 = grouped.topk(2, -1).values.sum(-1).topk(args.n_limited_groups, -1).indices
    assert (by_max != by_top2.sort(-1).values).any(-1).float().mean() > 0.1
    _, idx = gate(x)
    kept = torch.zeros(300, args.n_expert_groups, dtype=torch.bool).scatter_(1, by_max, True)
    group_of = idx // (args.n_routed_experts // args.n_expert_groups)  # [N, k]
    assert kept.gather(1, group_of).all()  # our gate chose inside the best-score groups


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name,moe_inter_dim", [("V2", 12), ("V3/R1/V3.1", 20)])
def test_converted_model_runs_in_float64_for_any_expert_width(name, moe_inter_dim):
    """transformers' default grouped experts kernel needs widths % 8 == 0 and no float64:
    to_hf selects the eager experts loop."""
    args = ModelArgs.tiny(**FAMILY[name], moe_inter_dim=moe_inter_dim)
    ours = random_model(args).double()
    hf = to_hf(ours)
    assert hf.lm_head.weight.dtype == torch.float64
    x = tokens(args)
    with torch.no_grad():
        theirs = hf(x).logits
        assert theirs.dtype == torch.float64
        # transformers' RMSNorm and router compute in float32 inside a float64 model
        assert (ours(x) - theirs).abs().max() < 1e-5
        ours32, hf32 = random_model(args), to_hf(random_model(args))
        assert (ours32(x) - hf32(x).logits).abs().max() < 1e-5


@pytest.mark.parametrize("name", FAMILY)
def test_config_round_trip(name):
    args = ModelArgs.tiny(**FAMILY[name])
    config = to_hf_config(args)
    assert isinstance(config, DeepseekV2Config if name.startswith("V2") else DeepseekV3Config)
    back = from_hf_config(config, args.max_batch_size)
    if not args.yarn_enabled:
        back = dataclasses.replace(back, rope_factor=args.rope_factor, mscale=args.mscale)
    assert back == args


def test_every_architecture_field_is_mapped_or_ignored_with_a_reason():
    for cls in (DeepseekV3Config, DeepseekV2Config):
        names = {f.name for f in dataclasses.fields(cls)} - {
            f.name for f in dataclasses.fields(cls.__mro__[1])}
        assert names <= set(HF_FIELDS) | set(HF_IGNORED), names - set(HF_FIELDS) - set(HF_IGNORED)
    assert not set(HF_FIELDS) & set(HF_IGNORED)


def test_v3_published_extras_are_read():
    """Moonlight / Kimi K2 config.json carry scoring_func, topk_method and rms_norm_eps 1e-5."""
    config = to_hf_config(ModelArgs.tiny())
    config.scoring_func, config.topk_method, config.rms_norm_eps = "sigmoid", "noaux_tc", 1e-5
    args = from_hf_config(config)
    assert (args.score_func, args.gate_bias, args.norm_eps) == ("sigmoid", True, 1e-5)
    config.quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                  "weight_block_size": [128, 128]}
    assert (from_hf_config(config).dtype, from_hf_config(config).scale_fmt) == ("fp8", "ue8m0")


def test_v2_greedy_ignores_groups_as_transformers_does():
    config = to_hf_config(ModelArgs.tiny(**V2))
    config.topk_method = "greedy"  # n_group = 4 stays in the config, but greedy never uses it
    args = from_hf_config(config)
    assert (args.n_expert_groups, args.n_limited_groups, args.gate_bias) == (1, 1, False)


REFUSED = [
    ("v3", "scoring_func", "softmax", "scoring_func='softmax'"),
    ("v3", "topk_method", "greedy", "topk_method='greedy'"),
    ("v3", "norm_topk_prob", False, "norm_topk_prob=False"),
    ("v3", "rope_interleave", False, "rope_interleave=False"),
    ("v3", "hidden_act", "gelu", "hidden_act='gelu'"),
    ("v3", "tie_word_embeddings", True, "tie_word_embeddings=True"),
    ("v3", "attention_bias", True, "attention_bias=True"),
    ("v3", "num_key_value_heads", 2, "num_key_value_heads=2"),
    ("v3", "quantization_config", {"quant_method": "gptq"}, "quant_method='gptq'"),
    ("v3", "rope_parameters", {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0},
     "rope_type='linear'"),
    ("v3", "rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                               "original_max_position_embeddings": 64, "mscale": 1.0,
                               "mscale_all_dim": 0.5}, "mscale_all_dim=0.5"),
    ("v3", "rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                               "original_max_position_embeddings": 64}, "mscale=None"),
    ("v3", "rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                               "original_max_position_embeddings": 64, "mscale": 1.0,
                               "mscale_all_dim": 1.0, "attention_factor": 2.0},
     "['attention_factor']"),
    ("v2", "scoring_func", "sigmoid", "scoring_func='sigmoid'"),
    ("v2", "topk_method", "noaux_tc", "topk_method='noaux_tc'"),
    ("v2", "norm_topk_prob", True, "norm_topk_prob=True"),
    ("v2", "mlp_bias", True, "mlp_bias=True"),
]


@pytest.mark.parametrize("family,field,value,message", REFUSED,
                         ids=[f"{f}-{n}-{m[:20]}" for f, n, _, m in REFUSED])
def test_unrepresentable_fields_raise_naming_the_field(family, field, value, message):
    config = to_hf_config(ModelArgs.tiny(**(V2 if family == "v2" else {})))
    setattr(config, field, value)
    with pytest.raises(ValueError) as err:
        from_hf_config(config)
    assert message in str(err.value)


def test_bad_objects_and_unsupported_routers_are_refused():
    with pytest.raises(TypeError, match="expected a transformers DeepseekV3Config or"):
        from_hf_config({"hidden_size": 64})
    with pytest.raises(ValueError, match="no DeepSeek class for score_func='softmax' with "
                                         "gate_bias=True"):
        to_hf_config(ModelArgs.tiny(score_func="softmax"))
    with pytest.raises(TypeError, match="to_hf: expected a dsv3_lab Transformer"):
        to_hf(torch.nn.Linear(2, 2))


def test_a_config_json_in_the_published_layout_loads():
    """The layout of Moonlight / Kimi K2 config.json files (tiny values, not theirs): legacy
    rope_scaling with "type", rope_theta at the top level, model_type "kimi_k2", the extra
    scoring_func / topk_method keys, float betas."""
    config = DeepseekV3Config.from_dict(dict(
        model_type="kimi_k2", vocab_size=100, hidden_size=64, intermediate_size=128,
        moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=2048,
        rope_theta=50000.0, rope_scaling=dict(type="yarn", factor=32.0, beta_fast=1.0,
                                              beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                                              original_max_position_embeddings=64),
        rms_norm_eps=1e-5, scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
        routed_scaling_factor=2.827, num_nextn_predict_layers=0, tie_word_embeddings=False))
    args = from_hf_config(config)
    assert (args.rope_theta, args.rope_factor, args.beta_fast, args.beta_slow) == (
        50000.0, 32.0, 1.0, 1.0)
    assert (args.original_seq_len, args.max_seq_len, args.norm_eps) == (64, 2048, 1e-5)
    assert (args.n_expert_groups, args.n_mtp_layers, args.route_scale) == (1, 0, 2.827)
    assert args.yarn_enabled and args.gate_bias
