"""Conversion between dsv3_lab's `Transformer` and transformers' DeepSeek-V2 / V3 models.

Classes: a V3-style model (sigmoid scores, gate bias, renormalised top-k: DeepSeek-V3/R1/V3.1,
Moonlight, Kimi K2) <-> `DeepseekV3ForCausalLM`; a V2-style model (softmax scores, no gate bias,
no renormalisation, groups ranked by their best score) <-> `DeepseekV2ForCausalLM`.

Config: official ModelArgs names <-> transformers names (REFERENCE §1; `HF_FIELDS` lists every
architecture field and how it is handled), YaRN as rope_parameters {"rope_type": "yarn", factor,
original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim}. Anything this
package cannot represent raises a ValueError naming the field.
Weights: one tensor each, same values; the only reshaping is transformers 5's fused experts
(gate_up_proj [E, 2·I, dim] = [w1 ; w3], down_proj [E, dim, I] = w2). RoPE needs no
permutation: transformers rotates the interleaved pairs of the released weights (V3:
rope_interleave=True; V2 always), as DeepSeek's code does. `to_hf` selects transformers' eager
experts loop, which runs in float32 and float64 and for any expert width (the default grouped
kernel does not).
"""

from __future__ import annotations

import torch

from dsv3_lab.config import ModelArgs, check_args
from dsv3_lab.model import Transformer

# ours (inside a layer) -> transformers (inside model.layers.{i})
_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn.wq": "self_attn.q_proj",
    "attn.wq_a": "self_attn.q_a_proj",
    "attn.q_norm": "self_attn.q_a_layernorm",
    "attn.wq_b": "self_attn.q_b_proj",
    "attn.wkv_a": "self_attn.kv_a_proj_with_mqa",
    "attn.kv_norm": "self_attn.kv_a_layernorm",
    "attn.wkv_b": "self_attn.kv_b_proj",
    "attn.wo": "self_attn.o_proj",
    "ffn.w1": "mlp.gate_proj",
    "ffn.w3": "mlp.up_proj",
    "ffn.w2": "mlp.down_proj",
    "ffn.shared_experts.w1": "mlp.shared_experts.gate_proj",
    "ffn.shared_experts.w3": "mlp.shared_experts.up_proj",
    "ffn.shared_experts.w2": "mlp.shared_experts.down_proj",
    "ffn.gate": "mlp.gate",
}


#: Every architecture field of DeepseekV3Config / DeepseekV2Config and how from_hf_config treats it.
HF_FIELDS = {
    "vocab_size": "vocab_size", "hidden_size": "dim", "intermediate_size": "inter_dim",
    "moe_intermediate_size": "moe_inter_dim", "num_hidden_layers": "n_layers",
    "first_k_dense_replace": "n_dense_layers (None = 0)", "num_attention_heads": "n_heads",
    "num_key_value_heads": "must equal num_attention_heads (MLA has no KV groups)",
    "n_routed_experts": "n_routed_experts", "n_shared_experts": "n_shared_experts (None = 0)",
    "num_experts_per_tok": "n_activated_experts", "n_group": "n_expert_groups (None = 1)",
    "topk_group": "n_limited_groups (None = 1)", "routed_scaling_factor": "route_scale",
    "scoring_func": "V3: must be 'sigmoid', V2: 'softmax' (the classes hard-wire them)",
    "topk_method": "V3: 'noaux_tc' (or absent); V2: 'greedy' (one group) or "
                   "'group_limited_greedy' (groups ranked by their best score)",
    "norm_topk_prob": "V3: must be True; V2: must be False (transformers' V2 never renormalises)",
    "q_lora_rank": "q_lora_rank (None = 0, no query compression)", "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim", "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim", "hidden_act": "must be 'silu' (SwiGLU)",
    "rms_norm_eps": "norm_eps (block and final norms; latent norms stay 1e-6)",
    "tie_word_embeddings": "must be False", "attention_bias": "must be False",
    "mlp_bias": "V2: must be False",
    "rope_parameters": "rope_theta; 'default' or 'yarn' (factor -> rope_factor, "
                       "original_max_position_embeddings -> original_seq_len, beta_fast, "
                       "beta_slow, mscale = mscale_all_dim -> mscale); other types refused",
    "rope_interleave": "V3: must be True (the released interleaved layout)",
    "max_position_embeddings": "max_seq_len (unless max_seq_len is given)",
    "num_mtp_layers": "n_mtp_layers (V3; V2: 0)",
    "quantization_config": "quant_method 'fp8' -> dtype 'fp8', scale_fmt; others refused",
    "model_type": "not read: the config's class (DeepseekV3Config / DeepseekV2Config) selects "
                  "the semantics (Kimi K2 says 'kimi_k2' and loads as DeepseekV3Config)",
}

