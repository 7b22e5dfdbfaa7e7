"""What is shown with the embedded model says what the code computes: the shipped model card is
the card the training writes (it said 3.8 M parameters for 3,745,579, and lacked the loss line and
what happens to unknown words), and notebook 02 counts edits, not rows (it printed "for 100
edits" for 10 edits of 10 runs)."""

import re
from pathlib import Path

import nbformat

from diffedit.checkpoints.loading import load_model
from diffedit.shapes.card import model_card
from diffedit.shapes.train_config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "weights" / "shapes-64"


def _without_machine_lines(card: str) -> list[str]:
    """The card's lines, but the two naming the torch build, the threads, the minutes and the CPU."""
    lines = card.splitlines()
    seed = next(i for i, line in enumerate(lines) if line.startswith("- Seed "))
    return lines[:seed] + lines[seed + 2:]


def test_the_shipped_card_is_the_card_the_training_writes():
    model = load_model(MODEL)
    n_params = sum(p.numel() for m in (model.unet, model.vae, model.text_encoder) for p in m.parameters())
    shipped = (MODEL / "README.md").read_text(encoding="utf-8")
    minutes = float(re.search(r", (\d+) minutes on", shipped).group(1))
    written = model_card(TrainConfig(), n_params, minutes)
    assert _without_machine_lines(shipped) == _without_machine_lines(written)
    assert f"A {n_params / 1e6:.1f} M-parameter" in shipped and "UnknownWordWarning" in shipped


def test_notebook_02_counts_edits_not_rows():
    nb = nbformat.read(REPO / "notebooks" / "02_ablations_and_tradeoffs.ipynb", as_version=4)
    count = int(re.search(r"^COUNT = (\d+)", next(c.source for c in nb.cells if "COUNT =" in c.source), re.M).group(1))
    cell = next(c for c in nb.cells if c.cell_type == "code" and "report = evaluate(" in c.source)
    text = "".join(o.text for o in cell.outputs if o.output_type == "stream")
    runs = len(text.splitlines()) - 2                      # the table's rows, without its header and the last line
    assert f"for {count} edits x {runs} runs" in text.splitlines()[-1], text
