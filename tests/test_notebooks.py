"""The notebooks in notebooks/ run from top to bottom without error, in a python3 kernel of this
interpreter (ipykernel's native kernel, whatever kernelspecs are installed elsewhere), on the
embedded model (DIFFEDIT_NOTEBOOK_MODEL overrides it, as in the notebooks). Executed copies go
to a temporary folder; the committed .ipynb files are never written. Notebook 03 runs twice:
without weights (it must stop gracefully, offline) and with a random tiny diffusers-layout model
standing in for real SD weights, so its editing cells are executed too.

The committed notebooks carry no outputs and are exactly what notebooks/_build.py generates."""

import importlib.util
import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import NATIVE_KERNEL_NAME, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from reference_models import build_reference

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
CELL_TIMEOUT = 900          # seconds per cell; a whole notebook takes a few minutes on a CPU
EXECUTED = ["01_how_diffedit_works.ipynb", "02_ablations_and_tradeoffs.ipynb", "03_real_sd_weights.ipynb"]
NOTEBOOK_ENV = ("DIFFEDIT_SD_WEIGHTS", "DIFFEDIT_SD_PRESET", "DIFFEDIT_SD_IMAGE", "DIFFEDIT_SD_SOURCE",
                "DIFFEDIT_SD_TARGET", "DIFFEDIT_SD_DTYPE", "DIFFEDIT_NOTEBOOK_OUT", "HF_HUB_CACHE")


def kernel_manager() -> AsyncKernelManager:
    """ipykernel's native python3 kernel: its command is this interpreter (sys.executable), not a
    `python` found on PATH or a python3 kernelspec of another environment."""
    specs = KernelSpecManager(kernel_dirs=[], ensure_native_kernel=True)
    return AsyncKernelManager(kernel_name=NATIVE_KERNEL_NAME, kernel_spec_manager=specs)


def execute(name: str, workdir: Path) -> tuple[nbformat.NotebookNode, float]:
    """Run notebooks/<name> in `workdir`, save the executed copy there; (notebook, seconds)."""
    committed = NOTEBOOKS / name
    before = committed.read_bytes()
    nb = nbformat.reads(before.decode("utf-8"), as_version=4)
    client = NotebookClient(nb, km=kernel_manager(), timeout=CELL_TIMEOUT, allow_errors=False,
                            resources={"metadata": {"path": str(workdir)}})
    t0 = time.perf_counter()
    client.execute(cleanup_kc=True)     # raises CellExecutionError on the first failing cell; shuts the kernel down
    seconds = time.perf_counter() - t0
    nbformat.write(nb, workdir / name)
    assert committed.read_bytes() == before, f"executing {name} changed the committed file"
    return nb, seconds


def text_outputs(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.output_type != "error", f"cell {cell.id} raised {out.get('ename')}: {out.get('evalue')}"
            if out.output_type == "stream":
                parts.append(out.text)
            elif "text/plain" in out.get("data", {}):
                parts.append(out.data["text/plain"])
    return "".join(parts)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A scratch folder as the kernel's working directory and TMPDIR; notebook inputs cleared."""
    for name in NOTEBOOK_ENV:
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setenv("DIFFEDIT_NOTEBOOK_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # One OpenMP thread: the embedded model is too small to gain from threads, and on a busy machine
    # two spinning threads made each UNet call ~11x slower (measured: 4.8 s vs 0.42 s per call).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return tmp_path


# ---------------------------------------------------------------------- static checks (fast)

def load_builder():
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOKS / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_notebook_is_executed_here_and_built_from_the_source():
    builder = load_builder()
    on_disk = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert on_disk == sorted(EXECUTED) == sorted(builder.NOTEBOOKS)
    for name in on_disk:
        assert (NOTEBOOKS / name).read_text(encoding="utf-8") == builder.text(name), \
            f"{name} differs from notebooks/_build.py; run python notebooks/_build.py"


@pytest.mark.parametrize("name", EXECUTED)
def test_committed_notebooks_have_no_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name} has no code cells"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"{name}: cell {cell.id} has outputs"


def test_kernel_is_this_interpreter(workdir):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys; print(sys.executable)")])
    NotebookClient(nb, km=kernel_manager(), timeout=120,
                   resources={"metadata": {"path": str(workdir)}}).execute(cleanup_kc=True)
    assert nb.cells[0].outputs[0].text.strip() == sys.executable


# ---------------------------------------------------------------------- execution

@pytest.mark.slow
def test_01_how_diffedit_works(workdir):
    nb, seconds = execute("01_how_diffedit_works.ipynb", workdir)
    out = text_outputs(nb)
    print(f"notebook 01: {seconds:.1f} s")
    assert "re-derived exactly" in out and "y_0 == x_0 exactly" in out
    assert "background PSNR" in out and "unet_samples" in out


@pytest.mark.slow
def test_02_ablations_and_tradeoffs(workdir):
    nb, seconds = execute("02_ablations_and_tradeoffs.ipynb", workdir)
    out = text_outputs(nb)
    print(f"notebook 02: {seconds:.1f} s")
    assert "second call: 0 run" in out
    sweep = workdir / "out" / "sweep"
    assert (sweep / "results.csv").is_file()
    figures = sorted(p.name for p in (sweep / "figures").glob("*.png"))
    assert len(figures) == 4, figures


@pytest.mark.slow
def test_03_real_sd_weights_without_weights_stops_gracefully(workdir, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(workdir / "empty-hf-home"))    # no cached checkpoint, whatever this machine has
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb, seconds = execute("03_real_sd_weights.ipynb", workdir)
    out = text_outputs(nb)
    print(f"notebook 03 (no weights): {seconds:.1f} s")
    assert "No Stable Diffusion weights found" in out
    assert out.count("skipped: no weights") == 4
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in out


@pytest.mark.slow
def test_03_real_sd_weights_with_weights_edits(workdir, monkeypatch):
    """A random tiny model in diffusers layout stands in for SD weights: the editing cells run."""
    folder = build_reference("tiny", workdir / "tiny-sd", seed=0)[0]
    monkeypatch.setenv("DIFFEDIT_SD_WEIGHTS", str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb, seconds = execute("03_real_sd_weights.ipynb", workdir)
    out = text_outputs(nb)
    print(f"notebook 03 (tiny stand-in weights): {seconds:.1f} s")
    assert "skipped" not in out and "No Stable Diffusion weights" not in out
    assert f"weights: {folder}" in out and "edited in" in out
    images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert images >= 3, f"expected the photo, the edit panel and the difference maps, got {images} images"
