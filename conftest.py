"""Run order for pytest-xdist (`make test`: two workers, one file at a time each).

The slowest files go first, so that the small ones fill in at the end and both workers finish
together. pytest-xdist's own order (most tests first, `--no-loadscope-reorder` in pyproject.toml
turns it off) could leave a 100 s notebook for last on one worker while the other sat idle: over
random orders, the median run was 15 s longer than this one and one in ten 49 s longer. Within
a file the order is unchanged (nbval runs a notebook's cells in order); files not listed keep
their collection order after the listed ones. The list is ordered by the time each file took in
`pytest --durations=0`; a file out of place costs a few seconds, never a failure.
"""

SLOWEST_FIRST = [
    "notebooks/05_load_balancing.ipynb",
    "notebooks/08_tiny_deepseek_v3.ipynb",
    "notebooks/01_rope.ipynb",
    "notebooks/02_mla.ipynb",
    "notebooks/06_multi_token_prediction.ipynb",
    "notebooks/07_fp8_quantization.ipynb",
    "tests/test_portable.py",
    "notebooks/09_expert_parallelism.ipynb",
    "notebooks/10_dualpipe.ipynb",
    "notebooks/04_moe_routing.ipynb",
    "tests/test_pipeline.py",
    "tests/test_parallel.py",
    "notebooks/03_kv_cache_compression.ipynb",
    "tests/test_model.py",
    "notebooks/00_deepseek_v3_at_a_glance.ipynb",
]


def pytest_collection_modifyitems(session, config, items):
    rank = {path: i for i, path in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable
