"""The `diffedit` command line.

    diffedit edit IMAGE --source TEXT --target TEXT [--model DIR|HUB_ID|FILE] [--out PATH] ...
    diffedit mask IMAGE --source TEXT --target TEXT [--out MASK.png] ...

`edit` writes three files next to the input (or where --out, --mask-out, --panel-out say):
NAME.edit.png, NAME.mask.png and NAME.panel.png (input | the mask, outside dimmed | edit), all at
the input's size (with --mask, the given mask is not written again, and --mask-out is refused). With
--out OUT.png alone, the mask and the panel go beside it, OUT.mask.png and OUT.panel.png (--out
cat.edit.png: cat.mask.png), not into the input's folder. Every argument is checked and every output
path is cleared (its format's size limit too) before the model loads; the outputs are written at the
end, atomically (files.atomic_write), so a run that is killed leaves either no output or a complete
one. The input is never overwritten; an existing output only with --overwrite.

Errors of the project's own family (diffedit.errors) and of the command line itself print one
line on stderr and exit with status 2; Ctrl-C exits with 130, SIGTERM with 143 (diffedit/exits.py).

Subcommands come from the COMMANDS table: name -> Command(help, add_arguments, run). A new one is
one entry: a function that adds its arguments to an argparse parser, and one that takes the
parsed arguments and returns an exit status (`eval` and `sweep` are such entries, their modules
imported only when they run).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from diffedit import exits
from diffedit.errors import DiffEditError, ImageInputError, OutputFileError, ParameterError
from diffedit.settings import add_argument

PANEL_MIN_SIDE = 256   # the panel shows small images (the embedded model's 64 px) enlarged, nearest neighbour
PANEL_LABELS = ["input", "mask (outside dimmed)", "edit"]


class UsageError(DiffEditError):
    """A command-line argument that argparse refused."""


# ---------------------------------------------------------------------- shared arguments

def add_image_and_prompts(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="input image (PNG, JPEG or WebP; at least 8 pixels a side and at most "
                                 "16.8 MP, e.g. 4096 x 4096)")
    p.add_argument("--source", required=True, metavar="TEXT",
                   help="what the image shows now: a caption, or \"\" for none (the paper's reference text)")
    p.add_argument("--target", required=True, metavar="TEXT", help="what the edited image should show (the query)")


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="DIR|HUB_ID|FILE",
                   help="diffusers-layout folder, hub id or single checkpoint file (default: the embedded model)")
    g.add_argument("--preset", metavar="P", help="what a single checkpoint file is: sd1, sd2-base or sd2-v")
    g.add_argument("--dtype", default="fp32", metavar="fp32|bf16|fp16", help="weights' precision (default fp32)")
    g.add_argument("--device", default="auto", metavar="cpu|cuda",
                   help="where to run (default: cuda if there is one, else cpu)")


def add_steps_option(p: argparse.ArgumentParser) -> None:
    add_argument(p, "num_inference_steps", help="DDIM steps of the full schedule, the grid of the mask's noise, "
                 "the encoding and the decoding; at most the model's schedule length, 999 for Stable Diffusion and the "
                 "embedded model (1000 timesteps, a grid offset by 1), checked once the model is loaded")


def add_mask_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mask (DiffEdit step 1)")
    for name in ("mask_samples", "mask_noise_strength", "threshold", "seed"):
        add_argument(g, name)


def add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (never the input)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no list of the files written")


def add_edit_arguments(p: argparse.ArgumentParser) -> None:
    add_image_and_prompts(p)
    add_steps_option(p)
    add_model_options(p)
    add_mask_options(p)
    g = p.add_argument_group("edit (DiffEdit steps 2 and 3)")
    add_argument(g, "strength")
    add_argument(g, "guidance_scale")
    g.add_argument("--mask", metavar="PATH",
                   help="use this mask (white = edit) instead of computing one (not with --mask-out)")
    o = p.add_argument_group("outputs")
    o.add_argument("--out", metavar="PATH", help="the edited image (default NAME.edit.png next to the input)")
    o.add_argument("--mask-out", metavar="PATH",
                   help="the computed mask (default NAME.mask.png, beside --out if given; not with --mask)")
    o.add_argument("--panel-out", metavar="PATH", help="input | mask (outside dimmed) | edit, enlarged and labelled "
                   "(default NAME.panel.png, beside --out if given)")
    add_output_options(o)


def add_maskcmd_arguments(p: argparse.ArgumentParser) -> None:
    add_image_and_prompts(p)
    add_steps_option(p)
    add_model_options(p)
    add_mask_options(p)
    o = p.add_argument_group("outputs")
    o.add_argument("--out", metavar="MASK.png", help="the mask (default NAME.mask.png next to the input)")
    add_output_options(o)


# ---------------------------------------------------------------------- checks before any work

def check_prompts(source: str, target: str) -> tuple[str, str]:
    """Whitespace-normalised prompts, refused as the pipeline refuses them (an empty target, or a
    target equal to the source: the mask would be empty), but before the model loads."""
    from diffedit.pipeline import check_prompt_pairs
    source, target = " ".join(source.split()), " ".join(target.split())
    check_prompt_pairs([source], [target])
    return source, target


def default_output(image: Path, kind: str) -> Path:
    """NAME.kind.png next to the input image."""
    return image.with_name(f"{image.stem}.{kind}.png")


def named_after_out(out: Path) -> Path:
    """The 'input' the mask's and panel's default names follow when the edit has an --out: OUT.png
    itself, or cat.png for cat.edit.png (so that its mask is cat.mask.png, not cat.edit.mask.png)."""
    stem = out.stem.removesuffix(".edit") or out.stem
    return out.with_name(f"{stem}.png")


def plan_outputs(image: Path, wanted: dict[str, str | None], overwrite: bool, protected: list[Path],
                 flags: dict[str, str] | None = None,
                 sizes: dict[str, tuple[int, int]] | None = None) -> dict[str, Path]:
    """The output path of each kind (given or default), every one checked now so that a long run
    never ends in a refusal: writable folder, a known image suffix whose format holds the kind's
    size (`sizes`), not an input, distinct, and not existing unless --overwrite. An empty path
    (--out "") is refused, not read as the default."""
    from diffedit.io.files import check_image_size, check_output, image_format, user_path
    for kind, path in wanted.items():
        if path is not None and not str(path).strip():
            flag = (flags or {}).get(kind, f"the {kind} output")
            raise OutputFileError(f"{flag} is empty; give a file name such as {default_output(image, kind).name}, "
                                  f"or leave out {flag} for that default.")
    given = {kind: user_path(path) for kind, path in wanted.items() if path}
    beside = named_after_out(given["edit"]) if "edit" in given else image  # --out leads the others
    plan = {kind: given.get(kind) or default_output(image if kind == "edit" else beside, kind) for kind in wanted}
    seen: dict[Path, str] = {}
    for kind, path in plan.items():
        image_format(path)
        if sizes and kind in sizes:
            check_image_size(path, sizes[kind], f"the {kind} output {path}")
        check_output(path, overwrite=overwrite, protected=protected)
        key = Path(os.path.abspath(path))
        if key in seen:
            raise OutputFileError(f"the {seen[key]} and the {kind} outputs would both be {path}; "
                                  "give each output its own name.")
        seen[key] = kind
    return plan


def load_pipeline(args: argparse.Namespace):
    """The pipeline of --model (default: the embedded model), on --device in --dtype."""
    from diffedit.pipeline import DiffEditPipeline
    return DiffEditPipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype, preset=args.preset)


def check_schedule(pipe, steps: int, strengths: dict[str, float]) -> None:
    """Refuse step counts the model's scheduler cannot run (before any UNet call)."""
    for name, value in strengths.items():
        pipe.scheduler.step_pairs(steps, value, name, "--steps")


