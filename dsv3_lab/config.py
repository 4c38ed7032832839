"""DeepSeek-V3 model configuration with the official field names.

`ModelArgs` mirrors the `ModelArgs` dataclass of DeepSeek's inference code (repo
deepseek-ai/DeepSeek-V3, inference/model.py), but its defaults are the released 671B model.
Every invalid combination raises `ValueError` naming the field and the rule.

Parameter accounting (main model, no MTP; embedding and output head both counted):

    attention  = dim·q_lora_rank + q_lora_rank + q_lora_rank·H·(d_nope + d_rope)   (query path)
               + dim·(kv_lora_rank + d_rope) + kv_lora_rank + kv_lora_rank·H·(d_nope + d_v)
               + H·d_v·dim                                                          (output)
    expert     = 3·dim·moe_inter_dim                     (SwiGLU: w1, w2, w3)
    MoE layer  = n_routed_experts·expert + shared + gate (n_routed_experts·dim, + bias if any)
    total      = embed + head + final norm + Σ_layers (attention + 2 norms + FFN)
    active     = the same with only n_activated_experts routed experts per MoE layer

Reading DeepSeek's JSON files (`ModelArgs.from_json`): a field the file omits takes the default of
the *official* `ModelArgs` (inference/model.py, deepseek-ai/DeepSeek-V3), which describes the
16B model (DeepSeek-V2-Lite: softmax, one group, no query compression), not our 671B defaults;
and the gate carries a bias exactly when dim == 7168, as in the official `Gate`. So
config_16B.json and config_236B.json build softmax routers without a bias, as the official code
does. Fields beyond the official ones (norm_eps, gate_bias, n_mtp_layers) may be given in the
file; omitted, they take the official code's behaviour (eps 1e-6, bias iff dim == 7168, and no
MTP module, which the official inference code never builds).
"""

from __future__ import annotations

import difflib
import json
import numbers
from dataclasses import dataclass, fields
from pathlib import Path

SCORE_FUNCS = ("softmax", "sigmoid")
DTYPES = ("bf16", "fp8")
REAL_FIELDS = ("route_scale", "rope_theta", "rope_factor", "beta_fast", "beta_slow", "mscale",
               "norm_eps")

#: Defaults of the official ModelArgs (inference/model.py of deepseek-ai/DeepSeek-V3, commit
#: 9b4e978): the 16B model. `from_json` fills the fields a JSON file omits from these.
OFFICIAL_DEFAULTS = dict(
    max_batch_size=8, max_seq_len=4096 * 4, dtype="bf16", scale_fmt=None, vocab_size=102400,
    dim=2048, inter_dim=10944, moe_inter_dim=1408, n_layers=27, n_dense_layers=1, n_heads=16,
    n_routed_experts=64, n_shared_experts=2, n_activated_experts=6, n_expert_groups=1,
    n_limited_groups=1, score_func="softmax", route_scale=1.0, q_lora_rank=0, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, original_seq_len=4096,
    rope_theta=10000.0, rope_factor=40.0, beta_fast=32, beta_slow=1, mscale=1.0,
)
#: Keys that only a Hugging Face config.json has (they are not official ModelArgs fields).
_HF_KEYS = ("hidden_size", "num_hidden_layers", "model_type", "architectures",
            "num_attention_heads", "intermediate_size")


