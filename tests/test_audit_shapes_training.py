"""The embedded model's training refuses settings it cannot run as they say, in one sentence and
before any work (diffedit/shapes/train_config.py): a zero checkpoint or log interval divided by
zero, an odd batch or crop failed deep in torch, and zero or negative step counts saved an
untrained model."""

from dataclasses import replace

import pytest

from diffedit.errors import ParameterError
from diffedit.shapes import training
from diffedit.shapes.train_config import QUICK, TrainConfig, check_config

BAD = [  # (field, value, words of the message)
    ("checkpoint_every", 0, "checkpoint_every must be an integer >= 1"),
    ("log_every", 0, "log_every must be an integer >= 1"),
    ("unet_batch", 5, "unet_batch must be an even integer >= 2"),
    ("unet_batch", 0, "unet_batch must be an even integer >= 2"),
    ("scenes", 1, "scenes must be an even integer in [2, 2000000]"),
    ("scenes", 65, "scenes must be an even integer"),
    ("unet_steps", -5, "unet_steps must be an integer >= 1"),
    ("unet_steps", 0, "unet_steps must be an integer >= 1"),
    ("vae_steps", 0, "vae_steps must be an integer >= 1"),
    ("vae_crop", 30, "vae_crop must be a multiple of 4 in [4, 64]"),
    ("snapshot_every", -1, "snapshot_every must be an integer >= 0"),
    ("seed", -1, "seed must be an integer in [0, "),
    ("seed", 2.5, "seed must be an integer"),
    ("uncond_prob", 1.5, "uncond_prob must be a number in [0, 1]"),
    ("ema_decay", 1.5, "ema_decay must be a number in [0, 1)"),
    ("ema_decay", 1.0, "ema_decay must be a number in [0, 1)"),
    ("unet_lr", float("nan"), "unet_lr must be a number > 0"),
    ("vae_lr", 0.0, "vae_lr must be a number > 0"),
    ("kl_weight", -1e-6, "kl_weight must be a number >= 0"),
    ("bf16", "yes", "bf16 must be True or False"),
    ("loss_weight", "snr", "unknown loss weight 'snr'"),
]


def test_the_default_and_quick_configs_pass():
    check_config(TrainConfig())
    check_config(QUICK)
    check_config(replace(QUICK, vae_crop=4, warmup=0, snapshot_every=0, uncond_prob=0.0, ema_decay=0.0))


@pytest.mark.parametrize("field, value, words", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_a_bad_setting_is_refused_before_any_work(tmp_path, field, value, words):
    with pytest.raises(ParameterError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        training.train(tmp_path / "m", replace(QUICK, **{field: value}), threads=1)
    assert list(tmp_path.iterdir()) == []          # no checkpoint, no model: nothing was trained


@pytest.mark.parametrize("threads", [-1, 1.5])
def test_bad_thread_counts_are_refused(tmp_path, threads):
    with pytest.raises(ParameterError, match="threads must be an integer >= 0"):
        training.train(tmp_path / "m", QUICK, threads=threads)


@pytest.mark.parametrize("flags", [["--unet-steps", "0"], ["--vae-steps", "-3"], ["--snapshot-every", "-1"]])
def test_the_command_line_says_it_in_one_line(tmp_path, capsys, flags):
    code = training.main(["--out", str(tmp_path / "m"), "--quick", "--threads", "1", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("training: error: ") and "must be" in err[0]
    assert list(tmp_path.iterdir()) == []
