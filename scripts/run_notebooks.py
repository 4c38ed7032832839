"""Re-execute notebooks in place, top to bottom in a fresh kernel (`make notebooks`).

Outputs of cells marked `# NBVAL_IGNORE_OUTPUT` (timings, versions, progress) change from run
to run. They are kept as stored while the cell's source is unchanged, so running this twice
leaves git clean; pass --refresh-volatile (`make notebooks-refresh`) to re-measure them too.
Prints each notebook's wall time.

    python scripts/run_notebooks.py [--refresh-volatile] notebooks/01_rope.ipynb ...
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

MARKER = "# NBVAL_IGNORE_OUTPUT"


def is_volatile(cell) -> bool:
    return cell.cell_type == "code" and any(
        line.strip() == MARKER for line in cell.source.splitlines()
    )


def merge_streams(outputs: list) -> list:
    """Join consecutive stdout (or stderr) chunks: the kernel may split one print differently
    from run to run, which would change the stored notebook without changing its text."""
    merged = []
    for out in outputs:
        if (out.get("output_type") == "stream" and merged
                and merged[-1].get("output_type") == "stream"
                and merged[-1].get("name") == out.get("name")):
            merged[-1]["text"] += out["text"]
        else:
            merged.append(out)
    return merged


def run(path: Path, refresh_volatile: bool) -> float:
    old = nbformat.read(path, as_version=4)
    nb = copy.deepcopy(old)
    # --log-level=ERROR: ipykernel's start-up warnings would otherwise land in a random cell
    client = NotebookClient(nb, timeout=600, kernel_name="python3", record_timing=False,
                            extra_arguments=["--log-level=ERROR"],
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    if not refresh_volatile:
        stored = {c.source: c for c in old.cells if is_volatile(c) and c.get("outputs")}
        for cell in nb.cells:
            if is_volatile(cell) and cell.source in stored:
                cell.outputs = stored[cell.source].outputs
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = merge_streams(cell.outputs)
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, path)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--refresh-volatile", action="store_true")
    args = parser.parse_args()
    if args.refresh_volatile:  # the kernel inherits it: savefig(..., volatile=True) rewrites
        os.environ["DSV3_REFRESH_VOLATILE"] = "1"
    for path in args.notebooks:
        if path.suffix != ".ipynb" or not path.exists():
            print(f"expected an existing .ipynb file, got {path}", file=sys.stderr)
            return 2
        seconds = run(path, args.refresh_volatile)
        print(f"{path}: executed in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
