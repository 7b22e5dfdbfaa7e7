"""The metric tests (diffedit/research/scores/): they need the `eval` extra (torchmetrics, timm,
torchvision, torch-fidelity), which lives in its own environment (.venv-eval, made by `make test`:
torchvision's wheels need the matching CUDA build of torch, while .venv keeps the CPU build).
This folder is collected only there (pytest's testpaths is tests/), so the main suite skips
nothing and these tests never pass by being skipped.

Every metric network here is built with random weights by the test (no download), written to a
weights folder the way a user provides it, and read back by the project's loaders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

TOKENIZER = Path(__file__).resolve().parents[1] / "weights" / "shapes-64" / "tokenizer"


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def picture(seed: int, size=(80, 64)) -> Image.Image:
    """A random smooth-ish RGB picture (width, height)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    base = Image.fromarray(small).resize(size, Image.BILINEAR)
    noise = rng.integers(-20, 21, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(base, dtype=int) + noise, 0, 255).astype(np.uint8))


@pytest.fixture
def pictures():
    return [picture(i) for i in range(6)]


def write_masked_pairs(folder: Path, first_seed: int, bottom: int, right: int, step: int) -> Path:
    """Two 64 x 48 pictures with a rectangle mask each (rows 8..bottom, columns 10 + step i..right)
    and the pairs.jsonl that lists them ("a cat" -> "a dog"); returns the file."""
    rows = []
    for i in range(2):
        picture(first_seed + i, (64, 48)).save(folder / f"in-{i}.png")
        mask = np.zeros((48, 64), np.uint8)
        mask[8:bottom, 10 + step * i:right] = 255
        Image.fromarray(mask).save(folder / f"mask-{i}.png")
        rows.append({"image": f"in-{i}.png", "mask": f"mask-{i}.png", "source": "a cat", "target": "a dog"})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "pairs.jsonl"


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The FID Inception's layout with random weights: the library's module built without its
    download (the two loading calls stubbed here, in the tests only), then re-initialised
    He-normal so that activations keep their scale through its ~90 layers (see
    test_scores_sets.py for why)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf
    from torchmetrics.image.fid import NoTrainInceptionV3
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tf, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(tf.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        module = NoTrainInceptionV3("inception-v3-compat", ["2048"], None)
    generator = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.weight.data = torch.randn(m.weight.shape, generator=generator) * (2 / m.weight[0].numel()) ** 0.5
        elif isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.zero_(), m.running_var.fill_(1.0), m.weight.data.fill_(1.0), m.bias.data.zero_()
    return {k: v.clone().contiguous() for k, v in module.state_dict().items()}


def save_backbone(folder: Path, net: str, seed: int = 0):
    """A random torchvision backbone for LPIPS saved under the name the loader looks for."""
    import torchvision

    from diffedit.research.scores import weights
    build = {"alex": torchvision.models.alexnet, "vgg": torchvision.models.vgg16,
             "squeeze": torchvision.models.squeezenet1_1}[net]
    torch.manual_seed(seed)
    model = build(weights=None)
    features = {k: v.contiguous() for k, v in model.state_dict().items() if k.startswith("features.")}
    save_file(features, str(folder / weights.FILES[net][0][0]))   # LPIPS reads only the features
    return model


def save_tiny_clip(folder: Path, name: str = "clip-vit-large-patch14") -> Path:
    """A random tiny CLIP saved as a Hugging Face folder DIR/<name> (the folder the default id
    openai/clip-vit-large-patch14 maps to), with the embedded model's BPE tokenizer."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizerFast,
    )
    vocab = len(json.loads((TOKENIZER / "vocab.json").read_text()))
    config = CLIPConfig(text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=24),
                        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2),
                        projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(config)
    tokenizer = CLIPTokenizerFast(vocab_file=str(TOKENIZER / "vocab.json"), merges_file=str(TOKENIZER / "merges.txt"),
                                  model_max_length=24)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    model.save_pretrained(folder / name)
    processor.save_pretrained(folder / name)
    return folder


@pytest.fixture(scope="session")
def metric_weights(tmp_path_factory) -> Path:
    """One weights folder as a user provides it: LPIPS alex and squeeze backbones, the FID
    Inception, a CLIP."""
    from diffedit.research.scores import weights
    folder = tmp_path_factory.mktemp("metric-weights")
    save_backbone(folder, "alex")
    save_backbone(folder, "squeeze", seed=1)
    save_file(random_inception_state(), str(folder / weights.FILES["inception"][0][0]))
    return save_tiny_clip(folder)
