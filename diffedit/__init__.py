"""DiffEdit on Stable Diffusion, from scratch.

    from diffedit import DiffEditPipeline
    pipe = DiffEditPipeline.from_pretrained()      # the embedded model, or a folder / file / hub id
"""

__version__ = "0.1.0"

_EXPORTS = {
    "DiffEditPipeline": "pipeline",
    "load_model": "checkpoints.loading",
    "DiffEditError": "errors",
    "MaskResult": "results", "Inversion": "results", "EditResult": "results", "DiffEditResult": "results",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    """Import on first use, so `import diffedit` stays cheap (no torch until needed)."""
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'diffedit' has no attribute {name!r}")
