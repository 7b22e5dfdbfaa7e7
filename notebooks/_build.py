"""The single source of the three notebooks. `python notebooks/_build.py` builds each notebook from
its cells (_nb01.py, _nb02.py, _nb03.py), executes it on the embedded model and commits the executed
copy, with its figures, so that the notebooks render where the repository is browsed; `--check`
says which committed notebooks are stale. Edit the cells, never the .ipynb files.

Each executed notebook carries a stamp in its metadata ("diffedit"): the SHA-256 of the source it
was built from (the notebook without outputs) and of the model it ran on (every file of
weights/shapes-64). tests/test_notebooks.py fails when a stamp is stale, i.e. when the cells or the
model changed since the notebook was executed, and re-executes every notebook from its source.

Notebook 03 is executed here without weights (offline, no hub cache): it shows how it stops and
what to pass. Environment variables the notebooks read (all optional):
    DIFFEDIT_NOTEBOOK_MODEL   a model folder / hub id instead of the embedded weights/shapes-64
    DIFFEDIT_NOTEBOOK_OUT     where notebook 02 writes its sweep (default: a fresh temp folder)
    DIFFEDIT_SD_WEIGHTS       notebook 03: a diffusers folder, a single checkpoint file or a hub id
    DIFFEDIT_SD_PRESET        notebook 03: what a single file is (sd1, sd2-base, sd2-v)
    DIFFEDIT_SD_DTYPE         notebook 03: fp32, bf16 or fp16 (default: fp16 on CUDA, fp32 on the CPU)
    DIFFEDIT_SD_IMAGE         notebook 03: the photo to edit (default: one generated from text), with
    DIFFEDIT_SD_SOURCE/_TARGET  its caption (default "") and the query
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_notebook

HERE = Path(__file__).resolve().parent
MODEL = HERE.parent / "weights" / "shapes-64"
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))  # the cell sources: _nb01.py, _nb02.py, _nb03.py (+ _cells.py)

import _nb01
import _nb02
import _nb03

NOTEBOOKS = {
    "01_how_diffedit_works.ipynb": _nb01.CELLS,
    "02_ablations_and_tradeoffs.ipynb": _nb02.CELLS,
    "03_real_sd_weights.ipynb": _nb03.CELLS,
}
CELL_TIMEOUT = 900  # seconds per cell; a whole notebook takes a few minutes on a CPU
NOTEBOOK_ENV = ("DIFFEDIT_NOTEBOOK_MODEL", "DIFFEDIT_SD_WEIGHTS", "DIFFEDIT_SD_PRESET", "DIFFEDIT_SD_IMAGE",
                "DIFFEDIT_SD_SOURCE", "DIFFEDIT_SD_TARGET", "DIFFEDIT_SD_DTYPE", "DIFFEDIT_NOTEBOOK_OUT",
                "HF_HUB_CACHE")


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
    """The notebook without outputs, as text: what its stamp's "source" hashes."""
    return nbformat.writes(build(name)) + "\n"


def model_hash(folder: Path = MODEL) -> str:
    """SHA-256 over every file of the model folder (relative path and bytes, in sorted order)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def stamp(name: str) -> dict:
    return {"source_sha256": hashlib.sha256(text(name).encode("utf-8")).hexdigest(), "model_sha256": model_hash()}


def stale(name: str) -> str | None:
    """Why the committed notebook `name` must be rebuilt, or None when it is up to date."""
    path = HERE / name
    if not path.is_file():
        return "it is missing"
    committed = nbformat.read(path, as_version=4).metadata.get("diffedit", {})
    expected = stamp(name)
    if committed.get("source_sha256") != expected["source_sha256"]:
        return "its cells changed since it was executed"
    if committed.get("model_sha256") != expected["model_sha256"]:
        return "the embedded model changed since it was executed"
    return None


def kernel_manager():
    """ipykernel's native python3 kernel: its command is this interpreter (sys.executable), not a
    `python` found on PATH or a python3 kernelspec of another environment."""
    from jupyter_client.kernelspec import NATIVE_KERNEL_NAME, KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    specs = KernelSpecManager(kernel_dirs=[], ensure_native_kernel=True)
    return AsyncKernelManager(kernel_name=NATIVE_KERNEL_NAME, kernel_spec_manager=specs)


def execute(nb: nbformat.NotebookNode, workdir: Path) -> float:
    """Run `nb` in place, in a kernel whose working directory is `workdir`; seconds taken.
    Raises nbclient's CellExecutionError on the first failing cell."""
    from nbclient import NotebookClient

    client = NotebookClient(nb, km=kernel_manager(), timeout=CELL_TIMEOUT, allow_errors=False,
                            resources={"metadata": {"path": str(workdir)}})
    t0 = time.perf_counter()
    client.execute(cleanup_kc=True)
    return time.perf_counter() - t0


def executed(name: str) -> nbformat.NotebookNode:
    """The notebook `name` built, executed in a scratch folder on the embedded model, and stamped."""
    nb = build(name)
    with tempfile.TemporaryDirectory(prefix="diffedit-notebook-") as scratch:
        saved = dict(os.environ)
        for key in NOTEBOOK_ENV:
            os.environ.pop(key, None)
        os.environ.update(DIFFEDIT_NOTEBOOK_OUT=str(Path(scratch) / "out"), OMP_NUM_THREADS="1",
                          HF_HOME=str(Path(scratch) / "empty-hf-home"), HF_HUB_OFFLINE="1",
                          MPLBACKEND="module://matplotlib_inline.backend_inline")
        try:
            seconds = execute(nb, Path(scratch))
        finally:
            os.environ.clear()
            os.environ.update(saved)
    nb.metadata["diffedit"] = {**stamp(name), "seconds": round(seconds, 1)}
    nbformat.validate(nb)
    return nb


def main(argv: list[str]) -> int:
    from diffedit.io.files import atomic_write_text

    reasons = {name: reason for name in NOTEBOOKS if (reason := stale(name))}
    if "--check" in argv:
        for name, reason in reasons.items():
            print(f"{name} is stale: {reason}; run python notebooks/_build.py")
        return 1 if reasons else 0
    for name, reason in reasons.items():
        print(f"executing notebooks/{name} ({reason}) ...", flush=True)
        nb = executed(name)
        atomic_write_text(HERE / name, nbformat.writes(nb) + "\n", overwrite=True)
        print(f"wrote notebooks/{name} in {nb.metadata['diffedit']['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