#: Config fields that do not change the architecture's outputs, and why they are ignored.
HF_IGNORED = {
    "initializer_range": "initialisation only", "use_cache": "runtime option",
    "output_router_logits": "runtime option", "pad_token_id": "tokenizer",
    "bos_token_id": "tokenizer", "eos_token_id": "tokenizer",
    "pretraining_tp": "not used by transformers' DeepSeek models",
    "attention_dropout": "training-time dropout; dsv3_lab has none (DeepSeek's configs use 0)",
    "head_dim": "derived (= qk_rope_head_dim)",
}


def _family(args: ModelArgs) -> str:
    if args.score_func == "sigmoid" and args.gate_bias:
        return "v3"
    if args.score_func == "softmax" and not args.gate_bias:
        return "v2"
    raise ValueError(f"transformers has no DeepSeek class for score_func={args.score_func!r} "
                     f"with gate_bias={args.gate_bias}: DeepseekV3 is sigmoid with a bias, "
                     f"DeepseekV2 softmax without one")


def to_hf_config(args: ModelArgs):
    """DeepseekV3Config (sigmoid + bias) or DeepseekV2Config (softmax, no bias) for `args`."""
    check_args(args, "to_hf_config")
    family = _family(args)
    if args.yarn_enabled:
        rope = {"rope_type": "yarn", "rope_theta": args.rope_theta, "factor": args.rope_factor,
                "original_max_position_embeddings": args.original_seq_len,
                "beta_fast": args.beta_fast, "beta_slow": args.beta_slow,
                "mscale": args.mscale, "mscale_all_dim": args.mscale}
    else:
        rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    common = dict(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.inter_dim,
        moe_intermediate_size=args.moe_inter_dim, num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads, num_key_value_heads=args.n_heads,
        n_shared_experts=args.n_shared_experts, n_routed_experts=args.n_routed_experts,
        routed_scaling_factor=float(args.route_scale), kv_lora_rank=args.kv_lora_rank,
        q_lora_rank=args.q_lora_rank or None, qk_rope_head_dim=args.qk_rope_head_dim,
        v_head_dim=args.v_head_dim, qk_nope_head_dim=args.qk_nope_head_dim,
        n_group=args.n_expert_groups, topk_group=args.n_limited_groups,
        num_experts_per_tok=args.n_activated_experts, first_k_dense_replace=args.n_dense_layers,
        max_position_embeddings=args.max_seq_len, rms_norm_eps=float(args.norm_eps),
        tie_word_embeddings=False, rope_parameters=rope,
    )
    if family == "v2":
        from transformers import DeepseekV2Config

        method = "group_limited_greedy" if args.n_expert_groups > 1 else "greedy"
        return DeepseekV2Config(topk_method=method, norm_topk_prob=False, **common)
    from transformers import DeepseekV3Config

    return DeepseekV3Config(norm_topk_prob=True, rope_interleave=True,
                            num_mtp_layers=args.n_mtp_layers, **common)


def _require(config, name: str, ok, expected: str) -> None:
    value = getattr(config, name, None)
    if not ok(value):
        raise ValueError(f"from_hf_config: {name}={value!r} cannot be represented: expected "
                         f"{expected}")