# ---------------------------------------------------------------------- the commands

def edit_cost(k: int, samples: int, guidance: float, with_mask: bool) -> int:
    """UNet samples of one edit of k steps: 2n (mask) + k (encoding) + k, or 2k with guidance (decoding)."""
    return (2 * samples if with_mask else 0) + k + (2 * k if guidance != 1.0 else k)

def run_edit(args: argparse.Namespace) -> int:
    import torch

    from PIL import ImageOps

    from diffedit.io.files import user_path
    from diffedit.io.images import load_image
    from diffedit.io.saving import save_images
    from diffedit.io.pictures import (
        mask_picture,
        overlay_mask,
        read_mask_image,
        side_by_side,
        side_by_side_size,
    )
    from diffedit.io.progress import UNetProgress
    source, target = check_prompts(args.source, args.target)
    if args.mask and args.mask_out is not None:
        raise ParameterError(f"--mask-out writes the mask DiffEdit computes, but --mask {args.mask} gives the mask "
                             "and none is computed; leave out --mask-out.")
    image_path = user_path(args.image, ImageInputError)
    image = load_image(image_path)
    user_mask = read_mask_image(args.mask, image.size) if args.mask else None
    wanted = {"edit": args.out, "mask": args.mask_out, "panel": args.panel_out}
    if user_mask is not None:  # the user's mask is not written again
        del wanted["mask"]
    protected = [image_path] + ([Path(args.mask)] if args.mask else [])
    title = f"source: {source or '(empty)'}\ntarget: {target}"
    sizes = {"edit": image.size, "mask": image.size,
             "panel": side_by_side_size([image.size] * 3, PANEL_LABELS, min_side=PANEL_MIN_SIDE, title=title)}
    outputs = plan_outputs(image_path, wanted, args.overwrite, protected,
                           {"edit": "--out", "mask": "--mask-out", "panel": "--panel-out"}, sizes)
    pipe = load_pipeline(args)
    check_schedule(pipe, args.num_inference_steps,
                   {"--strength": args.strength, "--mask-noise": args.mask_noise_strength})

    generator = torch.Generator().manual_seed(args.seed)
    k = pipe.scheduler.num_steps(args.num_inference_steps, args.strength)
    work = UNetProgress(pipe, edit_cost(k, args.mask_samples, args.guidance_scale, user_mask is None),
                        enabled=not args.quiet)
    try:
        encoded = pipe.encode_image(image)
        if user_mask is None:
            work.phase("mask")
            mask = pipe.generate_mask(encoded, source, target, num_samples=args.mask_samples,
                                      noise_strength=args.mask_noise_strength,
                                      num_inference_steps=args.num_inference_steps, threshold=args.threshold,
                                      generator=generator)
            mask_image = mask.mask_images[0]   # an empty mask: edit() says so
        else:
            mask = user_mask
            mask_image = mask_picture(user_mask)
        inversion = pipe.invert(encoded, strength=args.strength, num_inference_steps=args.num_inference_steps,
                                callback=work.phase("encode"))
        result = pipe.edit(inversion, mask, target, strength=args.strength,
                           num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                           generator=generator, callback=work.phase("decode"))
        work.update("done")
    finally:
        work.close()
    edited = result.images[0]
    pictures = {"edit": edited, "mask": mask_image,
                "panel": side_by_side([image, overlay_mask(image, ImageOps.invert(mask_image.convert("L")), (0, 0, 0), 0.7),
                                       edited], labels=PANEL_LABELS, min_side=PANEL_MIN_SIDE, title=title)}
    save_images({path: pictures[kind] for kind, path in outputs.items()}, overwrite=args.overwrite,
                protected=protected)  # all of them or none
    for kind, path in outputs.items():
        _report(args, kind, path)
    return 0


