"""Decode one source image by content, convert to RGB, shrink, re-encode as baseline JPEG.

    encoded = encode_image(data, max_side=400, quality=90)   # -> Encoded(jpeg, width, height, ...)

What torchvision's ImageFolder sees is what we store: PIL decode, no EXIF rotation, `convert("RGB")`
(CMYK, L, P, RGBA, I;16 ... all end as 3-channel RGB; alpha is dropped, not composited). Any input
that cannot be decoded raises `BadImage` with a short reason that goes into the pack summary.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

# 16-bit width/height in FFCV's image metadata
MAX_DIMENSION = 65535


class BadImage(Exception):
    """The input is not a decodable image; str(error) is the reason shown to the user."""


@dataclass(frozen=True)
class Encoded:
    jpeg: bytes  # baseline RGB JPEG
    width: int  # of the stored JPEG
    height: int
    source_width: int  # of the decoded source, before shrinking
    source_height: int
    source_format: str  # what PIL recognised ("JPEG", "PNG", ...), whatever the file's name


def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(w, h) with the longer side at most max_side (0: unchanged), aspect ratio kept, >= 1 px."""
    longer = max(width, height)
    if max_side <= 0 or longer <= max_side:
        return width, height
    scale = max_side / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_image(data: bytes, max_side: int, quality: int) -> Encoded:
    if not data:
        raise BadImage("empty file (0 bytes)")
    source_format = "image"  # until PIL has identified it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            source_format = image.format or "unknown"
            source_size = image.size
            size = target_size(*source_size, max_side)
            if source_format == "JPEG" and size != source_size:
                # DCT-domain downscale while decoding (1/2, 1/4, 1/8), never below the target size
                image.draft(None, size)
            image.load()
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImage(f"image too large to decode safely: {error}") from None
    except OSError as error:  # truncated data, broken Huffman tables, bad PNG chunks ...
        reason = str(error) or type(error).__name__
        if "truncated" in reason.lower():
            raise BadImage(f"truncated {source_format} file: {reason}") from None
        raise BadImage(f"corrupt {source_format} file: {reason}") from None
    except (ValueError, SyntaxError, EOFError) as error:
        raise BadImage(f"corrupt image: {error}") from None

    try:
        image = image.convert("RGB")  # same call as torchvision's pil_loader
        if image.size != size:
            # area averaging (OpenCV's INTER_AREA, what FFCV's writer uses); the cheapest
            # antialiased filter in Pillow, ~30 % faster than BILINEAR at 500 -> 400 px
            image = image.resize(size, Image.Resampling.BOX)
    except (OSError, ValueError) as error:
        raise BadImage(f"cannot convert {image.mode} image to RGB: {error}") from None
    if max(size) > MAX_DIMENSION:
        raise BadImage(f"{size[0]}x{size[1]} px is larger than {MAX_DIMENSION} px per side (use --max-side)")
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality, optimize=False, progressive=False)
    return Encoded(out.getvalue(), size[0], size[1], source_size[0], source_size[1], source_format)


def encode_file(path: str, max_side: int, quality: int) -> Encoded:
    """Read and encode one file; unreadable files are `BadImage` too."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise BadImage(f"cannot read file: {error.strerror or error}") from None
    return encode_image(data, max_side, quality)