def _rope_args(config, max_len: int) -> dict:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    if kind == "default":
        return dict(original_seq_len=max_len, rope_theta=theta, rope_factor=1.0, mscale=1.0)
    if kind != "yarn":
        raise ValueError(f"from_hf_config: rope_parameters rope_type={kind!r} cannot be "
                         f"represented: expected 'default' or 'yarn'")
    extra = sorted(set(rope) - {"rope_type", "type", "rope_theta", "factor", "beta_fast",
                                "beta_slow", "mscale", "mscale_all_dim",
                                "original_max_position_embeddings"})
    if extra:
        raise ValueError(f"from_hf_config: rope_parameters {extra} cannot be represented "
                         f"(DeepSeek's YaRN has no such option)")
    if not rope.get("mscale_all_dim") or rope.get("mscale") != rope.get("mscale_all_dim"):
        raise ValueError(f"from_hf_config: rope_parameters mscale={rope.get('mscale')!r}, "
                         f"mscale_all_dim={rope.get('mscale_all_dim')!r}: expected them equal "
                         f"and nonzero (otherwise transformers rescales cos/sin, which DeepSeek "
                         f"never does)")
    original = rope["original_max_position_embeddings"]
    if max_len <= original:
        raise ValueError(f"from_hf_config: YaRN is on in the config, so max_seq_len ({max_len}) "
                         f"must exceed original_max_position_embeddings ({original})")
    return dict(original_seq_len=original, rope_theta=theta, rope_factor=rope["factor"],
                beta_fast=rope.get("beta_fast") or 32, beta_slow=rope.get("beta_slow") or 1,
                mscale=rope["mscale_all_dim"])


def from_hf_config(config, max_batch_size: int = 8, max_seq_len: int | None = None) -> ModelArgs:
    """ModelArgs from a DeepseekV3Config or DeepseekV2Config (every field: `HF_FIELDS`).

    Caches are sized max_batch_size × max_seq_len (default: max_position_embeddings).
    """
    from transformers import DeepseekV2Config, DeepseekV3Config

    # the class decides: Kimi K2's config.json says model_type "kimi_k2" but loads as V3
    if not isinstance(config, (DeepseekV3Config, DeepseekV2Config)):
        raise TypeError(f"from_hf_config: expected a transformers DeepseekV3Config or "
                        f"DeepseekV2Config, got {type(config).__name__}")
    v3 = isinstance(config, DeepseekV3Config)
    _require(config, "num_key_value_heads", lambda v: v in (None, config.num_attention_heads),
             f"num_attention_heads={config.num_attention_heads}")
    _require(config, "hidden_act", lambda v: v == "silu", "'silu'")
    for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        _require(config, name, lambda v: not v, "False")
    if v3:
        _require(config, "scoring_func", lambda v: v in (None, "sigmoid"),
                 "'sigmoid' (DeepseekV3 always routes with sigmoid scores)")
        _require(config, "topk_method", lambda v: v in (None, "noaux_tc"),
                 "'noaux_tc' (DeepseekV3 always routes with the bias)")
        _require(config, "norm_topk_prob", lambda v: v is True,
                 "True (a sigmoid gate renormalises its top-k weights)")
        _require(config, "rope_interleave", lambda v: v in (None, True), "True")
        groups, limited = config.n_group or 1, config.topk_group or 1
    else:
        _require(config, "scoring_func", lambda v: v in (None, "softmax"),
                 "'softmax' (DeepseekV2 always routes with softmax scores)")
        _require(config, "topk_method", lambda v: v in ("greedy", "group_limited_greedy"),
                 "'greedy' or 'group_limited_greedy'")
        _require(config, "norm_topk_prob", lambda v: not v,
                 "False (transformers' DeepseekV2 never renormalises the top-k weights)")
        limited_greedy = config.topk_method == "group_limited_greedy"
        groups = (config.n_group or 1) if limited_greedy else 1
        limited = (config.topk_group or 1) if limited_greedy else 1
    quant = getattr(config, "quantization_config", None) or {}
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    if quant and quant.get("quant_method") != "fp8":
        raise ValueError(f"from_hf_config: quantization_config quant_method="
                         f"{quant.get('quant_method')!r} cannot be represented: expected 'fp8'")
    max_len = max_seq_len or config.max_position_embeddings
    return ModelArgs(
        max_batch_size=max_batch_size, max_seq_len=max_len, vocab_size=config.vocab_size,
        dtype="fp8" if quant else "bf16", scale_fmt=quant.get("scale_fmt"),
        dim=config.hidden_size, inter_dim=config.intermediate_size,
        moe_inter_dim=config.moe_intermediate_size, n_layers=config.num_hidden_layers,
        n_dense_layers=config.first_k_dense_replace or 0, n_heads=config.num_attention_heads,
        n_routed_experts=config.n_routed_experts, n_shared_experts=config.n_shared_experts or 0,
        n_activated_experts=config.num_experts_per_tok, n_expert_groups=groups,
        n_limited_groups=limited, score_func="sigmoid" if v3 else "softmax",
        route_scale=config.routed_scaling_factor, q_lora_rank=config.q_lora_rank or 0,
        kv_lora_rank=config.kv_lora_rank, qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim,
        **_rope_args(config, max_len),
        n_mtp_layers=getattr(config, "num_mtp_layers", 0) if v3 else 0,
        norm_eps=config.rms_norm_eps, gate_bias=v3,
    )


