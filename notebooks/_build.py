"""The single source of the three notebooks: `python notebooks/_build.py` writes them (without
outputs), `python notebooks/_build.py --check` says whether the committed .ipynb files match.
Edit the cells in _nb01.py, _nb02.py and _nb03.py, never the .ipynb files (tests/test_notebooks.py checks they agree).

Environment variables the notebooks read (all optional):
    DIFFEDIT_NOTEBOOK_MODEL   a model folder / hub id instead of the embedded weights/shapes-64
    DIFFEDIT_NOTEBOOK_OUT     where notebook 02 writes its sweep (default: a fresh temp folder)
    DIFFEDIT_SD_WEIGHTS       notebook 03: a diffusers folder, a single checkpoint file or a hub id
    DIFFEDIT_SD_PRESET        notebook 03: what a single file is (sd1, sd2-base, sd2-v)
    DIFFEDIT_SD_DTYPE         notebook 03: fp32, bf16 or fp16 (default: fp16 on CUDA, fp32 on the CPU)
    DIFFEDIT_SD_IMAGE         notebook 03: the photo to edit (default: one generated from text), with
    DIFFEDIT_SD_SOURCE/_TARGET  its caption (default "") and the query
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_notebook

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))  # the cell sources: _nb01.py, _nb02.py, _nb03.py (+ _cells.py)

import _nb01  # noqa: E402
import _nb02  # noqa: E402
import _nb03  # noqa: E402

NOTEBOOKS = {
    "01_how_diffedit_works.ipynb": _nb01.CELLS,
    "02_ablations_and_tradeoffs.ipynb": _nb02.CELLS,
    "03_real_sd_weights.ipynb": _nb03.CELLS,
}


def build(name: str) -> nbformat.NotebookNode:
    """The notebook `name`, without outputs, with stable cell ids (so rebuilding changes nothing)."""
    nb = new_notebook(cells=[])
    for i, cell in enumerate(NOTEBOOKS[name]):
        cell = nbformat.from_dict(dict(cell))
        cell["id"] = f"{name[:2]}-{i:02d}"
        nb.cells.append(cell)
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    nbformat.validate(nb)
    return nb


def text(name: str) -> str:
    return nbformat.writes(build(name)) + "\n"


def main(argv: list[str]) -> int:
    from diffedit.io.files import atomic_write_text

    stale = [name for name in NOTEBOOKS
             if not (HERE / name).is_file() or (HERE / name).read_text(encoding="utf-8") != text(name)]
    if "--check" in argv:
        for name in stale:
            print(f"{name} differs from notebooks/_build.py; run python notebooks/_build.py")
        return 1 if stale else 0
    for name in stale:
        atomic_write_text(HERE / name, text(name), overwrite=True)
        print(f"wrote notebooks/{name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