def run_mask(args: argparse.Namespace) -> int:
    import torch

    from diffedit.io.files import user_path
    from diffedit.io.images import load_image
    from diffedit.io.saving import save_image
    from diffedit.io.progress import UNetProgress
    source, target = check_prompts(args.source, args.target)
    image_path = user_path(args.image, ImageInputError)
    image = load_image(image_path)
    outputs = plan_outputs(image_path, {"mask": args.out}, args.overwrite, [image_path], {"mask": "--out"},
                           {"mask": image.size})
    pipe = load_pipeline(args)
    check_schedule(pipe, args.num_inference_steps, {"--mask-noise": args.mask_noise_strength})
    work = UNetProgress(pipe, 2 * args.mask_samples, enabled=not args.quiet)
    try:
        work.phase("mask")
        mask = pipe.generate_mask(image, source, target, num_samples=args.mask_samples,
                                  noise_strength=args.mask_noise_strength, num_inference_steps=args.num_inference_steps,
                                  threshold=args.threshold, generator=torch.Generator().manual_seed(args.seed))
        work.update("done")
    finally:
        work.close()
    _warn_if_empty(mask)
    save_image(mask.mask_images[0], outputs["mask"], overwrite=args.overwrite, protected=[image_path])
    _report(args, "mask", outputs["mask"])
    return 0


