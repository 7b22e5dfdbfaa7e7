"""Images out: written atomically by files.atomic_write (temporary file, fsync, rename; never the
input, an existing file only with overwrite=True), several at once all or none; an image larger
than its format holds (files.MAX_SIDE) is refused before anything is written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from diffedit.errors import OutputFileError
from diffedit.io.files import FORMAT_NAMES, _reason, atomic_write, check_image_size, image_format, write_all_or_none
from diffedit.io.images import ALPHA_MODES, as_pil, to_rgb


def save_image(image: Any, path: str | os.PathLike, *, overwrite: bool = False,
               protected: Iterable[str | os.PathLike] = (), quality: int = 95) -> Path:
    """Write an image atomically (files.atomic_write); the format comes from the suffix (.png,
    .jpg/.jpeg, .webp). PIL images keep their mode where the format allows (masks stay 8-bit gray)."""
    return save_images({path: image}, overwrite=overwrite, protected=protected, quality=quality)[0]


def save_images(images: dict[str | os.PathLike, Any], *, overwrite: bool = False,
                protected: Iterable[str | os.PathLike] = (), quality: int = 95) -> list[Path]:
    """Write several images, all or none (files.write_all_or_none): a failure on the last one
    leaves none of them behind, and files they replaced (overwrite) are put back."""
    protected = list(protected)

    def writer(path, image):
        encode = _image_writer(image, path, quality)
        return lambda: atomic_write(path, encode, overwrite=overwrite, protected=protected)
    return write_all_or_none([(path, writer(path, image)) for path, image in images.items()], overwrite=overwrite)


def _image_writer(image: Any, path: str | os.PathLike, quality: int):
    """The function that encodes `image` into an open file; the format's size limit is checked now."""
    fmt = image_format(Path(path))
    picture = image if isinstance(image, Image.Image) else as_pil(image, min_side=1)
    check_image_size(path, picture.size)
    keep = {"PNG": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"), "JPEG": ("L", "RGB"), "WEBP": ("RGB", "RGBA")}
    if picture.mode not in keep[fmt]:
        webp_alpha = fmt == "WEBP" and picture.mode in ALPHA_MODES
        picture = picture.convert("RGBA") if webp_alpha else to_rgb(picture, warn=False)
    options = {"PNG": {}, "JPEG": {"quality": quality}, "WEBP": {"quality": quality}}[fmt]

    def encode(f) -> None:
        try:
            picture.save(f, format=fmt, **options)
        except (ValueError, OSError) as e:
            if isinstance(e, OSError) and e.errno is not None:
                raise  # the file system's error (disk full, ...): atomic_write says so
            other = "a .png name" if fmt != "PNG" else "a .webp or .jpg name"
            raise OutputFileError(f"the {FORMAT_NAMES[fmt]} encoder could not write {path} ({_reason(e)}); "
                                  f"give it {other}.") from None
    return encode
