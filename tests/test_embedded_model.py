"""The embedded model (weights/shapes-64): it loads strictly like any SD checkpoint, fits the size
budget, reproduces a stored result, and the training code that made it runs end to end.

The stored result (tests/data/embedded_reference.json) is regenerated, after retraining only, with
    python tests/test_embedded_model.py --regenerate
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference_models import run_cli

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "weights" / "shapes-64"
REFERENCE = Path(__file__).parent / "data" / "embedded_reference.json"


def reference_result() -> dict:
    """A small fingerprint of the model: UNet output on a fixed input and one short DiffEdit edit."""
    from diffedit.pipeline import DiffEditPipeline
    from diffedit.shapes.world import heldout_edits

    pipe = DiffEditPipeline.from_pretrained(MODEL)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    context = pipe.encode_prompt(["a red circle on a gray background", ""])
    with torch.no_grad():
        eps = pipe.model.unet(x, torch.tensor([500, 500]), context)
    edit = heldout_edits(1)[0]
    result = pipe(edit.source_image, source_prompt=edit.source_caption, target_prompt=edit.target_caption,
                  num_inference_steps=10, num_mask_samples=4, generator=torch.Generator().manual_seed(0))
    image = np.asarray(result.images[0], dtype=np.float64)
    return {"eps_first": eps.flatten()[:8].tolist(), "eps_mean_abs": eps.abs().mean().item(),
            "mask_area": result.mask.area[0].item(), "edit_mean_rgb": image.mean(axis=(0, 1)).tolist(),
            "edit_target": edit.target_caption}


def test_embedded_model_loads_strictly_and_fits_budget():
    from diffedit.checkpoints.loading import load_model

    size = sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file())
    assert size <= 25 * 2**20, f"embedded model is {size / 2**20:.1f} MiB, budget 25 MiB"
    model = load_model(MODEL)
    assert model.config.resolution == 64 and model.config.vae.downsample_factor == 4
    assert model.tokenizer.max_length == model.config.text_encoder.max_length
    assert (MODEL / "README.md").is_file() and (MODEL / "training_log.txt").is_file()
    # the reference library reads the same folder (diffusers layout, strict)
    from diffusers import UNet2DConditionModel
    ref = UNet2DConditionModel.from_pretrained(MODEL / "unet")
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([321])
    context = torch.randn(1, model.config.text_encoder.max_length, model.config.text_encoder.width)
    with torch.no_grad():
        ours, theirs = model.unet(x, t, context), ref(x, t, context).sample
    assert (ours - theirs).abs().max().item() < 1e-4 * theirs.abs().max().item()


def test_embedded_model_reproduces_stored_result():
    stored = json.loads(REFERENCE.read_text())
    now = reference_result()
    assert now["edit_target"] == stored["edit_target"]
    np.testing.assert_allclose(now["eps_first"], stored["eps_first"], rtol=1e-4, atol=1e-5)
    assert now["eps_mean_abs"] == pytest.approx(stored["eps_mean_abs"], rel=1e-4)
    assert now["mask_area"] == pytest.approx(stored["mask_area"], abs=0.02)
    np.testing.assert_allclose(now["edit_mean_rgb"], stored["edit_mean_rgb"], atol=0.5)


def test_short_training_run_end_to_end(tmp_path):
    """A few steps of every stage, then the saved folder loads and edits like the shipped one."""
    from diffedit.pipeline import DiffEditPipeline
    from diffedit.shapes.training import QUICK, train
    from diffedit.shapes.world import heldout_edits

    out = train(tmp_path / "model", QUICK, threads=1)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "a staging file was left behind"
    log = (out / "training_log.txt").read_text()
    assert "vae  step" in log and "unet step" in log and "scaling_factor" in log
    pipe = DiffEditPipeline.from_pretrained(out)
    edit = heldout_edits(1)[0]
    result = pipe(edit.source_image, source_prompt=edit.source_caption, target_prompt=edit.target_caption,
                  num_inference_steps=4, num_mask_samples=2)
    assert result.images[0].size == (64, 64)
    assert pipe.counters.vae_encodes == 1


def test_training_is_reproducible_from_seed(tmp_path):
    from diffedit.shapes.training import QUICK, train

    _same_weights(train(tmp_path / "a", QUICK, threads=1), train(tmp_path / "b", QUICK, threads=1))


def demo_arguments() -> list[str]:
    """The `diffedit edit` arguments of `make demo`, read from the Makefile (one source of truth)."""
    recipe = (REPO / "Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    command = shlex.split(recipe.split("diffedit edit", 1)[1].split("\n\t@", 1)[0].replace("\\\n", " "))
    return [a for a in command if "$(" not in a and a != "--overwrite"]


def test_demo_turns_the_red_circle_blue_and_keeps_the_rest(tmp_path, capsys):
    """`make demo`'s edit, scored by the world's checker against the scene the example was drawn from."""
    from diffedit.shapes.check import check_edit
    from diffedit.shapes.world import Background, Scene, SceneObject, edit_scene, render

    scene = Scene((SceneObject("circle", "red", (20, 30), 11), SceneObject("square", "green", (46, 34), 10)),
                  Background("plain", "gray"), 0)
    args = demo_arguments()
    image = REPO / args[0]
    assert np.array_equal(render(scene)[0], np.asarray(Image.open(image).convert("RGB")))
    edit = edit_scene(scene, 0, "colour", "blue")
    assert args[1:5] == ["--source", edit.source_caption, "--target", edit.target_caption]
    outputs = ["--out", tmp_path / "edit.png", "--mask-out", tmp_path / "mask.png", "--panel-out", tmp_path / "panel.png"]
    code, _, err = run_cli(["edit", image, *args[1:5], *outputs, "--quiet"], capsys)
    assert code == 0, err
    edited = np.asarray(Image.open(tmp_path / "edit.png").convert("RGB"))
    check = check_edit(edited, edit)
    assert check.success, f"the demo found a {check.colour} {check.shape}"
    background = edit.background_mask
    mse = ((edited[background].astype(float) - edit.source_image[background]) ** 2).mean()
    assert 10 * np.log10(255 ** 2 / mse) >= 30.0                       # the rest untouched: >= 30 dB
    panel = Image.open(tmp_path / "panel.png")
    assert panel.width >= 3 * 256 and panel.height > 256              # enlarged for a person, with text lines


def _same_weights(a, b) -> None:
    from safetensors.torch import load_file

    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"):
        ta, tb = load_file(a / part), load_file(b / part)
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta), part


@pytest.mark.parametrize("stop_at", ["autoencoder", 2])
def test_resumed_training_gives_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch, stop_at):
    """Interrupted after a checkpoint (the autoencoder's, or UNet step 2 of 3), then `resume`: bit-identical."""
    from diffedit.shapes import training
    from diffedit.shapes.training import QUICK, train

    whole = train(tmp_path / "whole", QUICK, threads=1)
    save = training.save_checkpoint

    def save_then_stop(path, state):
        save(path, state)
        if state.get("step", "autoencoder") == stop_at:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "resumed", QUICK, threads=1)
    assert not (tmp_path / "resumed").exists() and (tmp_path / ".resumed.checkpoint.pt").is_file()
    monkeypatch.setattr(training, "save_checkpoint", save)
    resumed = train(tmp_path / "resumed", QUICK, threads=1, resume=True)
    _same_weights(whole, resumed)
    log = (resumed / "training_log.txt").read_text()
    assert "resuming from .resumed.checkpoint.pt" in log and log.count("training config") == 1
    assert not (tmp_path / ".resumed.checkpoint.pt").exists()


