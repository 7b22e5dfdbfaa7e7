"""The pipeline's door: every argument of a public method checked once, on entry, before any work.

Settings (strength, steps, thresholds...) are checked against the table of settings.py; the other
arguments (images, prompts, masks, generators, callbacks, results of earlier steps) by their
parameter name, here. A wrong argument raises one exception of diffedit.errors whose sentence
names the parameter and says what it must be:

    @door  def generate_mask(self, image, source_prompt, ...)   # = settings.checked + the checks below

Also here: the prompt lists (`prompts`, `check_prompt_pairs`) and the finiteness check of the
numbers the pipeline produces (`check_finite`, and the step callbacks that apply it), which tells an
input's NaN/inf (guidance, mask, weights) from an overflow of a low precision.
"""

from __future__ import annotations

import functools
import inspect
import os
import unicodedata
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from diffedit.errors import ImageInputError, NumericalError, ParameterError, PromptError
from diffedit.results import EncodedImage, Inversion, MaskResult
from diffedit.settings import check_arguments, parameter_settings

if TYPE_CHECKING:
    from diffedit.method import StepTrace

MAX_RESOLUTION = 8192  # the working size's longest side; above, the VAE alone needs tens of GB


def _tensor(value: torch.Tensor, name: str, error=ParameterError) -> None:
    if value.device.type == "meta":
        raise error(f"{name} is a tensor on the meta device, which holds no values; pass a tensor with data.")
    if value.numel() == 0:
        raise error(f"{name} is an empty tensor (shape {tuple(value.shape)}); pass one with values.")
    if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
        raise error(f"{name} contains NaN or infinite values; fix the data.")


def _image(value: Any, name: str) -> None:
    """A path, PIL image, array, tensor or EncodedImage; or a non-empty list of the first four."""
    one = (str, os.PathLike, Image.Image, np.ndarray, torch.Tensor)
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if isinstance(value, (list, tuple)) and not items:
        raise ImageInputError(f"{name} is an empty list; pass an image, or a list of images.")
    if isinstance(value, EncodedImage):
        return
    for item in items:
        if not isinstance(item, one):
            raise ImageInputError(f"{name} must be a path, a PIL image, an array or a tensor (or a list of them), "
                                  f"not {_shown(item)}.")
        if isinstance(item, torch.Tensor):
            _tensor(item, name, ImageInputError)


def _prompt(value: Any, name: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, str):
        return
    if isinstance(value, (list, tuple)) and value and all(isinstance(p, str) for p in value):
        return
    raise PromptError(f"{name} must be a string or a non-empty list of strings, not {_shown(value)}.")


def _mask(value: Any, name: str) -> None:
    if value is None or isinstance(value, (MaskResult, str, os.PathLike, Image.Image)):
        return
    if isinstance(value, np.ndarray):
        try:
            value = torch.from_numpy(value)
        except TypeError:
            raise ParameterError(f"{name} is an array of {value.dtype}, not of numbers in [0, 1].") from None
    if isinstance(value, torch.Tensor):
        _tensor(value, name)
        if value.dim() not in (2, 3, 4):
            raise ParameterError(f"{name} must be (h, w), (B, h, w) or (B, 1, h, w); got shape {tuple(value.shape)}.")
        return
    raise ParameterError(f"{name} must be a MaskResult, a tensor, an image or an image path, not {_shown(value)}.")


def _resolution(value: Any, name: str) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not 8 <= value <= MAX_RESOLUTION or value % 8:
        raise ParameterError(f"{name} must be a multiple of 8 between 8 and {MAX_RESOLUTION} (the VAE works on "
                             f"8-pixel cells), got {value!r}; or leave it out for the model's own size.")


def _of_type(kind: type | tuple, what: str, optional: bool = True) -> Callable[[Any, str], None]:
    def check(value: Any, name: str) -> None:
        if not (value is None and optional) and not isinstance(value, kind):
            raise ParameterError(f"{name} must be {what}, not {_shown(value)}.")
    return check


def _noise(value: Any, name: str) -> None:
    if value is not None:
        _of_type(torch.Tensor, "a tensor (batch, samples, channels, height, width)")(value, name)
        _tensor(value, name)


def _callback(value: Any, name: str) -> None:
    if value is not None and not callable(value):
        raise ParameterError(f"{name} must be a function (or None), not {_shown(value)}.")


def _flag(value: Any, name: str) -> None:
    if value is not None and not isinstance(value, bool):
        raise ParameterError(f"{name} must be True, False or None, not {_shown(value)}.")


