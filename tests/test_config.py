"""ModelArgs validation (every rule, with its message), presets, JSON loading (official semantics
for omitted fields), parameter counts."""

import json

import pytest
import torch

from dsv3_lab.config import OFFICIAL_DEFAULTS, ModelArgs, attention_params, check_args, param_counts

# (override of a valid tiny config, words the error message must contain)
INVALID = [
    (dict(dim=0), "ModelArgs.dim must be a positive integer"),
    (dict(n_heads=-4), "ModelArgs.n_heads must be a positive integer"),
    (dict(vocab_size=2.5), "ModelArgs.vocab_size must be a positive integer"),
    (dict(max_seq_len=True), "ModelArgs.max_seq_len must be a positive integer"),
    (dict(kv_lora_rank=0), "ModelArgs.kv_lora_rank must be a positive integer"),
    (dict(n_dense_layers=-1), "ModelArgs.n_dense_layers must be an integer >= 0"),
    (dict(q_lora_rank=-8), "ModelArgs.q_lora_rank must be an integer >= 0"),
    (dict(n_shared_experts=-1), "ModelArgs.n_shared_experts must be an integer >= 0"),
    (dict(qk_rope_head_dim=7), "ModelArgs.qk_rope_head_dim must be even"),
    (dict(n_dense_layers=4), "ModelArgs.n_dense_layers (4) must be <= n_layers (3)"),
    (dict(n_routed_experts=18), "ModelArgs.n_routed_experts (18) must be divisible by "
                                "n_expert_groups (4)"),
    (dict(n_routed_experts=4, n_activated_experts=1, n_limited_groups=2),
     "group scores sum the top-2 experts"),
    (dict(n_limited_groups=5), "ModelArgs.n_limited_groups (5) must be <= n_expert_groups (4)"),
    (dict(n_activated_experts=9), "ModelArgs.n_activated_experts (9) must be <= the experts in "
                                  "the kept groups"),
    (dict(n_activated_experts=17, n_limited_groups=4), "n_activated_experts (17)"),
    (dict(score_func="relu"), "ModelArgs.score_func must be one of ('softmax', 'sigmoid')"),
    (dict(dtype="fp16"), "ModelArgs.dtype must be one of ('bf16', 'fp8')"),
    (dict(scale_fmt="e8m0"), "ModelArgs.scale_fmt must be None or 'ue8m0'"),
    (dict(route_scale=0.0), "ModelArgs.route_scale must be > 0"),
    (dict(rope_theta=1.0), "ModelArgs.rope_theta must be > 1"),
    (dict(rope_factor=0.5), "ModelArgs.rope_factor must be >= 1"),
    (dict(beta_fast=1, beta_slow=2), "ModelArgs.beta_fast (1) must be >= beta_slow (2) > 0"),
    (dict(beta_fast=1, beta_slow=0), "ModelArgs.beta_fast (1) must be >= beta_slow (0) > 0"),
    (dict(norm_eps=0.0), "ModelArgs.norm_eps must be in (0, 1)"),
    (dict(mscale=0.0), "ModelArgs.mscale must be > 0"),
    (dict(n_mtp_layers=-1), "ModelArgs.n_mtp_layers must be an integer >= 0"),
]


@pytest.mark.parametrize("override,message", INVALID, ids=[m[:40] for _, m in INVALID])
def test_invalid_args_raise_with_field_and_rule(override, message):
    with pytest.raises(ValueError) as err:
        ModelArgs.tiny(**override)
    assert message in str(err.value)


TYPE_ERRORS = [
    (dict(route_scale="2.5"), "ModelArgs.route_scale must be a real number"),
    (dict(rope_theta="10000"), "ModelArgs.rope_theta must be a real number"),
    (dict(mscale=None), "ModelArgs.mscale must be a real number"),
    (dict(norm_eps="1e-6"), "ModelArgs.norm_eps must be a real number"),
    (dict(beta_fast=True), "ModelArgs.beta_fast must be a real number"),
    (dict(gate_bias="yes"), "ModelArgs.gate_bias must be a bool"),
]


