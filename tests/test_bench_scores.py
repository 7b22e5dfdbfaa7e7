"""`diffedit bench score` / `bench stats` in the main environment, which has no `eval` extra
(torchvision's wheels need another torch build): one sentence, status 2, no import error. And the
weights layer of research/scores/ (plain torch, no metric library): files found by name, missing
ones named, pickles read with weights_only. The metrics themselves are tested in tests_eval/,
which `make test` runs in .venv-eval."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from diffedit.cli import main
from diffedit.errors import ModelLoadError, ParameterError, UnsafeCheckpointError
from diffedit.research.scores import weights


def test_score_without_the_eval_extra_is_one_sentence(tmp_path, capsys):
    assert main(["bench", "score", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "eval extra" in err and "\n" not in err


@pytest.mark.parametrize("argv, message", [
    (["bench", "score"], "needs the bench folder"),
    (["bench", "stats", "train"], "needs --out FILE.safetensors"),
    (["bench", "stats", "--data", "train", "--out", "s.safetensors"], "needs the ImageNet train folder"),
])
def test_score_and_stats_arguments_are_checked_first(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_weights_folder_from_the_flag_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(weights.ENV, raising=False)
    with pytest.raises(ParameterError, match="--metric-weights DIR or set DIFFEDIT_METRIC_WEIGHTS"):
        weights.weights_dir()
    monkeypatch.setenv(weights.ENV, str(tmp_path))
    assert weights.weights_dir() == tmp_path
    assert weights.weights_dir(str(tmp_path)) == tmp_path
    with pytest.raises(ParameterError, match="does not exist"):
        weights.weights_dir(tmp_path / "missing")


def test_a_missing_file_is_named_with_where_it_comes_from(tmp_path):
    for network, (names, origin) in weights.FILES.items():
        with pytest.raises(ModelLoadError) as e:
            weights.find_file(tmp_path, network)
        assert str(tmp_path / names[0]) in str(e.value) and origin in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "weights-inception-2015-12-05-6726825d.pth").write_bytes(b"")
    assert weights.find_file(tmp_path, "inception").name == "weights-inception-2015-12-05-6726825d.pth"


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickles_are_read_with_weights_only(tmp_path, capsys):
    torch.save({"model": {"a": torch.ones(2)}, "epoch": 3}, tmp_path / "wrapped.pth")
    assert list(weights.read_weights(tmp_path / "wrapped.pth")) == ["a"]
    save_file({"b": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    assert list(weights.read_weights(tmp_path / "w.safetensors")) == ["b"]
    torch.save({"a": torch.ones(1), "trap": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError):
        weights.read_weights(tmp_path / "evil.pth")
    assert "must never run" not in capsys.readouterr().out
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ModelLoadError):
        weights.read_weights(tmp_path / "text.pth")


def test_a_mismatched_state_is_one_sentence_naming_the_file(tmp_path):
    module = torch.nn.Linear(2, 3)
    with pytest.raises(ModelLoadError, match=r"f\.pt is not the toy metric network's weights \(it lacks 'weight'\)"):
        weights.load_into(module, {"bias": torch.zeros(3)}, tmp_path / "f.pt", "toy")
    with pytest.raises(ModelLoadError, match="wrongly shaped 'weight'"):
        weights.load_into(module, {"weight": torch.zeros(2, 2), "bias": torch.zeros(3)}, tmp_path / "f.pt", "toy")
    loaded = weights.load_into(module, {"weight": torch.ones(3, 2, dtype=torch.float64), "bias": torch.zeros(3)},
                               tmp_path / "f.pt", "toy")
    assert loaded.weight.dtype == torch.float32 and not loaded.training and not loaded.weight.requires_grad
