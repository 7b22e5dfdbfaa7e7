"""Every DiffEdit setting in one table: name, the paper's default, type, allowed range, meaning.

The pipeline's keyword defaults and its checks at the door, the command line's flags and help,
the sweep's axes and checks and `diffedit eval shapes` all read this table, so a default or a
range is written once (tests/test_settings.py checks that they agree). Defaults are the paper's
(Couairon et al., ICLR 2023, sec. 4): n = 10 noise samples at strength 0.5 for the mask, 50 DDIM
steps, encoding ratio r = 0.8, guidance 7.5, threshold 0.5.

    check("strength", 1.2)            -> ParameterError: strength must lie in (0, 1], got 1.2.
    DEFAULT["mask_samples"]           -> 10
    @checked  def generate_mask(...)  every argument that names a setting is checked on entry
"""

from __future__ import annotations

import argparse
import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from diffedit.errors import ParameterError

NORMALIZATIONS = ("paper", "mean_ratio")   # mask_maps.py implements both
BLENDS = ("paper", "glide", "diffusers")   # method.masked_ddim_decode implements the three
ABLATIONS = {                              # the paper's ablations as (encode, use_mask)
    "none": (True, True), "no_mask": (True, False), "no_encode": (False, True), "sdedit": (False, False)}
MAX_MASK_SAMPLES = 100_000                 # n beyond this is a typo, not an experiment
MAX_SEED = 2 ** 63                         # torch.Generator.manual_seed takes seeds below this
MAX_CELLS = 1024                           # blur and dilation, in latent cells: an 8192-px image's side
CURVE_STRENGTHS = (0.2, 0.4, 0.6, 0.8, 1.0)  # the r grid of the trade-off curves (the paper's Fig. 4)


