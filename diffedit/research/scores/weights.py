"""Where the metric networks' weights are, and how they are read: only from the user's own files
(`--metric-weights DIR`, or the environment variable DIFFEDIT_METRIC_WEIGHTS), never downloaded.

Files are read by the project itself, safetensors first, a pickle only through
`torch.load(weights_only=True)` (diffedit/checkpoints/model_io.py: a pickle that asks to run code
is refused), then loaded strictly into a module built without weights and handed to the library.
A missing file is one sentence that names it and says where it comes from.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from diffedit.errors import ModelLoadError, ParameterError
from diffedit.io.files import user_path

ENV = "DIFFEDIT_METRIC_WEIGHTS"

# metric network -> (file names accepted in DIR, first preferred; where the file comes from)
FILES: dict[str, tuple[tuple[str, ...], str]] = {
    "alex": (("alexnet.safetensors", "alexnet-owt-7be5be79.pth"),
             "torchvision's AlexNet ImageNet weights (torchvision.models.AlexNet_Weights.IMAGENET1K_V1)"),
    "vgg": (("vgg16.safetensors", "vgg16-397923af.pth"),
            "torchvision's VGG16 ImageNet weights (torchvision.models.VGG16_Weights.IMAGENET1K_V1)"),
    "squeeze": (("squeezenet1_1.safetensors", "squeezenet1_1-b8a52dc0.pth"),
                "torchvision's SqueezeNet 1.1 ImageNet weights (torchvision.models.SqueezeNet1_1_Weights)"),
    "inception": (("inception-2015-12-05.safetensors", "weights-inception-2015-12-05-6726825d.pth",
                   "pt_inception-2015-12-05-6726825d.pth"),
                  "the FID Inception-v3 (the 2015-12-05 TensorFlow graph ported to PyTorch, as torch-fidelity and "
                  "pytorch-fid publish it)"),
    "deit": (("deit_base_distilled_patch16_384.safetensors", "deit_base_distilled_patch16_384-d0272ac0.pth"),
             "DeiT-B distilled 384 (timm's deit_base_distilled_patch16_384, or facebookresearch/deit's release)"),
    "dino": (("dino_vitb8.safetensors", "dino_vitbase8_pretrain.pth"),
             "DINO ViT-B/8 (facebookresearch/dino's dino_vitbase8_pretrain, or timm's vit_base_patch8_224.dino)"),
}


def weights_dir(given: str | os.PathLike | None = None) -> Path:
    """The folder of the metric weights: `given`, else $DIFFEDIT_METRIC_WEIGHTS."""
    folder = given if given not in (None, "") else os.environ.get(ENV)
    if not folder:
        raise ParameterError(f"the metrics need their networks' weights: pass --metric-weights DIR or set {ENV} to "
                             "the folder that holds them (nothing is downloaded).")
    path = user_path(folder, ParameterError)
    if not path.is_dir():
        raise ParameterError(f"the metric weights folder {path} does not exist; pass the folder that holds the "
                             "metric networks' files.")
    return path


def find_file(folder: Path, network: str) -> Path:
    """The weights file of `network` in `folder` (the first accepted name found)."""
    names, origin = FILES[network]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise ModelLoadError(f"the {network} metric network needs {folder / names[0]} (or {' / '.join(names[1:])}) "
                         f"with {origin}; put the file there, nothing is downloaded.")


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of one weights file: safetensors, or a pickle read with weights_only=True
    (refused if it asks to run code). A checkpoint that wraps its state dict under "model" or
    "state_dict" (DeiT's and DINO's releases) is unwrapped."""
    from diffedit.checkpoints.model_io import read_state_dict
    path = Path(path)
    if path.suffix == ".safetensors" or not path.is_file():
        return read_state_dict(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return read_state_dict(path)   # says in one sentence why: damaged, or a pickle asking to run code
    for key in ("model", "state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not any(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelLoadError(f"{path} holds no dictionary of tensors; pass the network's weights file.")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, network: str) -> torch.nn.Module:
    """Load `state` strictly into `module`; a mismatch is one sentence naming the file."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        what = "lacks" if missing else ("has an unknown entry" if unexpected else "has a wrongly shaped")
        raise ModelLoadError(f"{path} is not the {network} metric network's weights (it {what} {first!r}); pass the "
                             "file named in the documentation.")
    module.load_state_dict({k: state[k].to(expected[k].dtype) for k in expected})
    return module.eval().requires_grad_(False)
