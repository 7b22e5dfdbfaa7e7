"""LPIPS and L1 through torchmetrics, with backbone weights read by the project from a folder."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import picture, save_backbone
from safetensors.torch import save_file

from diffedit.errors import ModelLoadError, ParameterError, UnsafeCheckpointError
from diffedit.research.scores import networks, weights
from diffedit.research.scores.perceptual import LPIPS, flexit_crop, l1


def backbone_folder(tmp_path, net: str, seed: int = 0):
    return tmp_path, save_backbone(tmp_path, net, seed)


def library_lpips(monkeypatch, net: str, model) -> torch.nn.Module:
    """torchmetrics' public LPIPS metric whose torchvision backbone is `model` (no download)."""
    import torchmetrics.functional.image.lpips as tm_lpips
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
    monkeypatch.setattr(tm_lpips, "_get_tv_model_features", lambda name, pretrained=False: model.features)
    return LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True)


@pytest.mark.parametrize("net", ["alex", "squeeze", "vgg"])
def test_lpips_equals_the_library_on_the_same_tensors(tmp_path, monkeypatch, net):
    folder, model = backbone_folder(tmp_path, net)
    ours = LPIPS(networks.lpips(net, folder), net)
    a, b = flexit_crop(picture(1)), flexit_crop(picture(2))
    if net == "vgg":     # full-size VGG16 on 256 crops is slow on a CPU: smaller crops, same check
        a, b = a[..., :64, :64], b[..., :64, :64]
    expected = 100 * float(library_lpips(monkeypatch, net, model)(a, b))
    assert expected > 0
    assert ours.tensors(a, b) == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert ours.tensors(a, a) == 0.0


def test_lpips_of_an_image_with_itself_is_zero_and_grows_with_the_change(tmp_path):
    folder, _ = backbone_folder(tmp_path, "alex")
    score = LPIPS(networks.lpips("alex", folder), "alex")
    image = picture(3)
    assert score(image, image) == 0.0
    assert score(image, picture(4)) > score(image, image.point(lambda v: min(255, v + 3))) > 0
    assert "alex" in score.info()["backbone"] and "256" in score.info()["resolution"]


def test_l1_is_the_mean_absolute_difference_of_the_crops():
    a, b = picture(5, (300, 260)), picture(6, (300, 260))
    assert l1(a, a) == 0.0
    assert l1(a, b) == pytest.approx(float((flexit_crop(a) - flexit_crop(b)).abs().mean()), rel=1e-6)


def test_flexit_crop_is_256_square_from_any_shape():
    assert flexit_crop(picture(0, (500, 300))).shape == (1, 3, 256, 256)
    assert flexit_crop(picture(0, (100, 140))).shape == (1, 3, 256, 256)


def test_a_missing_weights_file_is_one_sentence_naming_it(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError) as e:
        networks.lpips("alex", tmp_path)
    message = str(e.value)
    assert str(tmp_path / "alexnet.safetensors") in message and "\n" not in message
    monkeypatch.delenv(weights.ENV, raising=False)
    with pytest.raises(ParameterError, match=weights.ENV):
        networks.lpips("alex")
    monkeypatch.setenv(weights.ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ParameterError, match="does not exist"):
        networks.lpips("alex")


def test_the_environment_variable_names_the_folder(tmp_path, monkeypatch):
    folder, _ = backbone_folder(tmp_path, "squeeze")
    monkeypatch.setenv(weights.ENV, str(folder))
    assert LPIPS(networks.lpips("squeeze"), "squeeze")(picture(0), picture(0)) == 0.0


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickle_that_asks_to_run_code_is_refused(tmp_path, capsys):
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save({"features.0.weight": torch.zeros(1), "trap": Payload()}, path)
    with pytest.raises(UnsafeCheckpointError):
        networks.lpips("alex", tmp_path)
    assert "must never run" not in capsys.readouterr().out


def test_a_plain_pickle_of_tensors_is_read_with_weights_only(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.alexnet(weights=None)
    torch.save(model.state_dict(), tmp_path / "alexnet-owt-7be5be79.pth")
    score = LPIPS(networks.lpips("alex", tmp_path), "alex")
    assert score(picture(0), picture(1)) > 0


def test_the_wrong_network_is_named(tmp_path):
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in torchvision.models.squeezenet1_1(weights=None).state_dict().items()},
              str(tmp_path / "alexnet.safetensors"))
    with pytest.raises(ModelLoadError, match="alexnet.safetensors is not the LPIPS alex"):
        networks.lpips("alex", tmp_path)


def test_flexit_crop_is_pils_bilinear_shorter_side_resize_then_the_centre():
    """FlexIT's `resize(256)` (eval.py): the shorter side to 256 by PIL's bilinear resize, the
    longer side truncated, then the centre 256 x 256, in [0, 1] -- not a squash to 256 x 256."""
    import numpy as np
    from PIL import Image
    image = picture(7, (500, 300))
    resized = np.asarray(image.resize((int(256 * 500 / 300), 256), Image.BILINEAR), dtype=np.float32) / 255
    left = round((resized.shape[1] - 256) / 2)
    expected = torch.from_numpy(resized[:, left:left + 256]).permute(2, 0, 1)[None]
    assert torch.allclose(flexit_crop(image), expected, atol=1e-6)
    squashed = torch.from_numpy(np.asarray(image.resize((256, 256), Image.BILINEAR), dtype=np.float32) / 255)
    assert (flexit_crop(image)[0] - squashed.permute(2, 0, 1)).abs().max() > 0.05


def test_l1_is_in_pixels_of_0_to_1_not_x100_nor_0_to_255():
    """FlexIT reports the mean L1 distance of [0, 1] crops as is: a uniform change of 10 levels
    out of 255 is 10 / 255."""
    import numpy as np
    from PIL import Image
    base = np.full((64, 80, 3), 100, np.uint8)
    assert l1(Image.fromarray(base + 10), Image.fromarray(base)) == pytest.approx(10 / 255, rel=1e-5)
