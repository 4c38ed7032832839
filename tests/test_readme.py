"""README.md cannot drift from the notebooks: every number in the results tables appears in the
stored outputs of the notebook the row cites, and every figure it shows is written by a notebook.

A results row cites its notebook as "(NN)" in its first cell; each number of its "measured here"
cell (the second) must occur in that notebook's stored outputs (commas in thousands ignored)."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
NUMBER = re.compile(r"(?<![\w.])[-−+]?\d[\d,]*(?:\.\d+)?(?:e[-−+]?\d+)?")


def notebook_text(nn: str) -> tuple[str, str]:
    """(stored outputs, code sources) of notebook NN."""
    (path,) = ROOT.glob(f"notebooks/{nn}_*.ipynb")
    cells = json.loads(path.read_text())["cells"]
    outputs, sources = [], []
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        sources.append("".join(cell["source"]))
        for out in cell.get("outputs", []):
            text = out.get("text") or out.get("data", {}).get("text/plain", "")
            outputs.append("".join(text) if isinstance(text, list) else text)
    return "\n".join(outputs), "\n".join(sources)


def results_rows() -> list[tuple[str, str, str]]:
    """(notebook NN, row label, measured cell) of every README table row that cites '(NN)'."""
    rows = []
    for line in README.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or set(cells[0]) <= {"-", " "}:
            continue
        m = re.search(r"\((\d\d)\)\s*$", cells[0])
        if m:
            rows.append((m.group(1), cells[0], cells[1]))
    return rows


def normalise(s: str) -> str:
    return s.replace(",", "").replace("−", "-").lstrip("+")


ROWS = results_rows()


def test_readme_has_results_rows():
    assert len(ROWS) >= 10


@pytest.mark.parametrize("nn,label,measured", ROWS, ids=[r[1][:40] for r in ROWS])
def test_every_readme_number_is_in_the_cited_notebooks_outputs(nn, label, measured):
    outputs = normalise(notebook_text(nn)[0])
    numbers = [normalise(n) for n in NUMBER.findall(measured)]
    missing = [n for n in numbers if n not in outputs]
    assert not missing, f"README row {label!r}: {missing} not in notebook {nn}'s outputs"


FIGS = sorted(set(re.findall(r"figures/(\d\d)_(\w+)\.png", README)))


@pytest.mark.parametrize("nn,name", FIGS, ids=[f"{a}_{b}" for a, b in FIGS])
def test_every_readme_figure_exists_and_is_written_by_its_notebook(nn, name):
    assert (ROOT / "figures" / f"{nn}_{name}.png").exists()
    sources = notebook_text(nn)[1]
    assert f"{nn}_{name}" in sources, f"notebook {nn} never saves figures/{nn}_{name}.png"
