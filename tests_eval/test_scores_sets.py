"""FID (torchmetrics), FlexIT's SFID and CSFID, and reference statistics, on a random Inception
re-initialised so that its features spread. With PyTorch's default initialisation the features
vanish (measured: at most 2.7e-7, two pictures 1.3e-7 apart, and the activations run into
denormal floats that make a CPU forward pass take minutes), so every FID is ~0 and proves
nothing; after conftest's He-normal re-initialisation they are ~0.1-1 and pictures ~0.6 apart."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import picture
from safetensors.torch import save_file

from diffedit.errors import ModelLoadError, ParameterError
from diffedit.research.scores import networks, sets


@pytest.fixture(scope="module")
def inception(metric_weights):
    torch.set_num_threads(1)
    return networks.inception(metric_weights)


@pytest.fixture(scope="module")
def feats(inception):
    torch.set_num_threads(1)
    return sets.features(inception, [picture(i) for i in range(8)], batch=4)


def test_the_reinitialised_inception_spreads_its_features(feats):
    assert feats.shape == (8, 2048) and feats.dtype == torch.float64
    assert float(feats.std(0).mean()) > 1e-3
    assert float(torch.cdist(feats, feats).fill_diagonal_(float("inf")).min()) > 0.1


def test_fid_from_features_equals_the_library_fed_with_the_images(inception, feats):
    from torchmetrics.image.fid import FrechetInceptionDistance
    real = [picture(i) for i in range(8)]
    fake = [picture(100 + i) for i in range(6)]
    metric = FrechetInceptionDistance(feature=inception)
    crop = lambda images: torch.cat([(sets.flexit_crop(im) * 255).round().to(torch.uint8) for im in images])
    metric.update(crop(real), real=True)
    metric.update(crop(fake), real=False)
    expected = float(metric.compute())
    acc = sets.Accumulator()
    acc.add(feats)
    fake_features, statistics = sets.features(inception, fake), acc.statistics()
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no "compute called before update" on every bench score run
        ours = sets.fid(fake_features, statistics)
    assert expected > 0.1
    assert ours == pytest.approx(expected, rel=1e-5)


def test_sfid_and_csfid_equal_numpy_by_hand():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(30, 16))
    classes = [3, 7, 9] * 10
    fake = rng.normal(loc=0.3, size=(12, 16))
    targets = [7, 3, 7, 9, 3, 7, 9, 9, 3, 7, 3, 9]
    acc = sets.Accumulator(16)
    acc.add(torch.from_numpy(reference), classes)
    stats = acc.statistics()
    sfid = ((fake.mean(0) - reference.mean(0)) ** 2).sum()
    per_class = [((fake[np.array(targets) == c].mean(0) - reference[np.array(classes) == c].mean(0)) ** 2).sum()
                 for c in (3, 7, 9)]
    assert sets.sfid(torch.from_numpy(fake), stats) == pytest.approx(sfid, rel=1e-12)
    assert sets.csfid(torch.from_numpy(fake), targets, stats) == pytest.approx(np.mean(per_class), rel=1e-12)
    assert np.allclose(stats["cov"].numpy(), np.cov(reference, rowvar=False))
    with pytest.raises(ParameterError, match="no images of class 5"):
        sets.csfid(torch.from_numpy(fake), [5] * 12, stats)


def test_statistics_round_trip_through_safetensors(tmp_path, feats):
    acc = sets.Accumulator()
    acc.add(feats, [0, 0, 1, 1, 2, 2, 2, 1])
    path = sets.save_statistics(acc.statistics(), tmp_path / "stats.safetensors", {"backbone": "test"})
    stats, about = sets.load_statistics(path)
    assert about == {"backbone": "test"} and int(stats["count"]) == 8
    assert stats["class_index"].tolist() == [0, 1, 2] and stats["class_count"].tolist() == [2, 3, 3]
    assert torch.equal(stats["mean"], feats.mean(0))
    assert sets.sfid(feats, stats) == pytest.approx(0.0, abs=1e-20)
    with pytest.raises(ParameterError, match="bench stats"):
        sets.load_statistics(tmp_path / "none.safetensors")


def test_missing_or_wrong_inception_weights_are_one_sentence(tmp_path):
    with pytest.raises(ModelLoadError) as e:
        networks.inception(tmp_path)
    assert str(tmp_path / "inception-2015-12-05.safetensors") in str(e.value) and "\n" not in str(e.value)
    save_file({"fc.weight": torch.zeros(3, 3)}, str(tmp_path / "inception-2015-12-05.safetensors"))
    with pytest.raises(ModelLoadError, match="not the FID Inception"):
        networks.inception(tmp_path)
