"""The published DeepSeek-V3-architecture configurations and their parameter counts.

`published_configs()` reads the verbatim copies of DeepSeek's inference/configs/*.json kept in
dsv3_lab/configs (sources: dsv3_lab/configs/SOURCES.md) with the official semantics
(`ModelArgs.from_json`). `family_table()` counts each one with `param_counts` and puts the
figures its authors published beside it. Counting conventions:

    total      every weight of the main model: embedding, output head, all routed experts
               (the gate's bias b_i counted where the gates have one); MTP modules excluded
    activated  the weights one token passes through: embedding row lookups are counted as the
               whole embedding matrix, as the published figures do, plus n_activated_experts of
               the routed experts per MoE layer
    activated, embedding as a lookup: the same without the embedding matrix (a token reads
               one row of it), the head still counted
    non-embedding figures subtract the embedding and the head (each vocab_size · dim)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dsv3_lab.config import ModelArgs, param_counts

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class Published:
    """A published family member: its config file and the figures its authors give."""

    name: str
    config: str  # file in dsv3_lab/configs
    total: str  # as published
    activated: str
    source: str


#: Figures as their authors published them (rounded as printed there).
PUBLISHED = (
    Published("DeepSeek-V2-Lite", "config_16B.json", "15.7B", "2.4B",
              "DeepSeek-V2 paper (arXiv 2405.04434), Appendix B"),
    Published("DeepSeek-V2", "config_236B.json", "236B", "21B",
              "DeepSeek-V2 paper (arXiv 2405.04434), abstract; DeepSeek-V3 README.md table"),
    Published("DeepSeek-V3 / R1", "config_671B.json", "671B", "37B",
              "DeepSeek-V3 README.md and report (arXiv 2412.19437) abstract; README_WEIGHTS.md: "
              "36.7B activated incl. 0.9B embedding + 0.9B head"),
    Published("DeepSeek-V3.1", "config_v3.1.json", "671B", "37B",
              "same architecture as V3 (config_v3.1.json adds scale_fmt ue8m0)"),
)


def published_configs() -> dict[str, ModelArgs]:
    """{name: ModelArgs} of each file in dsv3_lab/configs, read as the official code reads it."""
    return {p.name: ModelArgs.from_json(CONFIG_DIR / p.config) for p in PUBLISHED}


def family_table() -> list[dict]:
    """One row per published member: counts (ints) beside the published figures (strings)."""
    rows = []
    for p in PUBLISHED:
        args = ModelArgs.from_json(CONFIG_DIR / p.config)
        c = param_counts(args)
        vocab = c["embedding"] + c["head"]
        rows.append(dict(
            name=p.name, config=p.config, score_func=args.score_func, gate_bias=args.gate_bias,
            total=c["total"], active=c["active"], total_non_embedding=c["total"] - vocab,
            active_lookup=c["active"] - c["embedding"], active_non_embedding=c["active"] - vocab,
            embedding=c["embedding"], head=c["head"],
            published_total=p.total, published_active=p.activated, source=p.source,
        ))
    return rows