@dataclass(frozen=True)
class Setting:
    name: str                        # canonical name: the sweep axis and the key of DEFAULT
    default: Any                     # the paper's value (None: chosen at run time, see meaning)
    kind: type                       # int, float, str or bool
    meaning: str                     # one line, shown in --help
    low: float | None = None         # lowest allowed value (numbers)
    high: float | None = None        # highest allowed value (numbers)
    low_open: bool = False           # True: low itself is refused
    high_open: bool = False          # True: high itself is refused
    choices: tuple = ()              # the allowed values (strings)
    flag: str | None = None          # command-line flag, if the CLI exposes it
    api: dict = field(default_factory=dict)  # pipeline method -> its parameter name, where not `name`

    def describe(self) -> str:
        """The allowed values in words: 'a number in (0, 1]', 'an integer >= 1', 'one of paper, glide'."""
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        if self.kind is bool:
            return "True or False"
        noun = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            return (f"{noun} in {'(' if self.low_open else '['}{_number(self.low)}, "
                    f"{_number(self.high)}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {_number(self.low)}"
        return noun


def _number(value: float) -> str:
    return "2^63" if value == 2 ** 63 else f"{value:g}"


SETTINGS: tuple[Setting, ...] = (
    # ------------------------------------------------------------ the DDIM grid
    Setting("num_inference_steps", 50, int, "DDIM steps of the full schedule (the grid of every step)",
            low=1, flag="--steps"),
    # ------------------------------------------------------------ step 1: the mask
    Setting("mask_samples", 10, int, "noise samples n averaged for the mask",
            low=1, high=MAX_MASK_SAMPLES, flag="--mask-samples",
            api={"generate_mask": "num_samples", "__call__": "num_mask_samples"}),
    Setting("mask_noise_strength", 0.5, float, "noise level of the mask's samples, as a fraction of the schedule",
            low=0, high=1, low_open=True, flag="--mask-noise",
            api={"generate_mask": "noise_strength"}),
    Setting("threshold", 0.5, float, "threshold on the normalised difference map",
            low=0, high=1, flag="--threshold", api={"__call__": "mask_threshold"}),
    Setting("normalization", "paper", str, "how the difference map is brought to [0, 1]: the paper's outlier "
            "clamp and rescale, or diffusers' clamp at a ratio of the mean",
            choices=NORMALIZATIONS, api={"__call__": "mask_normalization"}),
    Setting("clamp_std", 3.0, float, "'paper' normalisation: outliers clamped at mean + clamp_std x std",
            low=0, low_open=True),
    Setting("mean_ratio", 3.0, float, "'mean_ratio' normalisation: the map is clamped at mean_ratio x mean",
            low=0, low_open=True),
    Setting("mask_guidance_scale", 1.0, float, "guidance of the mask's noise predictions (only matters with two "
            "different negative prompts)", low=0, api={"generate_mask": "guidance_scale"}),
    Setting("blur", 0.0, float, "Gaussian blur of the map before the threshold, sigma in latent cells (0: none)",
            low=0, high=MAX_CELLS),
    Setting("dilate", 0, int, "grow the mask by this many latent cells (0: none)", low=0, high=MAX_CELLS),
    Setting("chunk_size", None, int, "rows per UNet batch of the mask (default: 2 on the CPU, 8 on a GPU)",
            low=1),
    # ------------------------------------------------------------ step 2: encoding
    Setting("strength", 0.8, float, "encoding ratio r: the fraction of the schedule the image is DDIM-encoded",
            low=0, high=1, low_open=True, flag="--strength"),
    Setting("inversion_guidance_scale", 1.0, float, "guidance while encoding (1: none, as the paper encodes)",
            low=0, api={"invert": "guidance_scale"}),
    # ------------------------------------------------------------ step 3: decoding
    Setting("guidance_scale", 7.5, float, "classifier-free guidance scale while decoding", low=0,
            flag="--guidance"),
    Setting("blend", "paper", str, "how the region outside the mask follows the input: the paper's latent "
            "blend, GLIDE's x0 blend, or diffusers' one-step-off blend", choices=BLENDS),
    Setting("soft_mask", False, bool, "blend with the soft map instead of the binary mask"),
    Setting("eta", 0.0, float, "DDIM stochasticity while decoding (0: deterministic, as the paper)", low=0, high=1),
    Setting("encode", True, bool, "start from and blend with DDIM-encoded latents (False: noised latents, "
            "'DiffEdit w/o encoding')"),
    Setting("use_mask", True, bool, "blend outside the mask (False: plain encode-decode)"),
    Setting("ablation", "none", str, "a sweep's name for (encode, use_mask): none = DiffEdit, no_mask, "
            "no_encode, sdedit = neither", choices=tuple(ABLATIONS)),
    # ------------------------------------------------------------ randomness
    Setting("seed", 0, int, "seed of the mask noise (and of the noise of the 'w/o encoding' ablations)",
            low=0, high=MAX_SEED, high_open=True, flag="--seed"),
)

TABLE: dict[str, Setting] = {s.name: s for s in SETTINGS}
DEFAULT: dict[str, Any] = {s.name: s.default for s in SETTINGS}


def check(name: str, value: Any, label: str | None = None) -> Any:
    """`value` if it is allowed for setting `name`, else ParameterError with one sentence naming
    `label` (the caller's name for it: a flag, a parameter, a grid axis; default the setting's)."""
    s = TABLE[name]
    label = label or name
    value = plain_number(value)
    if s.choices:
        if value not in s.choices:
            raise ParameterError(f"{label} must be one of {', '.join(map(str, s.choices))}, got {value!r}.")
        return value
    if s.kind is bool:
        if not isinstance(value, bool):
            raise ParameterError(f"{label} must be True or False, got {value!r}.")
        return value
    if s.kind is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise ParameterError(f"{label} must be an integer, got {value!r}.")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not _finite(value):
        raise ParameterError(f"{label} must be a finite number, got {_number_shown(value)}.")
    too_low = s.low is not None and (value <= s.low if s.low_open else value < s.low)
    too_high = s.high is not None and (value >= s.high if s.high_open else value > s.high)
    if too_low or too_high:
        raise ParameterError(f"{label} must be {s.describe()}, got {_number_shown(value)}.")
    return value


def _finite(value: int | float) -> bool:
    """A finite float, or an int a float can hold (math.isfinite(10 ** 400) raises OverflowError)."""
    return abs(value) < 2 ** 1024 if isinstance(value, int) else math.isfinite(value)


def _number_shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def plain_number(value: Any) -> Any:
    """A NumPy scalar as the Python number it holds (np.int64(4) -> 4, np.float32(0.5) -> 0.5,
    np.bool_ -> bool), so that results and sweep tables stay plain JSON; anything else unchanged."""
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == () and value.dtype.kind in "biuf":
        return value.item()
    return value


def parameter_settings(function_name: str, parameters) -> dict[str, str]:
    """{parameter name: setting name} for a pipeline method's parameters that are settings."""
    aliased = {s.api[function_name]: s.name for s in SETTINGS if function_name in s.api}
    plain = {s.name: s.name for s in SETTINGS if function_name not in s.api and s.name not in aliased}
    return {p: name for p, name in {**plain, **aliased}.items() if p in parameters}


def checked(function):
    """Check, on entry, every argument of `function` that names a setting (None passes: it means
    "the default" or "from elsewhere" wherever a signature allows it)."""
    signature = inspect.signature(function)
    mapping = parameter_settings(function.__name__, signature.parameters)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        check_arguments(mapping, signature.bind(*args, **kwargs).arguments)
        return function(*args, **kwargs)
    return wrapper


def check_arguments(mapping: dict[str, str], arguments: dict[str, Any]) -> None:
    """Check each argument that `mapping` (from `parameter_settings`) names a setting; None passes.
    NumPy scalars are replaced in `arguments` by the Python numbers they hold."""
    for parameter, value in arguments.items():
        if parameter in mapping and value is not None:
            arguments[parameter] = check(mapping[parameter], value, parameter)


# ---------------------------------------------------------------------- command-line flags

def setting_type(name: str) -> Callable[[str], object]:
    """argparse `type` for a setting: parse the text as its kind, check it against the table."""
    setting = TABLE[name]

    def parse(text: str):
        try:
            value = setting.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if setting.kind is int else 'a number'}") \
                from None
        try:
            return check(name, value, "the value")
        except ParameterError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("the value ").rstrip(".")) from None
    return parse


def add_argument(group, name: str, help: str | None = None) -> None:
    """The flag of setting `name`, its default, type and help from the settings table."""
    s = TABLE[name]
    metavar = {int: "N", float: "X"}.get(s.kind, "VALUE")
    group.add_argument(s.flag, dest=name, type=setting_type(name), default=s.default, metavar=metavar,
                       help=f"{help or s.meaning} ({s.describe()}; default {s.default})")
