"""Check one encoded image before it goes into a shard: keep, convert to RGB, or skip by reason.

ImageNet holds a few CMYK JPEGs, grayscale JPEGs and one PNG named .JPEG; downloads can add
zero-byte, truncated or corrupt files. Convertible images become RGB in the source's native
format (JPEG at `jpeg_quality`, PNG for the synthetic set); the rest raise SkipImage with a
reason that prep counts in its manifest. Valid RGB images in the native format keep their
original bytes (no re-encoding loss) unless a resize is asked for.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

# PIL's name for the format -> WebDataset extension.
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png"}
EXT_FORMAT = {v: k for k, v in FORMAT_EXT.items()}
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


class SkipImage(Exception):
    """Not convertible; `reason` is one of: empty, corrupt, truncated."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class CheckedImage:
    data: bytes
    ext: str  # "jpg" | "png"
    original_size: tuple[int, int]  # (width, height) of the input
    converted: str | None  # None, or why it was re-encoded: cmyk, grayscale, png_in_jpeg, ...


def _conversion_reason(fmt: str, mode: str, native_ext: str) -> str | None:
    if mode == "CMYK":
        return "cmyk"
    if mode in GRAY_MODES:
        return "grayscale"
    if FORMAT_EXT.get(fmt) != native_ext:
        return f"{fmt.lower()}_in_{native_ext}".replace("jpg", "jpeg")
    if mode != "RGB":
        return f"mode_{mode.lower()}"
    return None


def encode(image: Image.Image, ext: str, jpeg_quality: int) -> bytes:
    buf = io.BytesIO()
    if ext == "jpg":
        image.save(buf, format="JPEG", quality=jpeg_quality, subsampling=0 if jpeg_quality >= 90 else 2)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    scale = size / min(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(new, Image.Resampling.BICUBIC)


def check_image(
    data: bytes, native_ext: str = "jpg", resize: int | None = None, jpeg_quality: int = 95
) -> CheckedImage:
    """Validate and (if needed) convert one image; raises SkipImage when it cannot be used.

    `resize` shrinks the shorter side to `resize` (bicubic) when it is larger; smaller images
    are kept as they are (upsampling here would only cost storage).
    """
    if not data:
        raise SkipImage("empty")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns on odd EXIF / palette transparency
        try:  # header
            image = Image.open(io.BytesIO(data))
            fmt, mode, size = image.format or "", image.mode, image.size
        except Exception as exc:
            reason = "truncated" if "truncated" in str(exc).lower() else "corrupt"
            raise SkipImage(reason, f"{type(exc).__name__}: {exc}") from None
        if fmt == "JPEG":
            # DCT-scaled decode: every entropy-coded byte is still parsed (so truncation and
            # stream errors surface) at about half the cost of a full decode.
            image.draft(None, (-(-size[0] // 8), -(-size[1] // 8)))
        try:  # pixel data: ends early = truncated; any other decode error = corrupt
            image.load()
        except Exception as exc:
            reason = "truncated" if "truncated" in str(exc).lower() else "corrupt"
            raise SkipImage(reason, f"{type(exc).__name__}: {exc}") from None

    reason = _conversion_reason(fmt, mode, native_ext)
    needs_resize = resize is not None and min(size) > resize
    if reason is None and not needs_resize:
        return CheckedImage(data, native_ext, size, None)
    if image.size != size:  # drafted for the check: decode again at full size to convert
        image = Image.open(io.BytesIO(data))
        image.load()
    if mode != "RGB":
        # PIL inverts Adobe CMYK JPEGs on load, so a plain convert gives the right colours.
        image = image.convert("RGBA").convert("RGB") if mode in ("P", "PA", "LA") else image.convert("RGB")
    if needs_resize:
        image = resize_shorter_side(image, resize)
    return CheckedImage(encode(image, native_ext, jpeg_quality), native_ext, size, reason)
