"""Images, audio and files in a chat message: their tokens, sized from their headers.

A remote URL is never fetched; only ``data:`` URLs (and raw base64) are looked into.

* Images (``image_url``, ``input_image``, ``image`` parts): OpenAI's tile rule, 85 tokens plus
  170 per 512-px tile after scaling to fit 2048x2048 and then to a shortest side of 768 px;
  ``detail: low`` is 85. ``detail: auto`` (or none) is counted as high, because the server may
  choose high. The size is read from a PNG, JPEG, GIF or WebP header; an unknown size counts
  as the documented worst case, 768x2048 -> 8 tiles -> 1445 tokens. (Some models, such as
  gpt-4o-mini and the patch-billed gpt-4.1-mini/nano and o4-mini, price images differently;
  they get this same rule.)
* ``input_audio``: about 10 tokens per second of audio; the duration is read from a WAV
  header, otherwise assumed from the size at 32 kbit/s (which errs high for most codecs).
* ``file`` parts: the file name, plus the decoded text of a ``text/*`` or JSON data URL, plus
  for other data (e.g. PDFs) 765 (a page image at high detail) + 1000 (a dense page of text)
  tokens per page found in the file (at least one). A bare ``file_id`` cannot be seen offline
  and counts only as its JSON.

Example:
    >>> image_tokens(1024, 1024)
    765
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import struct
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "AUDIO_TOKENS_PER_SECOND",
    "IMAGE_BASE_TOKENS",
    "IMAGE_TILE_TOKENS",
    "IMAGE_WORST_CASE_TOKENS",
    "audio_tokens",
    "file_tokens",
    "image_part_tokens",
    "image_tokens",
]

IMAGE_BASE_TOKENS = 85
IMAGE_TILE_TOKENS = 170
# OpenAI's documented worst case for a high-detail image: 768x2048 -> 2x4 tiles.
IMAGE_WORST_CASE_TOKENS = IMAGE_BASE_TOKENS + IMAGE_TILE_TOKENS * 8

AUDIO_TOKENS_PER_SECOND = 10
_AUDIO_ASSUMED_BYTES_PER_SECOND = 4000  # 32 kbit/s: low for speech codecs, so it errs high
_PDF_PAGE_TOKENS = 765 + 1000

# ------------------------------------------------------------------------------ images


def image_tokens(width: int | None, height: int | None, detail: str | None = "high") -> int:
    """Return the tokens OpenAI bills for an image of the given size.

    ``detail="low"`` is always 85. Otherwise the image is scaled to fit 2048x2048, then
    so that its shortest side is at most 768 px, and costs 85 + 170 per 512-px tile. An
    unknown size counts as the worst case, 1445 tokens.

    Example:
        >>> image_tokens(1024, 1024), image_tokens(2048, 4096), image_tokens(None, None)
        (765, 1105, 1445)
    """
    if detail == "low":
        return IMAGE_BASE_TOKENS
    if not width or not height or width <= 0 or height <= 0:
        return IMAGE_WORST_CASE_TOKENS
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        scale = 2048 / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > 768:
        scale = 768 / min(w, h)
        w, h = w * scale, h * scale
    tiles = math.ceil(int(w) / 512) * math.ceil(int(h) / 512)
    return IMAGE_BASE_TOKENS + IMAGE_TILE_TOKENS * tiles


def image_part_tokens(part: Mapping[str, Any]) -> int:
    """Return the tokens of an ``image_url``, ``input_image`` or ``image`` content part.

    Example:
        >>> image_part_tokens({"type": "image_url", "image_url": {"url": "https://x/y.png"}})
        1445
    """
    detail = part.get("detail")
    source: object = None
    kind = part.get("type")
    if kind == "image_url":
        image_url = part.get("image_url")
        if isinstance(image_url, Mapping):
            source = image_url.get("url")
            detail = image_url.get("detail", detail)
        else:
            source = image_url
    elif kind == "input_image":
        source = part.get("image_url")
    else:  # "image": Anthropic's {"source": {...}} or LangChain's base64/url/data keys
        nested = part.get("source")
        if isinstance(nested, Mapping):
            source = nested.get("data") or nested.get("url")
        else:
            source = part.get("base64") or part.get("data") or part.get("url")
    size = _image_size(source) if isinstance(source, str) else None
    width, height = size if size is not None else (None, None)
    return image_tokens(width, height, detail if isinstance(detail, str) else None)


def _data_url_payload(value: str) -> tuple[str, str] | None:
    """``data:<mime>;base64,<payload>`` -> (mime, payload); raw base64 -> ("", value)."""
    if value.startswith("data:"):
        header, sep, payload = value.partition(",")
        if not sep or ";base64" not in header:
            return None
        return header[5:].split(";", 1)[0].strip().lower(), payload
    if value.startswith(("http://", "https://", "file:", "gs://", "s3://")):
        return None
    return "", value


def _b64decode(payload: str, limit: int | None = None) -> bytes:
    chunk = payload if limit is None else payload[:limit]
    chunk = "".join(chunk.split())
    if limit is not None:
        chunk = chunk[: len(chunk) - len(chunk) % 4]
    else:
        chunk += "=" * (-len(chunk) % 4)
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        try:
            return decode(chunk)
        except (binascii.Error, ValueError):
            continue
    return b""


def _image_size(value: str) -> tuple[int, int] | None:
    parsed = _data_url_payload(value)
    if parsed is None:
        return None
    payload = parsed[1]
    head = _b64decode(payload, 1024)
    if head[:3] == b"\xff\xd8\xff":
        # A JPEG's size is in its SOF segment, which may follow a large EXIF block.
        return _jpeg_size(_b64decode(payload))
    return _header_size(head)


def _header_size(data: bytes) -> tuple[int, int] | None:
    """The size in a PNG, GIF or WebP header."""
    size: tuple[int, int] | None = None
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        size = struct.unpack(">II", data[16:24])
    elif data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        size = struct.unpack("<HH", data[6:10])
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8X":
            size = (
                int.from_bytes(data[24:27], "little") + 1,
                int.from_bytes(data[27:30], "little") + 1,
            )
        elif chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
            w, h = struct.unpack("<HH", data[26:30])
            size = (w & 0x3FFF, h & 0x3FFF)
        elif chunk == b"VP8L" and data[20:21] == b"\x2f":
            bits = int.from_bytes(data[21:25], "little")
            size = ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if size is None or size[0] <= 0 or size[1] <= 0:
        return None
    return size


_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in _JPEG_SOF:
            if i + 9 > n:
                return None
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return (width, height) if width and height else None
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any SOF
            return None
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        i += 2 + length
    return None


# ------------------------------------------------------------------------------- audio


def audio_tokens(spec: object) -> int | None:
    """Return the tokens of an ``input_audio`` part's spec, or None if it has no data.

    Example:
        >>> audio_tokens({"data": "A" * 16000, "format": "mp3"})  # 12,000 bytes: 3 s
        30
    """
    if not isinstance(spec, Mapping) or not isinstance(spec.get("data"), str):
        return None
    data: str = spec["data"]
    parsed = _data_url_payload(data)
    payload = parsed[1] if parsed is not None else data
    seconds: float | None = None
    if str(spec.get("format", "")).lower() == "wav":
        seconds = _wav_seconds(_b64decode(payload))
    if seconds is None:
        seconds = (len(payload) * 3 / 4) / _AUDIO_ASSUMED_BYTES_PER_SECOND
    return max(1, math.ceil(seconds * AUDIO_TOKENS_PER_SECOND))


def _wav_seconds(data: bytes) -> float | None:
    import wave

    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            rate = wav.getframerate()
            return wav.getnframes() / rate if rate else None
    except (wave.Error, EOFError, struct.error, ValueError):
        return None


# ------------------------------------------------------------------------------- files

_TEXT_MIMES = ("text/", "application/json", "application/xml", "application/x-ndjson")
_PDF_PAGE = re.compile(rb"/Type\s*/Page(?![a-zA-Z])")
_PDF_COUNT = re.compile(rb"/Type\s*/Pages\b[^>]*?/Count\s+(\d+)|/Count\s+(\d+)[^>]*?/Type\s*/Pages")


def file_tokens(spec: Mapping[str, Any], count: Callable[[object], int]) -> int:
    """Return the tokens of a ``file`` part's spec.

    Args:
        spec: the part's ``file`` mapping (``filename``, ``file_data``, ``file_id``, ...).
        count: counts a text, or the JSON rendering of any other value.

    Example:
        >>> words = lambda value: len(str(value).split())
        >>> file_tokens({"filename": "a.txt", "file_data": "data:text/plain;base64,aGkgdGhlcmU="},
        ...             words)
        3
    """
    tokens = 0
    filename = spec.get("filename")
    if filename is not None:
        tokens += count(filename)
    data = spec.get("file_data")
    if not isinstance(data, str):
        others = {k: v for k, v in spec.items() if k not in ("filename", "file_data")}
        return tokens + (count(others) if others else 0)
    parsed = _data_url_payload(data)
    if parsed is None:
        return tokens + count(data)
    mime, payload = parsed
    if mime.startswith(_TEXT_MIMES):
        return tokens + count(_b64decode(payload).decode("utf-8", "replace"))
    if mime.startswith("image/"):
        size = _image_size(data)
        return tokens + image_tokens(*(size or (None, None)))
    return tokens + _pdf_pages(_b64decode(payload)) * _PDF_PAGE_TOKENS


def _pdf_pages(data: bytes) -> int:
    pages = len(_PDF_PAGE.findall(data))
    for match in _PDF_COUNT.finditer(data):
        pages = max(pages, int(match.group(1) or match.group(2)))
    return max(1, pages)