ARGUMENTS: dict[str, Callable[[Any, str], None]] = {
    "image": _image,
    "source_prompt": _prompt, "target_prompt": _prompt, "prompt": _prompt,
    "negative_prompt": functools.partial(_prompt, optional=True),
    "source_negative_prompt": functools.partial(_prompt, optional=True),
    "target_negative_prompt": functools.partial(_prompt, optional=True),
    "generator": _of_type(torch.Generator, "a torch.Generator (or None)"),
    "inversion": _of_type(Inversion, "the Inversion that invert() returned", optional=False),
    "mask": _mask, "noise": _noise, "callback": _callback, "resolution": _resolution,
    "sample_posterior": _flag, "return_per_sample": _flag,
}


def door(function):
    """On entry: the settings' types and ranges (as `settings.checked`), then the checks of ARGUMENTS."""
    signature = inspect.signature(function)
    settings = parameter_settings(function.__name__, signature.parameters)
    names = [p for p in signature.parameters if p in ARGUMENTS]

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as e:
            raise ParameterError(f"{function.__name__}(): {e}; see help(DiffEditPipeline.{function.__name__}).") \
                from None
        check_arguments(settings, bound.arguments)   # NumPy numbers become Python ones here
        for name in names:
            if name in bound.arguments:
                ARGUMENTS[name](bound.arguments[name], name)
        return function(*bound.args, **bound.kwargs)
    return wrapper


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


# ---------------------------------------------------------------------- prompts

def prompts(prompt: str | Sequence[str], batch: int, name: str) -> list[str]:
    """One whitespace-normalised prompt per image (a single prompt serves every image)."""
    _prompt(prompt, name)
    items = [prompt] if isinstance(prompt, str) else list(prompt)
    if len(items) == 1 and batch > 1:
        items = items * batch
    if len(items) != batch:
        raise PromptError(f"{len(items)} {name}s for {batch} images; give one per image or a single one.")
    return [" ".join(p.split()) for p in items]


def check_prompt_pairs(sources: Sequence[str], targets: Sequence[str],
                       tokenize: Callable[[str], Sequence[int]] | None = None) -> None:
    """Refuse an empty target, and a target the text encoder cannot tell from its source: the noise
    predictions would be equal, the mask empty and nothing edited. Prompts are compared as the
    tokenizer normalises them (Unicode NFC, whitespace runs, lower case: "A Dog" is "a dog") and,
    with `tokenize` (text -> the ids the encoder reads, truncated), by their token ids."""
    for source, target in zip(sources, targets):
        source, target = (unicodedata.normalize("NFC", " ".join(p.split())).lower() for p in (source, target))
        if not target:
            raise PromptError("the target prompt is empty; say what the edited image should show (e.g. 'a dog').")
        if source == target or (tokenize is not None and list(tokenize(source)) == list(tokenize(target))):
            raise PromptError(f"the source and target prompts read the same to the text encoder ({target!r}; case "
                              "and what lies past its token limit do not count), so the mask would be empty and "
                              "nothing would change; give a target that differs from the source.")


# ---------------------------------------------------------------------- numbers

def check_finite(x: torch.Tensor, where: str, dtype: torch.dtype) -> None:
    """NumericalError if x holds NaN or inf: in fp32 the inputs are to blame (a huge guidance, a
    NaN in a mask, an image or the weights), in fp16/bf16 most likely the precision."""
    if bool(torch.isfinite(x).all()):
        return
    if dtype == torch.float32 or dtype == torch.float64:
        raise NumericalError(f"NaN or inf appeared in {where} while running in {str(dtype).removeprefix('torch.')}, "
                             "so the precision is not the cause: look for huge or NaN values in the inputs (guidance "
                             "scale, mask, image, noise) and in the model's weights.")
    raise NumericalError(f"NaN or inf appeared in {where}; the model overflowed in this precision: "
                         "use dtype='bf16' or 'fp32'.")


def finite_inversion_callback(dtype: torch.dtype, user: Callable | None) -> Callable:
    """The inversion's per-step callback: every latent checked finite, then the user's callback."""
    def check(i: int, t: int, x: torch.Tensor) -> None:
        check_finite(x, f"the inversion latents at step {i + 1} (t={int(t)})", dtype)
        if user is not None:
            user(i, t, x)
    return check


def finite_decode_callback(dtype: torch.dtype, user: Callable | None) -> Callable:
    """The decoding's per-step callback: every step's latent checked finite, then the user's callback."""
    def check(trace: StepTrace) -> None:
        check_finite(trace.y_t, f"the decoding latents at step {trace.index + 1} (t={trace.t})", dtype)
        if user is not None:
            user(trace)
    return check
