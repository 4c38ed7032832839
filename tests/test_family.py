"""The published configuration files (dsv3_lab/configs, copies of deepseek-ai/DeepSeek-V3
inference/configs): read with the official semantics, counted exactly as transformers counts
them on the meta device, and tabulated beside the published figures."""

import json
import re

import pytest
import torch

from dsv3_lab.config import ModelArgs, param_counts
from dsv3_lab.family import CONFIG_DIR, PUBLISHED, family_table, published_configs
from dsv3_lab.hf import hf_param_count
from dsv3_lab.moe import Gate


def test_every_fixture_is_listed_with_its_source():
    sources = (CONFIG_DIR / "SOURCES.md").read_text()
    files = sorted(p.name for p in CONFIG_DIR.glob("*.json"))
    assert files == sorted(p.config for p in PUBLISHED)
    assert "9b4e9788e4a3a731f7567338ed15d3ec549ce03b" in sources
    for name in files:
        assert re.search(rf"`{re.escape(name)}` \| .* \| commit `[0-9a-f]{{40}}`", sources), name


def test_official_semantics_for_each_published_file():
    """What the official inference code builds from each file (its ModelArgs defaults for the
    omitted fields; Gate bias iff dim == 7168)."""
    c = published_configs()
    lite, v2, v3, v31 = (c[n] for n in ("DeepSeek-V2-Lite", "DeepSeek-V2", "DeepSeek-V3 / R1",
                                         "DeepSeek-V3.1"))
    # V2-Lite: softmax, one group, no query compression, YaRN on (16384 > 4096), mscale 0.707
    assert (lite.score_func, lite.n_expert_groups, lite.gate_bias, lite.q_lora_rank) == (
        "softmax", 1, False, 0)
    assert lite.yarn_enabled and (lite.rope_factor, lite.mscale) == (40.0, 0.707)
    # V2: softmax without a bias, 8 groups of which 3 kept (ranked by their best score)
    assert (v2.score_func, v2.gate_bias, v2.n_expert_groups, v2.n_limited_groups) == (
        "softmax", False, 8, 3)
    assert (v2.route_scale, v2.n_shared_experts, v2.mscale) == (16.0, 2, 1.0)
    # V3 / V3.1: sigmoid with the bias; V3.1 adds UE8M0 scales
    assert (v3.score_func, v3.gate_bias, v3.dtype, v3.scale_fmt) == ("sigmoid", True, "fp8", None)
    assert v31.scale_fmt == "ue8m0" and v31.gate_bias
    for args in c.values():
        assert args.n_mtp_layers == 0 and args.norm_eps == 1e-6


def test_dim_decides_the_bias_and_the_group_ranking_as_in_the_official_gate(tmp_path):
    """A tiny file with several groups: dim != 7168 -> no bias, groups ranked by their best
    score (not the top-2 sum our Python defaults would use)."""
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(dict(vocab_size=64, dim=32, inter_dim=64, moe_inter_dim=16,
                                    n_layers=2, n_heads=2, n_routed_experts=16,
                                    n_activated_experts=2, n_expert_groups=4,
                                    n_limited_groups=1, kv_lora_rank=16, qk_nope_head_dim=8,
                                    qk_rope_head_dim=8, v_head_dim=8)))
    args = ModelArgs.from_json(path)
    gate = Gate(args)
    assert gate.bias is None and args.score_func == "softmax"
    x = torch.randn(400, 32, generator=torch.Generator().manual_seed(0))
    _, idx = gate(x)
    scores = torch.nn.functional.linear(x, gate.weight).softmax(-1).view(400, 4, 4)
    best_group = scores.amax(-1).argmax(-1)  # [N]: the one kept group (n_limited_groups=1)
    assert (idx // 4 == best_group[:, None]).all()
    top2_group = scores.topk(2, -1).values.sum(-1).argmax(-1)
    assert (best_group != top2_group).any()  # the two rules differ on these tokens


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", [p.name for p in PUBLISHED])
def test_param_counts_equal_transformers_on_the_meta_device(name):
    args = published_configs()[name]
    assert param_counts(args)["total"] == hf_param_count(args)


def test_family_table_beside_the_published_figures():
    rows = {r["name"]: r for r in family_table()}
    assert rows["DeepSeek-V3 / R1"]["total"] == 671_026_419_200
    assert rows["DeepSeek-V3 / R1"]["active"] == 37_552_297_472
    assert rows["DeepSeek-V2"]["total"] == 235_741_434_880
    assert rows["DeepSeek-V2-Lite"]["total"] == 15_706_484_224
    for r in rows.values():
        published = float(r["published_total"].rstrip("B")) * 1e9
        assert abs(r["total"] - published) / published < 0.005, r["name"]  # rounding only
        vocab = r["embedding"] + r["head"]
        assert r["total_non_embedding"] == r["total"] - vocab
        assert r["active_non_embedding"] == r["active"] - vocab
        assert r["active_lookup"] == r["active"] - r["embedding"]
        assert r["source"]
