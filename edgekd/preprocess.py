"""The declared, versioned eval preprocessing: one function shared by training and the device runtime.

numpy and Pillow only (no torch), so `edgekd.runtime` runs it on a device. A `PreprocessSpec` says how an
image becomes the model's input:

    open (regular files only, at most `max_pixels`) -> colour mode -> resize -> centre crop
    -> x = (pixels * scale - mean) / std, float32 (C, H, W)

resize: an int resizes the shorter side to it, keeping the aspect ratio (int(n * long / short) for the
other side, as torchvision's Resize(int)); [h, w] resizes to exactly that; None keeps the size. Pillow's
bilinear filter (antialiased when shrinking). crop: [h, w] taken from the centre, top = round((H - h) / 2).

Source modes are converted by one documented rule: 1/L/P/RGB/RGBA/LA/PA/CMYK/YCbCr/LAB/HSV go through
Pillow's `Image.convert(mode)` (alpha is dropped, not composited; palettes are expanded; CMYK uses Pillow's
plain conversion without an ICC profile); 16/32-bit integer and float images (I, I;16*, F) are refused
because Pillow's conversion would clip them to 255. EXIF orientation is not applied (as torchvision).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import EdgekdError

SPEC_VERSION = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")   # what folders and shards read
# Pillow's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS, 89,478,485 pixels, about 9459 x 9459)
MAX_PIXELS = 89_478_485
NAMED_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),   # RGB, on pixels scaled to [0, 1]
}
MODES = ("RGB", "L")
CONVERTIBLE = ("1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "LA", "La", "PA", "CMYK", "YCbCr", "LAB", "HSV")


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes a float32 (C, H, W) model input; see the module docstring for each step.

    mean/std are per channel (one value or one per channel of `mode`); a name from NAMED_STATS
    ("imagenet") is resolved to its numbers when the spec is built, so a stored spec holds numbers only.
    """

    mode: str = "RGB"                                  # "RGB" | "L"
    resize: int | tuple[int, int] | None = None        # shorter side, or exact (h, w), or None
    crop: tuple[int, int] | None = None                # centre crop (h, w), or None
    scale: float = 1.0 / 255.0                         # pixels (uint8) -> [0, 1]
    mean: tuple[float, ...] | str = (0.0,)
    std: tuple[float, ...] | str = (1.0,)
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        if self.version != SPEC_VERSION:
            raise EdgekdError(f"preprocessing: spec version {self.version!r} is not supported (this edgekd reads "
                              f"version {SPEC_VERSION}); rebuild the bundle with a matching edgekd")
        if self.mode not in MODES:
            raise EdgekdError(f"preprocessing.mode: {self.mode!r}; expected one of {', '.join(MODES)}")
        object.__setattr__(self, "resize", _size(self.resize, "resize", allow_int=True))
        object.__setattr__(self, "crop", _size(self.crop, "crop", allow_int=False))
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool) or not self.scale > 0:
            raise EdgekdError(f"preprocessing.scale: {self.scale!r}; expected a positive number (1/255 for uint8)")
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "mean", _stats(self.mean, "mean", self.channels))
        object.__setattr__(self, "std", _stats(self.std, "std", self.channels))
        if min(self.std) <= 0:
            raise EdgekdError(f"preprocessing.std: {list(self.std)}; every value must be positive")

    @property
    def channels(self) -> int:
        return 3 if self.mode == "RGB" else 1

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the output for a source image of this size."""
        h, w = _resized(self.resize, height, width)
        return self.crop if self.crop is not None else (h, w)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON writes and reads them back (tuples as lists), for manifests and fingerprints."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: Any, where: str = "preprocessing") -> PreprocessSpec:
        if not isinstance(d, dict):
            raise EdgekdError(f"{where}: expected a table of preprocessing keys, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise EdgekdError(f"{where}: unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(known))}")
        try:
            return cls(**d)
        except EdgekdError as e:
            raise EdgekdError(f"{where}: {e}") from None


def _size(value: Any, key: str, allow_int: bool) -> int | tuple[int, int] | None:
    if value is None:
        return None
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise EdgekdError(f"preprocessing.{key}: {value}; expected a positive size")
        return value
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        return (int(value[0]), int(value[1]))
    expected = "an int (shorter side) or [height, width]" if allow_int else "[height, width]"
    raise EdgekdError(f"preprocessing.{key}: {value!r}; expected {expected} of positive ints, or none")


def _stats(value: Any, key: str, channels: int) -> tuple[float, ...]:
    """mean or std (`key`) as numbers: one, one per channel, or a NAMED_STATS name's."""
    if isinstance(value, str):
        if value not in NAMED_STATS:
            raise EdgekdError(f"preprocessing.{key}: unknown statistics {value!r}; expected numbers or "
                              f"one of {', '.join(NAMED_STATS)}")
        value = NAMED_STATS[value][key == "std"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,)
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise EdgekdError(f"preprocessing.{key}: {value!r}; expected numbers, one or one per channel") from None
    if len(out) not in (1, channels) or not all(np.isfinite(out)):
        raise EdgekdError(f"preprocessing.{key}: {list(out)}; expected 1 or {channels} finite values for "
                          f"{channels}-channel images")
    return out


def _resized(resize: int | tuple[int, int] | None, height: int, width: int) -> tuple[int, int]:
    if resize is None:
        return height, width
    if isinstance(resize, tuple):
        return resize
    if height <= width:
        return resize, int(resize * width / height)
    return int(resize * height / width), resize