@pytest.mark.parametrize("override,message", TYPE_ERRORS, ids=[m[:30] for _, m in TYPE_ERRORS])
def test_wrong_types_raise_type_error_naming_the_field(override, message):
    with pytest.raises(TypeError, match=message):
        ModelArgs.tiny(**override)


def test_kimi_k2_yarn_betas_are_accepted():
    """beta_fast = beta_slow = 1 (Kimi K2) is valid in the official code and transformers."""
    args = ModelArgs.tiny(beta_fast=1, beta_slow=1, n_expert_groups=1, n_limited_groups=1)
    from dsv3_lab.rope import rope_frequencies

    assert torch.isfinite(rope_frequencies(args)).all()


def test_group_size_one_is_valid_without_bias_only():
    """V2-style gates rank groups by their best score, which a 1-expert group has."""
    ModelArgs.tiny(n_routed_experts=4, n_expert_groups=4, n_limited_groups=4,
                   n_activated_experts=2, gate_bias=False, score_func="softmax")
    with pytest.raises(ValueError, match="group scores sum the top-2"):
        ModelArgs.tiny(n_routed_experts=4, n_expert_groups=4, n_limited_groups=4,
                       n_activated_experts=2)


def test_check_args_rejects_other_objects_and_mutated_args():
    from types import SimpleNamespace

    with pytest.raises(TypeError, match="Gate: expected a dsv3_lab.config.ModelArgs, got dict"):
        check_args(dict(dim=64), "Gate")
    with pytest.raises(TypeError, match="got SimpleNamespace"):
        check_args(SimpleNamespace(**ModelArgs.tiny().to_dict()), "MLA")
    args = ModelArgs.tiny()
    args.n_limited_groups = 9  # changed after validation
    with pytest.raises(ValueError, match=r"MoE: invalid ModelArgs: ModelArgs.n_limited_groups"):
        check_args(args, "MoE")


def test_presets_are_valid_and_tiny_switches_every_feature_on():
    big, tiny = ModelArgs.v3_671b(), ModelArgs.tiny()
    assert big == ModelArgs()
    assert (big.dim, big.n_layers, big.n_routed_experts, big.q_lora_rank) == (7168, 61, 256, 1536)
    assert tiny.q_lora_rank > 0 and tiny.n_shared_experts > 0
    assert 0 < tiny.n_dense_layers < tiny.n_layers
    assert tiny.n_expert_groups >= 4 and tiny.n_limited_groups < tiny.n_expert_groups
    group_size = tiny.n_routed_experts // tiny.n_expert_groups
    # group limiting binds: without it the top-k could span more groups than are kept
    assert tiny.n_activated_experts > tiny.n_limited_groups
    assert tiny.n_activated_experts <= tiny.n_limited_groups * group_size
    assert tiny.yarn_enabled and tiny.original_seq_len < tiny.max_seq_len
    assert tiny.score_func == "sigmoid"


def test_q_lora_rank_none_means_no_query_compression():
    assert ModelArgs.tiny(q_lora_rank=None).q_lora_rank == 0


def test_param_counts_671b_exact():
    counts = param_counts(ModelArgs.v3_671b())
    assert counts["total"] == 671_026_419_200
    assert counts["active"] == 37_552_297_472
    assert attention_params(ModelArgs.v3_671b()) == 187_107_328
    assert counts["routed_experts"] == 58 * 256 * 44_040_192  # ≈ 653.9B
    assert counts["mtp"] == 11_610_068_224
    parts = ("embed", "head", "final_norm", "attention", "norms", "dense_ffn", "routed_experts",
             "shared_experts", "gate")
    assert sum(counts[p] for p in parts) == counts["total"]


