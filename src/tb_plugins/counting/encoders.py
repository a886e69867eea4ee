"""Encoders: tiktoken encodings loaded once per process from local files, or a byte estimate.

tiktoken never downloads here. An encoding is built from the hash-checked local file
:mod:`~tb_plugins.counting.bpe_files` finds (``$TIKTOKEN_CACHE_DIR``, else the copy LiteLLM
ships in its package). With no such file, or without tiktoken, counts fall back to UTF-8
bytes / 3 and one :class:`~tb_plugins.warnings.ApproximateCountWarning` says how to get exact
counts.

``TIKTOKEN_CACHE_DIR`` is the only way to point tiktoken at a folder, so
:func:`get_encoding_offline` sets it while ``tiktoken.get_encoding`` runs and puts it back
(unset, or its old value) before returning. That happens the first time each encoding is
needed, under the loader's lock; importing this package writes nothing to ``os.environ``.

Example:
    >>> encoder = load("o200k_base")
    >>> encoder.name, encoder.count("Hello world")
    ('o200k_base', 2)
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from tb_plugins.counting._fast import buffer_counter
from tb_plugins.warnings import ApproximateCountWarning

if TYPE_CHECKING:
    import tiktoken

__all__ = [
    "CHUNK_CHARS",
    "ByteEstimate",
    "Encoder",
    "EncodingLoader",
    "TiktokenEncoder",
    "chunks",
    "get_encoding_offline",
    "load",
    "peek",
]

CHUNK_CHARS = 8192


class Encoder(Protocol):
    """Counts the tokens of plain text in one encoding."""

    @property
    def name(self) -> str:
        """The encoding's name; cache keys include it."""
        ...

    def count(self, text: str) -> int:
        """Return the tokens of ``text``, special-token text counted as plain text."""
        ...


class TiktokenEncoder:
    """An exact count with a tiktoken encoding."""

    __slots__ = ("_count", "encoding", "name")

    def __init__(self, name: str, encoding: tiktoken.Encoding) -> None:
        self.name = name
        self.encoding = encoding
        self._count = buffer_counter(encoding)

    def _piece(self, text: str) -> int:
        fast = self._count
        if fast is not None:
            try:
                return fast(text)
            except UnicodeEncodeError:  # lone surrogates: encode_ordinary repairs them
                pass
        # encode_ordinary: special-token text in a prompt is plain text to the API.
        return len(self.encoding.encode_ordinary(text))

    def count(self, text: str) -> int:
        """Return the tokens of ``text`` (long text is encoded in :func:`chunks`)."""
        if len(text) > CHUNK_CHARS:
            return sum(self._piece(chunk) for chunk in chunks(text))
        return self._piece(text)


def chunks(text: str) -> Iterator[str]:
    """Split long text where tiktoken's pre-tokenizer splits anyway, so counts stay exact.

    BPE cost grows faster than linearly on long runs without spaces (a long run of dots, say),
    which a client could send on purpose. A single space between two non-space characters
    always starts a new pre-token in the OpenAI encodings, so cutting just before one changes
    nothing; a run with no such space is cut hard, at most one token off per cut.

    Example:
        >>> [len(c) for c in chunks("word " * 4000)]
        [8189, 8190, 3621]
    """
    start, end = 0, len(text)
    while end - start > CHUNK_CHARS:
        lo, cut = start + CHUNK_CHARS // 2, start + CHUNK_CHARS
        i = text.rfind(" ", lo, cut)
        while i > lo and (text[i - 1].isspace() or text[i + 1].isspace()):
            i = text.rfind(" ", lo, i)
        if i > lo:
            cut = i
        yield text[start:cut]
        start = cut
    yield text[start:]


class ByteEstimate:
    """The fallback without a tokenizer: UTF-8 bytes / 3, rounded up."""

    __slots__ = ()
    name = "utf8-bytes/3"

    def count(self, text: str) -> int:
        """Return a third of ``text``'s UTF-8 length, rounded up."""
        return -(-len(text.encode("utf-8", "surrogatepass")) // 3)


class EncodingLoader:
    """Loads each tiktoken encoding once per process, from local files only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._encoders: dict[str, Encoder] = {}
        self._warned = False

    def get(self, name: str) -> Encoder:
        """Return the encoder for encoding ``name``, loading it on first use."""
        encoder = self._encoders.get(name)
        if encoder is None:
            with self._lock:
                encoder = self._encoders.get(name)
                if encoder is None:
                    encoder = self._load(name)
                    self._encoders[name] = encoder
        return encoder

    def peek(self, name: str) -> Encoder | None:
        """The encoder for ``name`` if it is loaded already (never loads it)."""
        return self._encoders.get(name)

    def _load(self, name: str) -> Encoder:
        try:
            import tiktoken
            import tiktoken.registry
        except ImportError:
            return self._fallback(name, "tiktoken is not installed")
        loaded = tiktoken.registry.ENCODINGS.get(name)
        if loaded is not None:
            return TiktokenEncoder(name, loaded)
        from tb_plugins.counting import bpe_files  # hashlib: only when needed

        path = bpe_files.tiktoken_bpe_file(name)
        if path is None:
            return self._fallback(name, f"no local BPE file for {name}")
        try:
            encoding = get_encoding_offline(tiktoken, name, str(path.parent))
        except Exception as exc:  # any failure here must degrade, not break the call
            return self._fallback(name, f"loading {path} failed: {exc}")
        return TiktokenEncoder(name, encoding)

    def _fallback(self, name: str, reason: str) -> Encoder:
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"tb_plugins: {reason}; token counts are approximate (UTF-8 bytes / 3, "
                "times the approximation margin). For exact counts install "
                "'tb-plugins[litellm]' (it ships the tokenizer files) or set "
                "TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached encodings.",
                ApproximateCountWarning,
                stacklevel=2,
            )
        return ByteEstimate()


def get_encoding_offline(module: Any, name: str, directory: str) -> tiktoken.Encoding:
    """``tiktoken.get_encoding(name)``, reading its BPE file from ``directory``.

    tiktoken reads ``$TIKTOKEN_CACHE_DIR/<sha1(url)>`` before it would download, and the file
    there was hash-checked by :mod:`~tb_plugins.counting.bpe_files`, so tiktoken accepts it
    and never goes online. The variable is tiktoken's only setting for that folder: it is set
    for this call alone and then restored (this is the one place tb_plugins writes
    ``os.environ``).
    """
    key = "TIKTOKEN_CACHE_DIR"
    previous = os.environ.get(key)
    os.environ[key] = directory
    try:
        encoding: tiktoken.Encoding = module.get_encoding(name)
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous
    return encoding


_LOADER = EncodingLoader()


def load(name: str) -> Encoder:
    """Return the process-wide encoder for tiktoken encoding ``name`` (loaded once)."""
    return _LOADER.get(name)


def peek(name: str) -> Encoder | None:
    """The process-wide encoder for ``name`` if loaded already; None otherwise (no load)."""
    return _LOADER.peek(name)