def _warn_if_empty(mask) -> None:
    if not bool(mask.mask.any()):
        warnings.warn("the mask is empty: no region differs between the source and target prompts, so the edit "
                      "would only reconstruct the input; lower --threshold or rephrase the prompts.", UserWarning)


def _report(args: argparse.Namespace, kind: str, path: Path) -> None:
    if not args.quiet:
        print(f"{kind}: {path}", flush=True)


def _lazy(module: str, function: str) -> Callable:
    """diffedit.<module>.<function>, imported when first called (keeps `diffedit --help` fast)."""
    def call(*args):
        import importlib
        return getattr(importlib.import_module(f".{module}", __package__), function)(*args)
    return call


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {
    "edit": Command("edit an image: mask, encode, decode (writes the edit, the mask and a panel)",
                    add_edit_arguments, run_edit),
    "mask": Command("compute only the DiffEdit mask of an image", add_maskcmd_arguments, run_mask),
    "eval": Command("run a benchmark with ground truth (the synthetic shapes world)",
                    _lazy("shapes.eval", "add_arguments"), _lazy("shapes.eval", "run")),
    "sweep": Command("run or resume an ablation grid from a JSON config",
                     _lazy("research.command", "add_arguments"), _lazy("research.command", "run")),
    "bench": Command("run a paper benchmark (imagenet, pie-bench, a pairs file): every method over r",
                     _lazy("research.benchmarks.command", "add_arguments"),
                     _lazy("research.benchmarks.command", "run")),
}


# ---------------------------------------------------------------------- main

class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2 in `main`) instead of printing usage."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`).")


def build_parser(selected: str | None = None) -> ArgumentParser:
    """The parser; only the `selected` command's arguments are added (the others are not needed
    to parse, and adding them would import their modules)."""
    parser = ArgumentParser(prog=exits.PROG, description="DiffEdit (Couairon et al., ICLR 2023) on Stable Diffusion weights.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.help)
        if selected in (None, name):
            command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


COMPILED_LIBRARIES = ("torch", "numpy", "PIL.Image", "safetensors", "tokenizers")  # imported first, see main


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    with exits.handled_signals():
        try:
            argv = sys.argv[1:] if argv is None else argv
            args = build_parser(argv[0] if argv and argv[0] in COMMANDS else "").parse_args(argv)
            with exits.signals_end_at_once():
                for library in COMPILED_LIBRARIES:
                    importlib.import_module(library)
            with warnings.catch_warnings():
                warnings.simplefilter("default")  # each warning once per place it is raised
                status = int(args.run(args) or 0)
            if exits.was_interrupted():  # a library swallowed the KeyboardInterrupt of a Ctrl-C
                raise KeyboardInterrupt
            return status
        except BaseException as e:  # noqa: B036 - every ending is decided in exits.status_of
            status = exits.status_of(e)
            if status is None:
                raise  # a bug (or argparse's --help): shown as it is
            return status


if __name__ == "__main__":
    sys.exit(main())