@dataclass
class ModelArgs:
    """Hyper-parameters of DeepSeek-V3 (defaults: the released 671B model)."""

    max_batch_size: int = 8
    max_seq_len: int = 4096 * 4
    dtype: str = "bf16"  # checkpoint format: "bf16" or "fp8" (linears stored in E4M3)
    scale_fmt: str | None = None  # V3.1 checkpoints: "ue8m0" power-of-two scales
    vocab_size: int = 129280
    dim: int = 7168
    inter_dim: int = 18432  # dense FFN width (first n_dense_layers)
    moe_inter_dim: int = 2048  # width of one routed / shared expert
    n_layers: int = 61
    n_dense_layers: int = 3
    n_heads: int = 128
    # MoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 8
    n_expert_groups: int = 8
    n_limited_groups: int = 4
    score_func: str = "sigmoid"
    route_scale: float = 2.5
    # MLA
    q_lora_rank: int = 1536  # 0 (or None in JSON) = no query compression
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # YaRN
    original_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    # Multi-Token Prediction (HF: num_nextn_predict_layers); not part of the main model
    n_mtp_layers: int = 1
    # Not in the official ModelArgs (the official code hard-wires them):
    # epsilon of the block and final RMSNorms (HF: rms_norm_eps; Moonlight and Kimi K2: 1e-5).
    # The latent norms q_norm and kv_norm always use 1e-6, in the official code and in HF.
    norm_eps: float = 1e-6
    # Whether each gate carries the balancing bias b_i (V3 family). It also fixes how groups are
    # ranked, as in the official Gate: with a bias by the sum of the top-2 biased scores, without
    # one (DeepSeek-V2's device-limited routing) by the best score of each group.
    gate_bias: bool = True

    def __post_init__(self) -> None:
        if self.q_lora_rank is None:
            self.q_lora_rank = 0
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        for name in REAL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise TypeError(f"ModelArgs.{name} must be a real number (int or float), got "
                                f"{value!r} ({type(value).__name__})")
        if not isinstance(self.gate_bias, bool):
            raise TypeError(f"ModelArgs.gate_bias must be a bool, got {self.gate_bias!r}")
        positive = (
            "max_batch_size", "max_seq_len", "vocab_size", "dim", "inter_dim", "moe_inter_dim",
            "n_layers", "n_heads", "n_routed_experts", "n_activated_experts", "n_expert_groups",
            "n_limited_groups", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
            "v_head_dim", "original_seq_len",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        for name in ("n_dense_layers", "n_shared_experts", "q_lora_rank", "n_mtp_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ModelArgs.{name} must be an integer >= 0, got {value!r}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"ModelArgs.qk_rope_head_dim must be even (RoPE rotates pairs), "
                f"got {self.qk_rope_head_dim}"
            )
        if self.n_dense_layers > self.n_layers:
            raise ValueError(
                f"ModelArgs.n_dense_layers ({self.n_dense_layers}) must be <= n_layers "
                f"({self.n_layers})"
            )
        if self.n_routed_experts % self.n_expert_groups:
            raise ValueError(
                f"ModelArgs.n_routed_experts ({self.n_routed_experts}) must be divisible by "
                f"n_expert_groups ({self.n_expert_groups})"
            )
        group_size = self.n_routed_experts // self.n_expert_groups
        if self.gate_bias and self.n_expert_groups > 1 and group_size < 2:
            raise ValueError(
                f"ModelArgs.n_expert_groups ({self.n_expert_groups}) leaves {group_size} expert "
                f"per group; group scores sum the top-2 experts, so a group needs >= 2"
            )
        if self.n_limited_groups > self.n_expert_groups:
            raise ValueError(
                f"ModelArgs.n_limited_groups ({self.n_limited_groups}) must be <= "
                f"n_expert_groups ({self.n_expert_groups})"
            )
        if self.n_activated_experts > self.n_limited_groups * group_size:
            raise ValueError(
                f"ModelArgs.n_activated_experts ({self.n_activated_experts}) must be <= the "
                f"experts in the kept groups, n_limited_groups * group size = "
                f"{self.n_limited_groups} * {group_size}"
            )
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(
                f"ModelArgs.score_func must be one of {SCORE_FUNCS}, got {self.score_func!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"ModelArgs.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.scale_fmt not in (None, "ue8m0"):
            raise ValueError(f"ModelArgs.scale_fmt must be None or 'ue8m0', got {self.scale_fmt!r}")
        if not self.route_scale > 0:
            raise ValueError(f"ModelArgs.route_scale must be > 0, got {self.route_scale}")
        if not self.rope_theta > 1:
            raise ValueError(f"ModelArgs.rope_theta must be > 1, got {self.rope_theta}")
        if not self.rope_factor >= 1:
            raise ValueError(f"ModelArgs.rope_factor must be >= 1, got {self.rope_factor}")
        if not self.beta_fast >= self.beta_slow > 0:  # Kimi K2: beta_fast = beta_slow = 1
            raise ValueError(
                f"ModelArgs.beta_fast ({self.beta_fast}) must be >= beta_slow ({self.beta_slow}) "
                f"> 0"
            )
        if not self.mscale > 0:
            raise ValueError(f"ModelArgs.mscale must be > 0, got {self.mscale}")
        if not 0 < self.norm_eps < 1:
            raise ValueError(f"ModelArgs.norm_eps must be in (0, 1), got {self.norm_eps}")

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        """Query/key head dim: [nope | rope] (192 for V3)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn_enabled(self) -> bool:
        """YaRN is applied when the model serves longer contexts than it was trained on."""
        return self.max_seq_len > self.original_seq_len

    # ------------------------------------------------------------------ presets
    @classmethod
    def v3_671b(cls) -> ModelArgs:
        """The released DeepSeek-V3 / R1 configuration (configs/config_671B.json)."""
        return cls()

    @classmethod
    def tiny(cls, **overrides) -> ModelArgs:
        """A CPU-sized model with every feature on (~0.35M parameters).

        Query compression, one dense layer then MoE, a shared expert, 16 experts in 4 groups of
        which tokens may reach 2 (so group limiting binds: the top-4 could otherwise land in 4
        groups), sigmoid routing, and YaRN (original_seq_len 64 < max_seq_len 256).
        """
        values = dict(
            max_batch_size=32, max_seq_len=256, vocab_size=256, dim=64, inter_dim=192,
            moe_inter_dim=32, n_layers=3, n_dense_layers=1, n_heads=4, n_routed_experts=16,
            n_shared_experts=1, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2,
            score_func="sigmoid", route_scale=2.5, q_lora_rank=32, kv_lora_rank=32,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, original_seq_len=64,
            rope_theta=10000.0, rope_factor=4.0, beta_fast=32, beta_slow=1, mscale=1.0,
            n_mtp_layers=1,
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelArgs:
        """Read DeepSeek's inference/configs/*.json as the official code reads them.

        Omitted fields take the official ModelArgs defaults (`OFFICIAL_DEFAULTS`, the 16B model),
        the gate bias is on iff dim == 7168, eps is 1e-6 and no MTP module is built (module
        docstring). A Hugging Face config.json is refused with a pointer to dsv3_lab.hf.
        """
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of ModelArgs fields")
        hf_keys = [k for k in _HF_KEYS if k in data]
        if hf_keys:
            raise ValueError(
                f"{path} looks like a Hugging Face config.json (it has {hf_keys}), not one of "
                f"DeepSeek's inference/configs files; load it with "
                f"transformers.AutoConfig.from_pretrained(...) and dsv3_lab.hf.from_hf_config")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, known, n=1)
                hints.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
            raise ValueError(f"{path}: unknown ModelArgs fields {', '.join(hints)}; expected a "
                             f"subset of {sorted(known)}")
        values = dict(OFFICIAL_DEFAULTS, n_mtp_layers=0, norm_eps=1e-6)
        values.update(data)
        values.setdefault("gate_bias", values["dim"] == 7168)  # the official Gate's rule
        return cls(**values)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def attention_params(args: ModelArgs) -> int:
    """Parameters of one MLA layer (187,107,328 for the 671B model)."""
    h, qk = args.n_heads, args.qk_head_dim
    if args.q_lora_rank:
        q = args.dim * args.q_lora_rank + args.q_lora_rank + args.q_lora_rank * h * qk
    else:
        q = args.dim * h * qk
    kv = (args.dim * (args.kv_lora_rank + args.qk_rope_head_dim) + args.kv_lora_rank
          + args.kv_lora_rank * h * (args.qk_nope_head_dim + args.v_head_dim))
    return q + kv + h * args.v_head_dim * args.dim


def check_args(args, where: str) -> ModelArgs:
    """`args` itself if it is a valid ModelArgs (re-validated: fields may have been changed after
    construction); otherwise a TypeError/ValueError naming `where` and what was expected."""
    if not isinstance(args, ModelArgs):
        raise TypeError(f"{where}: expected a dsv3_lab.config.ModelArgs, got "
                        f"{type(args).__name__}; build one with ModelArgs(...), "
                        f"ModelArgs.from_json or dsv3_lab.hf.from_hf_config")
    try:
        args._validate()
    except (TypeError, ValueError) as err:
        raise type(err)(f"{where}: invalid ModelArgs: {err}") from None
    return args


def param_counts(args: ModelArgs) -> dict[str, int]:
    """Total and per-token activated parameters of the main model (no MTP), with a breakdown.

    Keys: "embedding" (= "embed", the input embedding), "head" (output head), "final_norm",
    "attention", "norms", "dense_ffn", "routed_experts", "active_routed_experts",
    "shared_experts", "gate" (weights, plus the bias when gate_bias), "total", "active",
    "mtp" (extra unique parameters of the MTP modules, embedding and head shared, not in
    "total"). Model cards that quote non-embedding counts subtract "embedding" (and "head").
    """
    check_args(args, "param_counts")
    n_moe = args.n_layers - args.n_dense_layers
    expert = 3 * args.dim * args.moe_inter_dim
    bias = args.n_routed_experts if args.gate_bias else 0
    counts = {
        "embed": args.vocab_size * args.dim,
        "head": args.vocab_size * args.dim,
        "final_norm": args.dim,
        "attention": args.n_layers * attention_params(args),
        "norms": args.n_layers * 2 * args.dim,
        "dense_ffn": args.n_dense_layers * 3 * args.dim * args.inter_dim,
        "routed_experts": n_moe * args.n_routed_experts * expert,
        "active_routed_experts": n_moe * args.n_activated_experts * expert,
        "shared_experts": n_moe * args.n_shared_experts * expert,
        # gate weight plus the per-expert bias b_i when the gates have one (a float32 buffer in
        # dsv3_lab, a Parameter in the official code; counted, as in the published 671B figure)
        "gate": n_moe * (args.n_routed_experts * args.dim + bias),
    }
    common = sum(counts[k] for k in ("embed", "head", "final_norm", "attention", "norms",
                                     "dense_ffn", "shared_experts", "gate"))
    counts["total"] = common + counts["routed_experts"]
    counts["active"] = common + counts["active_routed_experts"]
    counts["embedding"] = counts["embed"]
    # one MTP module: enorm + hnorm + eh_proj + one MoE block + its final norm
    moe_block = (attention_params(args) + 2 * args.dim + (args.n_routed_experts
                 + args.n_shared_experts) * expert + args.n_routed_experts * args.dim + bias)
    counts["mtp"] = args.n_mtp_layers * (2 * args.dim + 2 * args.dim * args.dim + moe_block
                                         + args.dim)
    return counts