def _name(image: Any) -> str:
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return getattr(image, "filename", "") or f"<{type(image).__name__}>"


def open_image(image: Any, mode: str = "RGB", max_pixels: int = MAX_PIXELS):
    """A decoded PIL image in `mode` from a path (regular files only), encoded bytes, a PIL image or a uint8
    (H, W[, C]) array. Anything unreadable is one EdgekdError naming the file: not a regular file (a FIFO or a
    device never blocks: it is opened non-blocking and checked), empty, truncated, corrupt, a mode outside
    CONVERTIBLE, or more than `max_pixels` pixels (checked from the header, before decoding)."""
    from PIL import Image

    name = _name(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise EdgekdError(f"image array of dtype {image.dtype} and shape {image.shape}: expected uint8 "
                              "(H, W) or (H, W, 1|3|4) pixels 0..255")
        image = Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    if isinstance(image, Image.Image):
        return _convert(image, mode, name, max_pixels)
    if isinstance(image, (bytes, bytearray, memoryview)):
        if not len(image):
            raise EdgekdError("image bytes: empty (0 bytes); expected an encoded image (JPEG, PNG, ...)")
        return _decode(io.BytesIO(bytes(image)), mode, "bytes", max_pixels)   # messages: "image bytes: ..."
    if not isinstance(image, (str, os.PathLike)):
        raise EdgekdError(f"image {name}: expected a path, encoded bytes, a PIL image or a uint8 array")
    with _open_file(image) as f:
        return _decode(f, mode, name, max_pixels)


def probe_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) of an image file from its header alone, with open_image's checks on everything but the
    pixel data (so a truncated body is only found when decoding)."""
    from PIL import Image

    name = str(path)
    with _open_file(path) as f, _pillow_errors(name), Image.open(f) as im:
        _check(im, name, max_pixels)
        return im.height, im.width


@contextlib.contextmanager
def _pillow_errors(name: str) -> Iterator[None]:
    """Pillow's decompression-bomb warning/error and decoding errors as one-line EdgekdErrors naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise EdgekdError(f"image {name}: larger than Pillow's decompression-bomb limit "
                          f"({Image.MAX_IMAGE_PIXELS} pixels); refused") from None
    except UnidentifiedImageError:
        raise EdgekdError(f"image {name}: not a readable image (unknown or corrupt format)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:   # truncated or corrupt data
        raise EdgekdError(f"image {name}: not a readable image ({e})") from None


def _open_file(path: str | os.PathLike) -> Any:
    """A binary file object for a regular, non-empty file; opened non-blocking so a FIFO cannot hang us."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise EdgekdError(f"image {path}: cannot open ({e.strerror})") from None
    f = os.fdopen(fd, "rb")
    info = os.fstat(fd)
    problem = ("not a regular file (a FIFO, device or socket); only files are read"
               if not stat.S_ISREG(info.st_mode) else "empty file (0 bytes)" if info.st_size == 0 else None)
    if problem:
        f.close()
        raise EdgekdError(f"image {path}: {problem}")
    return f


def _decode(f: Any, mode: str, name: str, max_pixels: int):
    from PIL import Image

    with _pillow_errors(name), Image.open(f) as im:
        _check(im, name, max_pixels)   # from the header, before anything is decoded
        im.load()
        return _convert(im, mode, name, max_pixels)


def _check(im: Any, name: str, max_pixels: int) -> None:
    """Refuse an image of more than `max_pixels` pixels or of a mode outside CONVERTIBLE."""
    if im.width * im.height > max_pixels:
        raise EdgekdError(f"image {name}: {im.width}x{im.height} is {im.width * im.height} pixels, more than the "
                          f"limit of {max_pixels}; refused (a decompression bomb or an image to shrink first)")
    if im.mode not in CONVERTIBLE:
        raise EdgekdError(f"image {name}: mode {im.mode} (16/32-bit or float pixels) is not supported; save it as "
                          "8-bit RGB or greyscale")


def _convert(im: Any, mode: str, name: str, max_pixels: int):
    _check(im, name, max_pixels)
    return im if im.mode == mode else im.convert(mode)


def apply(spec: PreprocessSpec, image: Any, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The eval transform: an image (path, bytes, PIL image, uint8 array) -> float32 (C, H, W) model input."""
    from PIL import Image

    im = open_image(image, spec.mode, max_pixels)
    h, w = _resized(spec.resize, im.height, im.width)
    if (h, w) != (im.height, im.width):
        im = im.resize((w, h), Image.BILINEAR)
    if spec.crop is not None:
        ch, cw = spec.crop
        if ch > h or cw > w:
            raise EdgekdError(f"image {_name(image)}: {w}x{h} after resizing is smaller than the crop "
                              f"[{ch}, {cw}]; raise [data] resize or lower crop")
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
        im = im.crop((left, top, left + cw, top + ch))
    x = np.asarray(im, dtype=np.float32)
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    return np.ascontiguousarray(normalize(spec, x * np.float32(spec.scale)))   # C-order (C, H, W), not HWC strides


def normalize(spec: PreprocessSpec, x: np.ndarray) -> np.ndarray:
    """(x - mean) / std per channel on axis -3 of scaled pixels (C, H, W) or (N, C, H, W)."""
    mean = np.asarray(spec.mean, np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, np.float32).reshape(-1, 1, 1)
    return ((x - mean) / std).astype(np.float32, copy=False)


def is_image_file(path: str | Path) -> bool:
    """True for a regular file (not a FIFO, device or socket; symlinks followed). Never opens it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False