def test_param_counts_match_a_built_tiny_model():
    from dsv3_lab.model import Transformer

    args = ModelArgs.tiny()
    model = Transformer(args)
    gate_bias = sum(m.gate.bias.numel() for m in model.moe_layers())  # a buffer, counted
    built = sum(p.numel() for p in model.parameters()) + gate_bias
    assert param_counts(args)["total"] == built
    args0 = ModelArgs.tiny(q_lora_rank=0)
    built0 = sum(p.numel() for p in Transformer(args0).parameters()) + gate_bias
    assert param_counts(args0)["total"] == built0
    # V2-style gates carry no bias: neither the model nor the count has one
    args2 = ModelArgs.tiny(score_func="softmax", gate_bias=False)
    model2 = Transformer(args2)
    assert all(m.gate.bias is None for m in model2.moe_layers())
    assert param_counts(args2)["total"] == sum(p.numel() for p in model2.parameters())
    assert param_counts(args)["total"] - param_counts(args2)["total"] == gate_bias


def test_param_counts_report_embedding_and_head():
    args = ModelArgs.v3_671b()
    counts = param_counts(args)
    assert counts["embedding"] == counts["embed"] == counts["head"] == 129280 * 7168
    # README_WEIGHTS.md: 36.7B activated "including 0.9B for Embedding and 0.9B for the output Head"
    assert round(counts["embedding"] / 1e9, 1) == 0.9
    with pytest.raises(TypeError, match="param_counts: expected a dsv3_lab.config.ModelArgs"):
        param_counts({"dim": 7168})


def test_from_json_reads_official_format(tmp_path):
    official = {  # inference/configs/config_671B.json field set
        "vocab_size": 129280, "dim": 7168, "inter_dim": 18432, "moe_inter_dim": 2048,
        "n_layers": 61, "n_dense_layers": 3, "n_heads": 128, "n_routed_experts": 256,
        "n_shared_experts": 1, "n_activated_experts": 8, "n_expert_groups": 8,
        "n_limited_groups": 4, "route_scale": 2.5, "score_func": "sigmoid", "q_lora_rank": 1536,
        "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "dtype": "fp8",
    }
    path = tmp_path / "config_671B.json"
    path.write_text(json.dumps(official))
    args = ModelArgs.from_json(path)
    assert args.dtype == "fp8"
    assert param_counts(args)["total"] == 671_026_419_200


def test_from_json_omitted_fields_take_the_official_defaults(tmp_path):
    """A file with only `dim` builds the official 16B model's router (softmax, one group, no
    bias for dim != 7168), not our 671B defaults."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"dim": 2048}))
    args = ModelArgs.from_json(path)
    for name, value in OFFICIAL_DEFAULTS.items():
        assert getattr(args, name) == value, name
    assert (args.score_func, args.n_expert_groups, args.gate_bias, args.n_mtp_layers) == (
        "softmax", 1, False, 0)
    assert ModelArgs().score_func == "sigmoid"  # our Python defaults stay the 671B model
    path.write_text(json.dumps({"dim": 2048, "gate_bias": True, "norm_eps": 1e-5}))
    args = ModelArgs.from_json(path)
    assert args.gate_bias and args.norm_eps == 1e-5


def test_from_json_points_hf_configs_to_hf_py(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 7168,
                                "model_type": "deepseek_v3"}))
    with pytest.raises(ValueError, match=r"Hugging Face config.json .* dsv3_lab.hf.from_hf_config"):
        ModelArgs.from_json(path)


def test_from_json_suggests_the_right_name_for_a_typo(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"n_routed_expert": 64, "kv_lora_rnk": 512}))
    with pytest.raises(ValueError) as err:
        ModelArgs.from_json(path)
    assert "'n_routed_expert' (did you mean 'n_routed_experts'?)" in str(err.value)
    assert "'kv_lora_rnk' (did you mean 'kv_lora_rank'?)" in str(err.value)


def test_from_json_rejects_unknown_fields_and_bad_values(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"dim": 64, "zzz": 64}))
    with pytest.raises(ValueError, match=r"unknown ModelArgs fields 'zzz'"):
        ModelArgs.from_json(path)
    path.write_text(json.dumps({"route_scale": "2.5"}))
    with pytest.raises(TypeError, match="route_scale must be a real number"):
        ModelArgs.from_json(path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="expected a JSON object"):
        ModelArgs.from_json(path)
    path.write_text(json.dumps({"n_limited_groups": 9}))
    with pytest.raises(ValueError, match="n_limited_groups"):
        ModelArgs.from_json(path)
