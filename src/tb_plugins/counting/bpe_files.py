"""Find tiktoken's BPE files on this machine, hash-checked, without importing LiteLLM.

tiktoken would download an encoding's BPE file on first use. tb_plugins never lets it: the
file is looked for in ``$TIKTOKEN_CACHE_DIR`` first, then among the copies LiteLLM ships in
its package (found with :func:`importlib.util.find_spec`, which never runs the package:
importing LiteLLM is slow). A file counts only if its SHA-256 is the one tiktoken expects.
:mod:`~tb_plugins.counting.encoders` loads the encoding from the file found here.

This module is imported only when an encoding is first loaded (it needs :mod:`hashlib`).

Example:
    >>> path = tiktoken_bpe_file("cl100k_base")
    >>> path is None or path.name == "9b5ad71b2ce5302211f9c61530b329a4922fc6a4"
    True
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import NamedTuple

from tb_plugins.core._assets import litellm_package_dir

__all__ = ["TIKTOKEN_FILES", "BpeFile", "file_sha256", "tiktoken_bpe_file", "tiktoken_cache_key"]


class BpeFile(NamedTuple):
    """Where tiktoken downloads one encoding from, and the file's SHA-256."""

    url: str
    sha256: str


# The URLs and hashes tiktoken_ext.openai_public uses: tiktoken caches a download
# under sha1(url), and LiteLLM ships its copies under those same names.
TIKTOKEN_FILES: dict[str, BpeFile] = {
    "o200k_base": BpeFile(
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "cl100k_base": BpeFile(
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
    "p50k_base": BpeFile(
        "https://openaipublic.blob.core.windows.net/encodings/p50k_base.tiktoken",
        "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069",
    ),
}


def tiktoken_cache_key(encoding_name: str) -> str | None:
    """Return the file name tiktoken caches ``encoding_name`` under, if known.

    Example:
        >>> tiktoken_cache_key("o200k_base")
        'fb374d419588a4632f3f557e76b4b70aebbca790'
    """
    entry = TIKTOKEN_FILES.get(encoding_name)
    if entry is None:
        return None
    return hashlib.sha1(entry.url.encode()).hexdigest()


def _search_dirs() -> list[Path]:
    dirs: list[Path] = []
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR")
    if cache_dir:
        dirs.append(Path(cache_dir))
    package = litellm_package_dir()
    if package is not None:
        dirs.append(package / "litellm_core_utils" / "tokenizers")
    return dirs


def file_sha256(path: Path) -> str:
    """Return the hex SHA-256 of a file's bytes.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile() as f:
        ...     file_sha256(Path(f.name))[:8]
        'e3b0c442'
    """
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tiktoken_bpe_file(encoding_name: str) -> Path | None:
    """Return a local, hash-verified BPE file for ``encoding_name``, or ``None``.

    ``$TIKTOKEN_CACHE_DIR`` is searched first, then LiteLLM's bundled
    tokenizers. A file whose SHA-256 differs from tiktoken's is skipped: handed to
    tiktoken, it would make tiktoken delete it and download a fresh copy.

    Example:
        >>> p = tiktoken_bpe_file("o200k_base")
        >>> p is None or p.is_file()
        True
    """
    key = tiktoken_cache_key(encoding_name)
    if key is None:
        return None
    expected = TIKTOKEN_FILES[encoding_name].sha256
    for directory in _search_dirs():
        candidate = directory / key
        try:
            if candidate.is_file() and file_sha256(candidate) == expected:
                return candidate
        except OSError:
            continue
    return None