def _named_tensors(model: Transformer):
    """(transformers name, our tensor) for every weight except the routed experts."""
    yield "model.embed_tokens.weight", model.embed.weight
    yield "model.norm.weight", model.norm.weight
    yield "lm_head.weight", model.head.weight
    for i, layer in enumerate(model.layers):
        for name, tensor in layer.state_dict(keep_vars=True).items():
            if name.startswith("ffn.experts."):
                continue
            module, leaf = name.rsplit(".", 1)
            hf_leaf = "e_score_correction_bias" if name == "ffn.gate.bias" else leaf
            yield f"model.layers.{i}.{_LAYER[module]}.{hf_leaf}", tensor


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under transformers' DeepseekV3/V2ForCausalLM names (experts fused)."""
    sd = {name: tensor.detach() for name, tensor in _named_tensors(model)}
    for i, moe in enumerate(model.layers):
        if hasattr(moe.ffn, "experts"):
            experts = moe.ffn.experts
            sd[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([e.w1.weight, e.w3.weight]) for e in experts]).detach()  # [E, 2I, dim]
            sd[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(
                [e.w2.weight for e in experts]).detach()  # [E, dim, I]
    return sd


def hf_class(args: ModelArgs):
    """transformers' causal-LM class for `args`: DeepseekV3ForCausalLM or DeepseekV2ForCausalLM."""
    from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM if _family(args) == "v3" else DeepseekV2ForCausalLM


def to_hf(model: Transformer):
    """transformers' model (V3 or V2 class; eager attention and experts; model's dtype) with the
    same weights as `model`."""
    if not isinstance(model, Transformer):
        raise TypeError(f"to_hf: expected a dsv3_lab Transformer, got {type(model).__name__}")
    config = to_hf_config(model.args)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"  # grouped kernels: no float64, widths % 8 only
    hf = hf_class(model.args)(config).to(model.embed.weight.dtype)
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"to_hf: weights did not map: missing {missing}, "
                           f"unexpected {unexpected}")
    return hf.eval()


def from_hf(hf_model, max_batch_size: int = 8, max_seq_len: int | None = None,
            attn_impl: str = "absorb") -> Transformer:
    """A dsv3_lab Transformer with the config and weights of a DeepseekV3/V2ForCausalLM."""
    args = from_hf_config(hf_model.config, max_batch_size, max_seq_len)
    model = Transformer(args, attn_impl).to(hf_model.lm_head.weight.dtype)
    theirs = hf_model.state_dict()
    missing = sorted(set(hf_state_dict(model)) - set(theirs))
    if missing:
        raise ValueError(f"from_hf: the transformers model lacks {missing[:5]}")
    with torch.no_grad():
        for name, tensor in _named_tensors(model):
            tensor.copy_(theirs[name])
        for i, layer in enumerate(model.layers):
            if hasattr(layer.ffn, "experts"):
                gate_up = theirs[f"model.layers.{i}.mlp.experts.gate_up_proj"]  # [E, 2I, dim]
                down = theirs[f"model.layers.{i}.mlp.experts.down_proj"]  # [E, dim, I]
                inter = args.moe_inter_dim
                for e, expert in enumerate(layer.ffn.experts):
                    expert.w1.weight.copy_(gate_up[e, :inter])
                    expert.w3.weight.copy_(gate_up[e, inter:])
                    expert.w2.weight.copy_(down[e])
    return model


def hf_param_count(args: ModelArgs) -> int:
    """Parameters of transformers' model for `args`, built on the meta device: every tensor of
    its state dict (parameters plus the gate's e_score_correction_bias buffer)."""
    config = to_hf_config(args)
    config._experts_implementation = "eager"
    with torch.device("meta"):
        hf = hf_class(args)(config)
    return sum(t.numel() for t in hf.state_dict().values())
