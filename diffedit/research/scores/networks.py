"""The metric networks, built without weights by their libraries, then filled by the project
from the user's files (weights.py) and handed back as modules:

    lpips(net)        torchmetrics' LPIPS module (_NoTrainLpips): its linear layers ship inside the
                      torchmetrics wheel, the backbone (torchvision AlexNet / VGG16 / SqueezeNet 1.1
                      features) is built random and loaded from DIR
    inception()       torchmetrics' NoTrainInceptionV3 (torch-fidelity's port of the FID graph),
                      2048-d pool3 features, its input uint8 resized to 299 inside
    clip(model)       transformers' CLIPModel + CLIPProcessor from a local folder (safetensors), with
                      the adapter torchmetrics' CLIPScore needs under transformers 5
    deit()            timm's deit_base_distilled_patch16_384 (its input: accuracy.flexit_transform)

Each builder takes either a weights folder (`folder`, or $DIFFEDIT_METRIC_WEIGHTS) or an explicit
state dict (`state`, for tests and for files the caller already read), and returns the module on
the CPU; `bench score --device` moves it once after that, and every scorer sends its inputs to
`device_of(module)`, so a scorer works wherever its module is.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

import torch

from diffedit.errors import ModelLoadError, ParameterError
from diffedit.io.files import user_path
from diffedit.research.scores.weights import (
    find_file,
    load_into,
    read_weights,
    weights_dir,
)

LPIPS_NETS = ("alex", "vgg", "squeeze")
INCEPTION_NAME = "inception-v3-compat"
DEIT_NAME = "deit_base_distilled_patch16_384"


def device_of(module: torch.nn.Module) -> torch.device:
    """The device of a module's parameters (of its buffers if it has none; the CPU if neither)."""
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def _state(network: str, folder, state) -> tuple[dict, Path]:
    if state is not None:
        return state, Path(f"<{network} state dict>")
    path = find_file(weights_dir(folder), network)
    return read_weights(path), path


def lpips(net: str = "alex", folder: str | os.PathLike | None = None, state: dict | None = None) -> torch.nn.Module:
    """torchmetrics' LPIPS network with the `net` backbone read from the user's torchvision weights
    (keys `features.N.*`, as torchvision saves the whole classifier; other keys are ignored)."""
    from torchmetrics.functional.image.lpips import _NoTrainLpips
    if net not in LPIPS_NETS:
        raise ModelLoadError(f"LPIPS backbone must be one of {', '.join(LPIPS_NETS)}; got {net!r}.")
    state, path = _state(net, folder, state)
    module = _NoTrainLpips(net=net, pnet_rand=True)   # linear layers from the wheel, backbone without weights
    backbone = {}
    for key in module.net.state_dict():   # sliceK.N.weight (slices.K.N.weight) <- features.N.weight
        source = "features." + key.split(".", 2 if key.startswith("slices.") else 1)[-1]
        if source in state:
            backbone[key] = state[source]
    load_into(module.net, backbone, path, f"LPIPS {net}")
    return module.eval()


def inception(folder: str | os.PathLike | None = None, state: dict | None = None) -> torch.nn.Module:
    """torchmetrics' NoTrainInceptionV3 giving 2048-d pool3 features of uint8 images. Its library
    loader reads a pickle without weights_only, so the tensors read safely here are written to a
    private temporary file (tensors only) that the library then loads; the user's file never
    reaches that loader."""
    from torchmetrics.image.fid import NoTrainInceptionV3
    state, path = _state("inception", folder, state)
    with tempfile.TemporaryDirectory(prefix="diffedit-inception-") as tmp:
        private = Path(tmp) / "inception.pt"
        torch.save({k: v.contiguous() for k, v in state.items()}, private)
        try:
            module = NoTrainInceptionV3(INCEPTION_NAME, ["2048"], str(private))
        except RuntimeError as e:
            raise ModelLoadError(f"{path} is not the FID Inception-v3's weights ({str(e).splitlines()[0][:120]}); "
                                 "pass the file named in the documentation.") from None
    module.num_features = 2048
    return module.eval()


class CLIPAdapter(torch.nn.Module):
    """What torchmetrics' CLIPScore calls (get_image_features / get_text_features returning the
    projected embeddings, and .config) on a transformers 5 CLIPModel, whose methods return an
    output object (the projected embedding is its pooler_output)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, pixel_values):
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids, attention_mask=None):
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def clip_folder(model: str, folder: str | os.PathLike | None = None) -> Path:
    """The local folder of a CLIP model: `model` itself if it is a folder, else DIR/<name> for a
    hub-style id such as openai/clip-vit-large-patch14 (DIR = the metric weights folder)."""
    if user_path(model, ParameterError).is_dir():
        return user_path(model, ParameterError)
    path = weights_dir(folder) / model.rstrip("/").split("/")[-1]
    if not path.is_dir():
        raise ModelLoadError(f"CLIPScore with {model} needs its files in {path} (config.json, model.safetensors, the "
                             f"tokenizer and preprocessor files of the Hugging Face repository {model}); nothing is "
                             "downloaded.")
    return path


def clip(model: str = "openai/clip-vit-large-patch14", folder: str | os.PathLike | None = None):
    """(CLIPAdapter, CLIPProcessor) of a local CLIP folder, weights from model.safetensors only."""
    from transformers import CLIPModel, CLIPProcessor
    path = clip_folder(model, folder)
    if not (path / "model.safetensors").is_file():
        raise ModelLoadError(f"{path / 'model.safetensors'} is missing; CLIP weights are read from safetensors only "
                             "(the repository's model.safetensors).")
    try:
        net = CLIPModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
        processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the CLIP model in {path} ({str(e).splitlines()[0][:160]}); it needs the "
                             "repository's config, weights, tokenizer and preprocessor files.") from None
    return CLIPAdapter(net.eval().requires_grad_(False)), processor


def deit(folder: str | os.PathLike | None = None, state: dict | None = None, **overrides) -> torch.nn.Module:
    """timm's deit_base_distilled_patch16_384 (overrides: a smaller configuration, for tests),
    weights from the user's file (timm's model.safetensors or the DeiT release's .pth)."""
    import timm
    state, path = _state("deit", folder, state)
    module = timm.create_model(DEIT_NAME, pretrained=False, **overrides)
    return load_into(module, state, path, "DeiT")
