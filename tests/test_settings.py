"""The settings table (diffedit/settings.py) is the one place where DiffEdit's defaults and ranges
are written: the pipeline's signatures, the command line, the sweep's axes and `eval shapes` must
agree with it, and its check refuses what its ranges exclude, with one sentence."""

import argparse
import dataclasses
import inspect
import math

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from diffedit import cli
from diffedit.errors import ParameterError
from diffedit.pipeline import DiffEditPipeline
from diffedit.research.plan import AXES
from diffedit.settings import DEFAULT, SETTINGS, TABLE, check, checked, parameter_settings
from diffedit.shapes import eval as shapes_eval

PIPELINE_METHODS = ("generate_mask", "invert", "edit", "__call__")
# Parameters whose signature default is None on purpose: "take it from the inversion" / "auto".
NONE_MEANS_INHERITED = {("edit", "strength"), ("edit", "num_inference_steps"), ("generate_mask", "chunk_size")}


@pytest.mark.parametrize("method", PIPELINE_METHODS)
def test_pipeline_defaults_are_the_table(method):
    parameters = inspect.signature(getattr(DiffEditPipeline, method)).parameters
    mapping = parameter_settings(method, parameters)
    assert mapping, method
    for parameter, setting in mapping.items():
        default = parameters[parameter].default
        if (method, parameter) in NONE_MEANS_INHERITED:
            assert default is None, (method, parameter)
        else:
            assert default == DEFAULT[setting], (method, parameter, default, DEFAULT[setting])


def test_every_setting_is_used_by_the_pipeline():
    used = set()
    for method in PIPELINE_METHODS:
        used |= set(parameter_settings(method, inspect.signature(getattr(DiffEditPipeline, method)).parameters).values())
    assert set(TABLE) - used == {"ablation", "seed"}   # the sweep's names for (encode, use_mask) and the generator


def _actions(command: str) -> dict[str, argparse.Action]:
    parser = cli.build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {a.dest: a for a in sub._actions}


@pytest.mark.parametrize("command", ["edit", "mask"])
def test_command_line_flags_are_the_table(command):
    actions = _actions(command)
    settings = [name for name in actions if name in TABLE]
    assert {"mask_samples", "threshold", "num_inference_steps", "seed"} <= set(settings)
    for name in settings:
        assert actions[name].default == DEFAULT[name], name
        assert actions[name].option_strings == [TABLE[name].flag], name
        assert TABLE[name].describe() in actions[name].help, name


def test_eval_shapes_flags_and_settings_are_the_table():
    parser = argparse.ArgumentParser()
    shapes_eval.add_arguments(parser)
    for action in parser._actions:
        if action.dest in TABLE:
            assert action.default == DEFAULT[action.dest], action.dest
    fields = {f.name: f.default for f in dataclasses.fields(shapes_eval.EvalSettings)}
    aliases = {"num_mask_samples": "mask_samples"}
    for field, default in fields.items():
        name = aliases.get(field, field)
        if name in TABLE:
            assert default == DEFAULT[name], field


def test_sweep_axes_are_the_table():
    assert set(AXES) <= set(TABLE)
    assert AXES == {name: DEFAULT[name] for name in AXES}


def test_every_default_passes_its_own_check():
    for s in SETTINGS:
        if s.default is not None:
            assert check(s.name, s.default) == s.default


BAD = [("num_inference_steps", 10.0), ("num_inference_steps", "10"), ("num_inference_steps", 0),
       ("mask_samples", 10 ** 9), ("mask_samples", True), ("strength", 0.0), ("strength", 1.5),
       ("strength", math.nan), ("threshold", -0.1), ("clamp_std", -1.0), ("clamp_std", math.nan),
       ("mean_ratio", 0.0), ("blur", math.inf), ("dilate", 1.5), ("blend", "average"), ("soft_mask", 1),
       ("eta", 2.0), ("seed", 2 ** 63), ("seed", -1), ("guidance_scale", 1e309), ("ablation", None)]


@pytest.mark.parametrize("name, value", BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_check_refuses_in_one_sentence_naming_the_label(name, value):
    with pytest.raises(ParameterError) as info:
        check(name, value, "--the-flag")
    message = str(info.value)
    assert message.startswith("--the-flag must be ") and message.endswith(".") and "\n" not in message


@hsettings(max_examples=200, deadline=None)
@given(name=st.sampled_from([s.name for s in SETTINGS if s.kind in (int, float) and not s.choices]),
       value=st.one_of(st.integers(-10 ** 20, 10 ** 20), st.floats(allow_nan=True, allow_infinity=True)))
def test_check_accepts_exactly_the_described_range(name, value):
    s = TABLE[name]
    inside = (not isinstance(value, float) or s.kind is float) and math.isfinite(value) \
        and (s.low is None or (value > s.low if s.low_open else value >= s.low)) \
        and (s.high is None or (value < s.high if s.high_open else value <= s.high))
    if inside:
        assert check(name, value) == value
    else:
        with pytest.raises(ParameterError):
            check(name, value)


@pytest.mark.parametrize("method, kwargs, phrase", [
    ("generate_mask", {"num_samples": 10.0}, "num_samples must be an integer"),
    ("generate_mask", {"num_inference_steps": "10"}, "num_inference_steps must be an integer"),
    ("generate_mask", {"clamp_std": -1.0}, "clamp_std must be a number > 0"),
    ("generate_mask", {"blur": math.inf}, "blur must be a finite number"),
    ("generate_mask", {"dilate": 1.5}, "dilate must be an integer"),
    ("invert", {"strength": 0.0}, "strength must be a number in (0, 1]"),
    ("edit", {"blend": "average"}, "blend must be one of paper, glide, diffusers"),
    ("edit", {"eta": -1.0}, "eta must be a number in [0, 1]"),
    ("__call__", {"mask_threshold": 2.0}, "mask_threshold must be a number in [0, 1]"),
])
def test_public_methods_check_at_the_door(method, kwargs, phrase):
    """The checks run before the method body: `self` is never touched (None here)."""
    function = getattr(DiffEditPipeline, method)
    positional = {"generate_mask": ("image.png", "a", "b"), "invert": ("image.png",),
                  "edit": (None, None, "b"), "__call__": ("image.png", "a", "b")}[method]
    with pytest.raises(ParameterError, match=phrase.replace("(", r"\(").replace("[", r"\[")):
        function(None, *positional, **kwargs)


def test_checked_leaves_unrelated_parameters_alone():
    @checked
    def invert(image, prompt="", *, strength=0.8, callback=None):
        return strength
    assert invert("x", strength=0.5, callback="anything") == 0.5
    with pytest.raises(ParameterError, match="strength"):
        invert("x", strength=5)
