"""Conversion between dsv3_lab's `Transformer` and transformers' `DeepseekV3ForCausalLM`.

Config: official ModelArgs names <-> DeepseekV3Config names (REFERENCE §1), YaRN as
rope_parameters {"rope_type": "yarn", factor, original_max_position_embeddings, beta_fast,
beta_slow, mscale, mscale_all_dim}. Weights: one tensor each, same values; the only reshaping is
transformers 5's fused experts (gate_up_proj [E, 2·I, dim] = [w1 ; w3], down_proj [E, dim, I] = w2).
RoPE needs no permutation: with rope_interleave=True (the default) transformers rotates the
interleaved pairs of the released weights, as DeepSeek's code does.
"""

from __future__ import annotations

import torch

from dsv3_lab.config import ModelArgs
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


def to_hf_config(args: ModelArgs):
    """DeepseekV3Config with the same architecture as `args` (sigmoid routing only)."""
    from transformers import DeepseekV3Config

    if args.score_func != "sigmoid":
        raise ValueError("to_hf_config: transformers' DeepSeek-V3 routes with sigmoid scores "
                         f"only, got score_func={args.score_func!r}")
    if args.yarn_enabled:
        rope = {"rope_type": "yarn", "rope_theta": args.rope_theta, "factor": args.rope_factor,
                "original_max_position_embeddings": args.original_seq_len,
                "beta_fast": args.beta_fast, "beta_slow": args.beta_slow,
                "mscale": args.mscale, "mscale_all_dim": args.mscale}
    else:
        rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    return DeepseekV3Config(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.inter_dim,
        moe_intermediate_size=args.moe_inter_dim, num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads, num_key_value_heads=args.n_heads,
        n_shared_experts=args.n_shared_experts, n_routed_experts=args.n_routed_experts,
        routed_scaling_factor=args.route_scale, kv_lora_rank=args.kv_lora_rank,
        q_lora_rank=args.q_lora_rank or None, qk_rope_head_dim=args.qk_rope_head_dim,
        v_head_dim=args.v_head_dim, qk_nope_head_dim=args.qk_nope_head_dim,
        n_group=args.n_expert_groups, topk_group=args.n_limited_groups,
        num_experts_per_tok=args.n_activated_experts, first_k_dense_replace=args.n_dense_layers,
        norm_topk_prob=True, max_position_embeddings=args.max_seq_len, rms_norm_eps=1e-6,
        tie_word_embeddings=False, rope_parameters=rope, rope_interleave=True,
        num_mtp_layers=args.n_mtp_layers,
    )


def from_hf_config(config, max_batch_size: int = 8, max_seq_len: int | None = None) -> ModelArgs:
    """ModelArgs from a DeepseekV3Config; caches sized by max_batch_size × max_seq_len."""
    rope = dict(config.rope_parameters or {})
    yarn = rope.get("rope_type", "default") == "yarn"
    if yarn and rope.get("mscale", 1.0) != rope.get("mscale_all_dim", 1.0):
        raise ValueError("from_hf_config: mscale != mscale_all_dim rescales cos/sin, which "
                         "DeepSeek-V3 never does; expected them equal")
    max_len = max_seq_len or config.max_position_embeddings
    original = rope.get("original_max_position_embeddings", max_len) if yarn else max_len
    if yarn and max_len <= original:
        raise ValueError(f"from_hf_config: YaRN is on in the config, so max_seq_len ({max_len}) "
                         f"must exceed original_max_position_embeddings ({original})")
    return ModelArgs(
        max_batch_size=max_batch_size, max_seq_len=max_len, vocab_size=config.vocab_size,
        dim=config.hidden_size, inter_dim=config.intermediate_size,
        moe_inter_dim=config.moe_intermediate_size, n_layers=config.num_hidden_layers,
        n_dense_layers=config.first_k_dense_replace, n_heads=config.num_attention_heads,
        n_routed_experts=config.n_routed_experts, n_shared_experts=config.n_shared_experts,
        n_activated_experts=config.num_experts_per_tok, n_expert_groups=config.n_group,
        n_limited_groups=config.topk_group, score_func="sigmoid",
        route_scale=config.routed_scaling_factor, q_lora_rank=config.q_lora_rank or 0,
        kv_lora_rank=config.kv_lora_rank, qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim,
        original_seq_len=original, rope_theta=rope.get("rope_theta", 10000.0),
        rope_factor=rope.get("factor", 1.0) if yarn else 1.0,
        beta_fast=rope.get("beta_fast", 32), beta_slow=rope.get("beta_slow", 1),
        mscale=rope.get("mscale_all_dim", 1.0) if yarn else 1.0,
        n_mtp_layers=getattr(config, "num_mtp_layers", 0),
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
    """Our weights under transformers' DeepseekV3ForCausalLM names (experts fused)."""
    sd = {name: tensor.detach() for name, tensor in _named_tensors(model)}
    for i, moe in enumerate(model.layers):
        if hasattr(moe.ffn, "experts"):
            experts = moe.ffn.experts
            sd[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([e.w1.weight, e.w3.weight]) for e in experts]).detach()  # [E, 2I, dim]
            sd[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(
                [e.w2.weight for e in experts]).detach()  # [E, dim, I]
    return sd


def to_hf(model: Transformer):
    """A DeepseekV3ForCausalLM (float32, eager attention) with the same weights as `model`."""
    from transformers import DeepseekV3ForCausalLM

    config = to_hf_config(model.args)
    config._attn_implementation = "eager"
    hf = DeepseekV3ForCausalLM(config).to(model.embed.weight.dtype)
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"to_hf: weights did not map: missing {missing}, "
                           f"unexpected {unexpected}")
    return hf.eval()


def from_hf(hf_model, max_batch_size: int = 8, max_seq_len: int | None = None,
            attn_impl: str = "absorb") -> Transformer:
    """A dsv3_lab Transformer with the same config and weights as a DeepseekV3ForCausalLM."""
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