def test_snapshots_are_loadable_models(tmp_path):
    from dataclasses import replace

    from diffedit.pipeline import DiffEditPipeline
    from diffedit.shapes.training import QUICK, train

    train(tmp_path / "m", replace(QUICK, snapshot_every=2), threads=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m-step2"]   # step 2 of 3; the last is `m` itself
    assert DiffEditPipeline.from_pretrained(tmp_path / "m-step2").config.resolution == 64


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path, monkeypatch, capsys):
    from dataclasses import replace

    from diffedit.errors import ParameterError
    from diffedit.shapes import training
    from diffedit.shapes.training import QUICK, train

    def stop(path, state):
        raise KeyboardInterrupt

    save = training.save_checkpoint
    monkeypatch.setattr(training, "save_checkpoint", lambda path, state: (save(path, state), stop(path, state)))
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "m", QUICK, threads=1)
    monkeypatch.setattr(training, "save_checkpoint", save)
    with pytest.raises(ParameterError, match="another training config"):
        train(tmp_path / "m", replace(QUICK, unet_steps=5), threads=1, resume=True)
    code = training.main(["--out", str(tmp_path / "m"), "--quick", "--unet-steps", "5", "--resume", "--threads", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "another training config" in err[0]   # one sentence, no traceback
    assert (tmp_path / ".m.checkpoint.pt").is_file() and not (tmp_path / "m").exists()   # nothing damaged


def test_eval_shapes_small_run(tmp_path):
    """`eval shapes` is a built-in sweep: its rows are the sweep's, its summary one line per run."""
    from diffedit.pipeline import DiffEditPipeline
    from diffedit.research.table import read_rows
    from diffedit.shapes.eval import EvalSettings, evaluate, write_report

    pipe = DiffEditPipeline.from_pretrained(MODEL)
    report = evaluate(pipe, EvalSettings(count=2, num_inference_steps=8, num_mask_samples=2,
                                         strengths=(0.4,), thresholds=(0.3,)), tmp_path)
    runs = [s["run"] for s in report.summary]
    assert runs == ["diffedit", "r=0.4", "threshold=0.3", "no_mask", "no_encode", "sdedit"]
    assert len(report.rows) == 2 * len(runs) == len(read_rows(tmp_path))
    for row in report.rows:
        assert row["bg_psnr_scene"] > 5.0
        assert (0.0 <= row["mask_iou"] <= 1.0) if row["ablation"] in ("none", "no_encode") else "mask_iou" not in row
    csv_path, json_path = write_report(report, tmp_path)
    assert len(csv_path.read_text().splitlines()) == 1 + len(runs)
    assert json.loads(json_path.read_text())["summary"][0]["run"] == "diffedit"
    again = evaluate(pipe, report.settings, tmp_path)   # a finished evaluation resumes to the same table
    assert again.summary == report.summary


if __name__ == "__main__":
    if sys.argv[1:] == ["--regenerate"]:
        REFERENCE.parent.mkdir(exist_ok=True)
        REFERENCE.write_text(json.dumps(reference_result(), indent=1) + "\n")
        print(f"wrote {REFERENCE}")


def test_make_demo_edit_changes_the_shape_and_keeps_the_rest(tmp_path):
    """The edit `make demo` runs (its arguments read from the Makefile): the files appear, the
    pixels change inside the mask and stay close to the input outside it."""
    import re
    import shlex

    from PIL import Image

    from diffedit.cli import main

    recipe = (REPO / "Makefile").read_text(encoding="utf-8").split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    command = " ".join(line.strip().rstrip("\\") for line in recipe.splitlines()[1:] if "diffedit edit" in line
                       or line.startswith("\t\t"))
    args = shlex.split(command.split("diffedit edit", 1)[1])
    args = [a.replace("$(DEMO)", str(tmp_path)) for a in args]
    image = REPO / args[0]
    assert re.search(r"circle", args[args.index("--source") + 1]) and "--target" in args
    assert main(["edit", str(image), *args[1:]]) == 0
    edit = np.asarray(Image.open(tmp_path / "edit.png").convert("RGB"), dtype=np.float32)
    mask = np.asarray(Image.open(tmp_path / "mask.png").convert("L")) > 127
    source = np.asarray(Image.open(image).convert("RGB").resize(edit.shape[1::-1]), dtype=np.float32)
    assert (tmp_path / "panel.png").is_file() and 0.02 < mask.mean() < 0.5
    change = np.abs(edit - source).mean(axis=-1)
    assert change[mask].mean() > 3 * change[~mask].mean()
    assert change[~mask].mean() < 10  # 8-bit levels: the background is kept


def test_model_card_names_the_cpu_kind_threads_and_steps():
    """The weights' last bits depend on CPU kind and thread count: the card says both."""
    from diffedit.devices import cpu_name
    from diffedit.shapes.card import model_card
    from diffedit.shapes.training import TrainConfig
    card = model_card(TrainConfig(unet_steps=1234, loss_weight="simple"), 3_750_000, 97.0)
    assert cpu_name() in card and f"{torch.get_num_threads()} CPU threads" in card
    assert "1234 steps" in card and "97 minutes" in card
    assert "weighted over t:\n  simple" in card


def test_the_shipped_model_was_trained_with_the_default_config():
    """`python -m diffedit.shapes.training --out weights/shapes-64` is the recipe of the shipped weights:
    the config in its log's first line equals the default in every field that shapes the weights."""
    import re
    from dataclasses import fields

    from diffedit.shapes.training import TrainConfig

    first = (MODEL / "training_log.txt").read_text().splitlines()[0]
    logged = dict(re.findall(r"(\w+)=([^,()]+)", first.split("training config: TrainConfig(", 1)[1]))
    logged.setdefault("loss_weight", "'simple'")   # logs from before the field trained with the simple loss
    bookkeeping = {"log_every", "checkpoint_every", "snapshot_every"}   # they do not change a bit of the weights
    default = {f.name: repr(getattr(TrainConfig(), f.name)) for f in fields(TrainConfig) if f.name not in bookkeeping}
    assert {k: v for k, v in logged.items() if k not in bookkeeping} == default


def test_loss_weights_over_t():
    """Each weighting has mean 1 over t; simple is flat, p2 and v-capped grow with the noise, v capped at 10x."""
    from diffedit.errors import ParameterError
    from diffedit.models.config import PRESETS
    from diffedit.sampler import DDIM
    from diffedit.shapes.training import LOSS_WEIGHTS, loss_weights

    alpha_bar = DDIM(PRESETS["sd1"].scheduler).alpha_bar
    for name in LOSS_WEIGHTS:
        w = loss_weights(name, alpha_bar)
        assert w.shape == alpha_bar.shape and w.dtype == torch.float32
        assert w.mean().item() == pytest.approx(1.0, abs=1e-6) and (w >= 0).all()
    assert torch.equal(loss_weights("simple", alpha_bar), torch.ones(1000))
    p2, v = loss_weights("p2", alpha_bar), loss_weights("v-capped", alpha_bar)
    assert (p2.diff() > 0).all() and (v.diff() >= 0).all()
    assert p2[0] < 0.01 * p2[-1]                                   # near-clean steps weigh almost nothing
    ratio = v / (1 / alpha_bar)                                    # proportional to 1 / alpha_bar below the cap
    below = 1 / alpha_bar < 10
    assert torch.allclose(ratio[below], ratio[0].expand(int(below.sum())), rtol=1e-5)
    assert v.max() / v.min() == pytest.approx(10.0 * alpha_bar[0].item(), rel=1e-5)
    with pytest.raises(ParameterError, match="unknown loss weight 'snr'; choose one of simple, p2, v-capped"):
        loss_weights("snr", alpha_bar)


def test_weighted_training_is_reproducible_resumable_and_differs(tmp_path, monkeypatch):
    """--loss-weight changes the weights; a weighted run interrupted at UNet step 2 resumes to the same bits."""
    from dataclasses import replace

    from diffedit.shapes import training
    from diffedit.shapes.training import QUICK, train
    from safetensors.torch import load_file

    weighted = replace(QUICK, loss_weight="v-capped")
    whole = train(tmp_path / "whole", weighted, threads=1)
    simple = train(tmp_path / "simple", QUICK, threads=1)
    part = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(whole / part), load_file(simple / part)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    save = training.save_checkpoint

    def save_then_stop(path, state):
        save(path, state)
        if state.get("step") == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "resumed", weighted, threads=1)
    monkeypatch.setattr(training, "save_checkpoint", save)
    _same_weights(whole, train(tmp_path / "resumed", weighted, threads=1, resume=True))
    assert "loss_weight='v-capped'" in (whole / "training_log.txt").read_text()


def test_training_refuses_a_missing_output_folder_before_any_work(tmp_path, capsys):
    from diffedit.errors import OutputFileError
    from diffedit.shapes import training
    from diffedit.shapes.training import QUICK, train

    with pytest.raises(OutputFileError, match="does not exist; create it first"):
        train(tmp_path / "missing" / "m", QUICK, threads=1)
    code = training.main(["--out", str(tmp_path / "missing" / "m"), "--quick", "--threads", "1"])
    err = capsys.readouterr()
    assert code == 2 and len(err.err.strip().splitlines()) == 1 and "vae  step" not in err.out
    assert list(tmp_path.iterdir()) == []
