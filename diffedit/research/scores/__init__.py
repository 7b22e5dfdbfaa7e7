"""The paper's metrics through maintained libraries (the `eval` extra: torchmetrics, torch-fidelity,
timm, torchvision, transformers), on networks whose weights the project reads itself from the
user's folder (`--metric-weights DIR` or $DIFFEDIT_METRIC_WEIGHTS), never downloaded.

    weights.py      where the files are, read safely (safetensors, torch.load weights_only=True)
    networks.py     the metric networks built by their libraries, filled from those files
    perceptual.py   LPIPS x100 and L1 on FlexIT's 256 crops; CLIPScore (torchmetrics)
    sets.py         Inception features, FID (torchmetrics), FlexIT's SFID / CSFID, reference statistics
    accuracy.py     FlexIT's DeiT-B distilled 384 accuracy over the 273 target classes
    masked.py       background PSNR / SSIM / MSE / LPIPS under the project's and PIE-Bench's
                    definitions; CLIPScore of the edited region
    structure.py    PIE-Bench's structure distance (DINO ViT-B/8 key self-similarity)
    command.py      `diffedit bench score DIR` and `diffedit bench stats ROOT`

Only weights.py and command.py's argument parser import without the extra; every library import
is inside the functions that need it. Tests: tests_eval/ (run in .venv-eval by `make test`).
"""
