"""The project's own exceptions: one small family, each carrying one sentence that says what is
wrong and what to do. The CLI prints that sentence on stderr and exits with status 2."""


class DiffEditError(Exception):
    """Base class: a user error with a one-sentence message (what is wrong, what to do)."""


class ImageInputError(DiffEditError, ValueError):
    """An input image cannot be used (missing, not an image, corrupt, too small or too large)."""


class PromptError(DiffEditError, ValueError):
    """A prompt cannot be used (empty, or source equal to target where a mask is needed)."""


class ParameterError(DiffEditError, ValueError):
    """A numeric or named parameter is out of range or unknown (strength, steps, dtype, device...)."""


class ModelLoadError(DiffEditError):
    """Weights cannot be loaded (missing folder or file, corrupt file, wrong architecture)."""


class UnsafeCheckpointError(ModelLoadError):
    """A pickle checkpoint asked to run code while being loaded; it was refused."""


class NumericalError(DiffEditError, FloatingPointError):
    """NaN or inf appeared in latents or images."""


class OutputFileError(DiffEditError, OSError):
    """An output cannot be written (it exists, it is the input, or the folder is not writable)."""
