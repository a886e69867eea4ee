"""Offline token counting for chat requests: the input side of every estimate.

OpenAI models are counted exactly with tiktoken, following OpenAI's published rules (the
openai-cookbook notebook "How to count tokens with tiktoken"):

* every message costs 3 tokens, plus the tokens of each of its string values (``role``,
  ``content``, ``name``, ``tool_call_id``, ...); a ``name`` costs 1 more; every reply is
  primed with 3 tokens;
* tool definitions follow the cookbook's ``num_tokens_for_tools``: per function
  ``func_init`` + tokens of ``"name:description"`` (one trailing ``.`` dropped), then, if it
  has properties, ``prop_init`` and per property ``prop_key`` + tokens of
  ``"key:type:description"``, with ``enum_init`` + ``enum_item`` + tokens per enum value;
  ``func_end`` once after all functions. Constants: gpt-4o family 7/3/3/-3/3/12, gpt-4 and
  gpt-3.5 family 10/3/3/-3/3/12.

Where the cookbook is silent, this module picks the rule that errs high (a budget would
rather reserve a little too much than let a call through unpaid):

* assistant ``tool_calls``: each call's function name + arguments (call ids and ``type``
  are not counted); legacy ``function_call`` the same. Arguments given as a dict are
  counted as their JSON.
* nested tool parameters: properties of an ``object`` property (or of an ``array``'s
  ``items``) are counted recursively with the same ``prop_init``/``prop_key`` constants;
  a property without ``type`` counts its ``anyOf``/``oneOf``/``allOf`` JSON (else
  ``any``); a list ``type`` counts as ``a|b``; ``$defs`` are counted as JSON; non-string
  enum values as JSON. A tool that is not a function (a built-in tool) counts as its JSON.
* images (``image_url``, ``input_image``, ``image`` parts): OpenAI's tile rule, 85 tokens
  plus 170 per 512-px tile after scaling to fit 2048x2048 and then to a shortest side of
  768 px; ``detail: low`` is 85. ``detail: auto`` (or none) is counted as high, because the
  server may choose high. The size is read from a ``data:`` URL's PNG, JPEG, GIF or WebP
  header; a remote URL is never fetched, so an unknown size counts as the documented worst
  case, 768x2048 -> 8 tiles -> 1445 tokens. (Some models, such as gpt-4o-mini and the
  patch-billed gpt-4.1-mini/nano and o4-mini, price images differently; they get this
  same rule.)
* ``input_audio``: about 10 tokens per second of audio; the duration is read from a WAV
  header, otherwise assumed from the size at 32 kbit/s (which errs high for most codecs).
* ``file`` parts: the file name, plus the decoded text of a ``text/*`` or JSON data URL,
  plus for other data (e.g. PDFs) 765 (a page image at high detail) + 1000 (a dense page
  of text) tokens per page found in the file (at least one). A bare ``file_id`` cannot be
  seen offline and counts only as its JSON.
* anything else (numbers, dicts, unknown parts or keys, objects): the tokens of its JSON
  rendering. Odd content never raises; only a value that is not a message does.

Other model families (Claude, Gemini, Llama, Mistral, unknown names) are approximated: the
cl100k_base count of the same content (with the gpt-4 constants and the same image, audio
and file rules) times ``approximation_margin`` (default 1.2), rounded up.
:meth:`TokenCounter.is_exact` says which kind a model gets.

tiktoken never downloads here. An encoding is built from a hash-checked local file:
``$TIKTOKEN_CACHE_DIR`` if it holds one, else the copy LiteLLM ships in its package. With
neither, counts fall back to UTF-8 bytes / 3 (times the margin) and one
:class:`~tb_plugins.warnings.ApproximateCountWarning` says how to get exact counts.

Example:
    >>> from tb_plugins.core.counting import count_tokens
    >>> count_tokens("gpt-4o", [{"role": "user", "content": "Hello!"}])
    9
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import io
import itertools
import json
import math
import os
import re
import struct
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

from tb_plugins.warnings import ApproximateCountWarning

if TYPE_CHECKING:
    import tiktoken

__all__ = ["TokenCounter", "Tokenizer", "count_tokens", "default_counter", "image_tokens"]

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3

IMAGE_BASE_TOKENS = 85
IMAGE_TILE_TOKENS = 170
# OpenAI's documented worst case for a high-detail image: 768x2048 -> 2x4 tiles.
IMAGE_WORST_CASE_TOKENS = IMAGE_BASE_TOKENS + IMAGE_TILE_TOKENS * 8

AUDIO_TOKENS_PER_SECOND = 10
_AUDIO_ASSUMED_BYTES_PER_SECOND = 4000  # 32 kbit/s: low for speech codecs, so it errs high
_PDF_PAGE_TOKENS = 765 + 1000

_ENCODER_FALLBACK_NAME = "utf8-bytes/3"
_CHUNK_CHARS = 8192
OFFLOAD_CHARS = 16_384
"""Text not yet counted from which :meth:`TokenCounter.aprepare` encodes in a thread."""


@runtime_checkable
class Tokenizer(Protocol):
    """What the budget guard needs from a tokenizer: the extension point for your own.

    A tokenizer may also define ``async aprepare(model, messages, tools)``; the guard's
    ``acheck`` awaits it before counting (see :meth:`TokenCounter.aprepare`).

    Example:
        >>> class Words:
        ...     def count_messages(self, model, messages, tools=None):
        ...         return sum(len(str(m.get("content", "")).split()) for m in messages)
        ...     def count_text(self, model, text):
        ...         return len(text.split())
        ...     def is_exact(self, model):
        ...         return False
        >>> isinstance(Words(), Tokenizer)
        True
    """

    def count_messages(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> int:
        """Return the prompt tokens of a chat request (messages, tools and reply priming)."""
        ...

    def count_text(self, model: str, text: str) -> int:
        """Return the tokens of plain text (a completion prompt or an embeddings input)."""
        ...

    def is_exact(self, model: str) -> bool:
        """Return True if counts for ``model`` are exact, False if approximate."""
        ...


# --------------------------------------------------------------------------- encoders


class _Encoder(Protocol):
    @property
    def name(self) -> str: ...

    def count(self, text: str) -> int: ...


_NO_SPECIAL: frozenset[str] = frozenset()
_PROBE = "Budget ledger, 1,234 tokens: héllo 世界 <|endoftext|>  \n\tdone."


def _buffer_counter(encoding: tiktoken.Encoding) -> Callable[[str], int] | None:
    """A counter that never builds the list of token ids, or None if this tiktoken has none.

    tiktoken's core can encode into a buffer of 32-bit ids; its size is the count, and no
    Python int is made per token (about 8% faster on a 1k-token prompt). With no special
    token allowed it is exactly ``encode_ordinary``: checked on a probe text at load, else
    the counter is not used.
    """
    core = getattr(encoding, "_core_bpe", None)
    to_buffer = getattr(core, "encode_to_tiktoken_buffer", None)
    if to_buffer is None:
        return None

    def count(text: str) -> int:
        return memoryview(to_buffer(text, _NO_SPECIAL)).nbytes >> 2

    try:
        if count(_PROBE) != len(encoding.encode_ordinary(_PROBE)):
            return None
    except Exception:  # a private API: any surprise means "do not use it"
        return None
    return count


class _TiktokenEncoder:
    __slots__ = ("_count", "encoding", "name")

    def __init__(self, name: str, encoding: tiktoken.Encoding) -> None:
        self.name = name
        self.encoding = encoding
        self._count = _buffer_counter(encoding)

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
        if len(text) > _CHUNK_CHARS:
            return sum(self._piece(chunk) for chunk in _chunks(text))
        return self._piece(text)


def _chunks(text: str) -> Iterator[str]:
    """Split long text where tiktoken's pre-tokenizer splits anyway, so counts stay exact.

    BPE cost grows faster than linearly on long runs without spaces (4 MB of dots takes
    seconds), which a client could send on purpose. A single space between two non-space
    characters always starts a new pre-token in the OpenAI encodings, so cutting just
    before one changes nothing; a run with no such space is cut hard, at most one token
    off per cut.
    """
    start, end = 0, len(text)
    while end - start > _CHUNK_CHARS:
        lo, cut = start + _CHUNK_CHARS // 2, start + _CHUNK_CHARS
        i = text.rfind(" ", lo, cut)
        while i > lo and (text[i - 1].isspace() or text[i + 1].isspace()):
            i = text.rfind(" ", lo, i)
        if i > lo:
            cut = i
        yield text[start:cut]
        start = cut
    yield text[start:]


class _ByteEstimate:
    __slots__ = ()
    name = _ENCODER_FALLBACK_NAME

    def count(self, text: str) -> int:
        return -(-len(text.encode("utf-8", "surrogatepass")) // 3)


class _EncodingLoader:
    """Loads each tiktoken encoding once per process, from local files only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._encoders: dict[str, _Encoder] = {}
        self._warned = False

    def get(self, name: str) -> _Encoder:
        encoder = self._encoders.get(name)
        if encoder is None:
            with self._lock:
                encoder = self._encoders.get(name)
                if encoder is None:
                    encoder = self._load(name)
                    self._encoders[name] = encoder
        return encoder

    def _load(self, name: str) -> _Encoder:
        try:
            import tiktoken
            import tiktoken.registry
        except ImportError:
            return self._fallback(name, "tiktoken is not installed")
        loaded = tiktoken.registry.ENCODINGS.get(name)
        if loaded is not None:
            return _TiktokenEncoder(name, loaded)
        from tb_plugins.core import _assets  # pathlib and hashlib: only when needed

        path = _assets.tiktoken_bpe_file(name)
        if path is None:
            return self._fallback(name, f"no local BPE file for {name}")
        try:
            encoding = _get_encoding_offline(tiktoken, name, str(path.parent))
        except Exception as exc:  # any failure here must degrade, not break the call
            return self._fallback(name, f"loading {path} failed: {exc}")
        return _TiktokenEncoder(name, encoding)

    def _fallback(self, name: str, reason: str) -> _Encoder:
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
        return _ByteEstimate()


def _get_encoding_offline(module: Any, name: str, directory: str) -> tiktoken.Encoding:
    # tiktoken reads TIKTOKEN_CACHE_DIR/<sha1(url)> before it would download; the file
    # there was hash-checked by _assets, so tiktoken accepts it and never goes online.
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


_LOADER = _EncodingLoader()


# ------------------------------------------------------------------------- model rules


class _ToolRules(NamedTuple):
    func_init: int
    prop_init: int
    prop_key: int
    enum_init: int
    enum_item: int
    func_end: int


_GPT4O_TOOL_RULES = _ToolRules(7, 3, 3, -3, 3, 12)
_GPT4_TOOL_RULES = _ToolRules(10, 3, 3, -3, 3, 12)

_O200K_MODELS = re.compile(r"^(?:gpt-4o|chatgpt-4o|gpt-4\.1|gpt-4\.5|gpt-5|o1|o3|o4)(?:$|[-.:_])")
_CL100K_MODELS = re.compile(
    r"^(?:gpt-4(?:$|-)|gpt-3\.5-turbo|gpt-35-turbo|text-embedding-3-|text-embedding-ada-002)"
)
_P50K_MODELS = re.compile(r"^(?:text-davinci-00[23]|code-davinci-00[12]|code-cushman-00[12])")


def _base_model(model: str) -> str:
    """``openrouter/openai/gpt-4o`` -> ``gpt-4o``; ``ft:gpt-4o-mini:org::id`` -> ``gpt-4o-mini``."""
    name = model.strip().lower().rsplit("/", 1)[-1]
    if name.startswith("ft:"):
        name = name[3:].split(":", 1)[0]
    return name


def _openai_encoding(model: str) -> str | None:
    name = _base_model(model)
    if _O200K_MODELS.match(name):
        return "o200k_base"
    if _CL100K_MODELS.match(name):
        return "cl100k_base"
    if _P50K_MODELS.match(name):
        return "p50k_base"
    return None


class _Plan(NamedTuple):
    encoder: _Encoder
    tool_rules: _ToolRules
    exact: bool


# ----------------------------------------------------------------------------- caching


class _LRUCache:
    """A bounded, thread-safe LRU map from a stable key to a token count."""

    def __init__(self, maxsize: int) -> None:
        self._maxsize = maxsize
        self._data: OrderedDict[Hashable, int] = OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, keys: Sequence[Hashable | None]) -> list[int | None]:
        if self._maxsize <= 0:
            return [None] * len(keys)
        found: list[int | None] = []
        get = self._data.get
        touch = self._data.move_to_end
        append = found.append
        with self._lock:
            for key in keys:
                value = None if key is None else get(key)
                if value is not None:
                    touch(key)
                append(value)
        return found

    def put_many(self, items: Iterable[tuple[Hashable, int]]) -> None:
        if self._maxsize <= 0:
            return
        data = self._data
        with self._lock:
            for key, value in items:
                data[key] = value
                data.move_to_end(key)
            while len(data) > self._maxsize:
                data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


def _render(value: object) -> str:
    """The JSON text of an odd value, as a model would be shown it."""
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):
        try:
            return repr(value)
        except Exception:
            return f"<{type(value).__name__}>"


def _stable_key(value: object) -> str | None:
    try:
        return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    except (TypeError, ValueError, RecursionError):
        return None


class _Unhashable(Exception):
    pass


_SCALAR_TYPES = frozenset({int, float, bool, type(None)})


def _freeze(value: object) -> Hashable:
    """A hashable twin of JSON-like data: exact, and much cheaper than json.dumps."""
    if type(value) is str:
        return value
    if type(value) is dict:
        return ("{", *[(k, v if type(v) is str else _freeze(v)) for k, v in value.items()])
    if type(value) is list or type(value) is tuple:
        return ("[", *[v if type(v) is str else _freeze(v) for v in value])
    if type(value) in _SCALAR_TYPES:
        # Tagged: 1, 1.0 and True are equal as keys but render differently.
        return (type(value).__name__, value)
    if isinstance(value, Mapping):
        return ("{", *[(k, _freeze(v)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return ("[", *[_freeze(v) for v in value])
    raise _Unhashable


def _message_key(namespace: str, message: object, index: int) -> Hashable | None:
    """Validate one message and return its cache key (None: count it uncached)."""
    if type(message) is not dict and not isinstance(message, Mapping):
        raise ValueError(
            f"messages[{index}] is not a chat message: expected a mapping with a "
            f"'role', got {type(message).__name__}"
        )
    role = message.get("role")
    if not isinstance(role, str):
        problem = "has no 'role'" if role is None else f"has a non-string role {role!r}"
        raise ValueError(f"messages[{index}] is not a chat message: it {problem}")
    items = tuple(message.items())
    for _, value in items:
        if value is not None and type(value) is not str:
            try:
                return (
                    namespace,
                    tuple([(k, v if type(v) is str else _freeze(v)) for k, v in items]),
                )
            except (_Unhashable, RecursionError):
                stable = _stable_key(message)
                return None if stable is None else (namespace, stable)
    return (namespace, items)


class _History:
    """A private snapshot of a history and the running token count after each message."""

    __slots__ = ("cumulative", "messages")

    def __init__(self, messages: list[dict[Any, Any]], cumulative: list[int]) -> None:
        self.messages = messages
        self.cumulative = cumulative  # cumulative[i] = tokens of messages[:i]

    def common_prefix(self, messages: list[Any]) -> int:
        n = min(len(self.messages), len(messages))
        try:
            # One C-level comparison covers the usual case: the old history, unchanged.
            # (Values equal under == but rendered differently, like 1 and 1.0, pass as
            # the same message: a one-token error at most, for odd content only.)
            if messages[:n] == self.messages[:n]:
                return n
            i = 0
            while i < n and messages[i] == self.messages[i]:
                i += 1
            return i
        except Exception:  # == on exotic content (e.g. arrays) may raise: no fast path
            return 0


_ATOMS = frozenset({str, int, float, bool, type(None)})


def _copy(value: Any) -> Any:
    """A deep copy of JSON-like data, several times cheaper than ``copy.deepcopy``."""
    kind = type(value)
    if kind in _ATOMS:
        return value
    if kind is dict:
        return {k: v if type(v) in _ATOMS else _copy(v) for k, v in value.items()}
    if kind is list:
        return [v if type(v) in _ATOMS else _copy(v) for v in value]
    return copy.deepcopy(value)


def _snapshot(message: Mapping[Any, Any]) -> dict[Any, Any]:
    for value in message.values():
        if value is not None and type(value) is not str:
            # Nested lists and dicts can be mutated in place by the caller later.
            return {k: _copy(v) for k, v in message.items()}
    return dict(message)


class _Unseen(NamedTuple):
    memo_key: Hashable | None
    base: _History | None
    prefix: int
    messages: list[Mapping[str, Any]]
    keys: list[Hashable | None]
    hits: list[int | None]


class _HistoryMemo:
    """The most recent histories, keyed by their first message, for agent loops.

    A loop resends its history plus a few new messages; comparing the old part with one
    ``==`` per message (in C) is far cheaper than building a cache key for each.
    """

    def __init__(self, slots: int) -> None:
        self._slots = slots
        self._data: OrderedDict[Hashable, _History] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> _History | None:
        with self._lock:
            history = self._data.get(key)
            if history is not None:
                self._data.move_to_end(key)
            return history

    def remember(
        self,
        key: Hashable,
        base: _History | None,
        prefix: int,
        new_messages: Sequence[Mapping[Any, Any]],
        new_counts: Sequence[int],
    ) -> None:
        try:
            snapshots = [_snapshot(m) for m in new_messages]
        except Exception:  # content deepcopy cannot copy: just skip the fast path
            return
        cumulative = base.cumulative[: prefix + 1] if base is not None else [0]
        running = cumulative[-1]
        for count in new_counts:
            running += count
            cumulative.append(running)
        messages = base.messages[:prefix] if base is not None else []
        history = _History(messages + snapshots, cumulative)
        with self._lock:
            self._data[key] = history
            self._data.move_to_end(key)
            while len(self._data) > self._slots:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


# ------------------------------------------------------------------------ the counter


class TokenCounter:
    """The default :class:`Tokenizer`: exact for OpenAI models, a safe margin elsewhere.

    Counts of single messages and of tool lists are kept in a bounded LRU cache keyed by
    content, so an agent loop that resends a growing history encodes only the messages it
    has not seen; a fully seen history costs one dictionary lookup per message. On top of
    that the most recent histories (up to 64, keyed by their first message, copied so
    later in-place edits are noticed) are remembered, and a resent history is matched
    against them with one C-level ``==`` per message. The counter is thread-safe and
    meant to be shared (see :func:`default_counter`).

    Args:
        cache_size: How many message and tool-list counts to keep; 0 disables all
            caching.
        approximation_margin: Factor applied to cl100k_base counts for models without an
            exact tokenizer (must be positive; values below 1 undercount).
        offload_chars: In async code (:meth:`aprepare`), message text not counted before
            is encoded in a worker thread once it is this long (tiktoken releases the GIL
            while it encodes, so the event loop serves other requests meanwhile); None
            never does.

    Example:
        >>> counter = TokenCounter()
        >>> counter.count_messages("gpt-4o", [{"role": "user", "content": "Hello!"}])
        9
        >>> counter.is_exact("gpt-4o"), counter.is_exact("claude-sonnet-4-5")
        (True, False)
        >>> counter.encoding_name("azure/gpt-4-turbo")
        'cl100k_base'
    """

    def __init__(
        self,
        *,
        cache_size: int = 8192,
        approximation_margin: float = 1.2,
        offload_chars: int | None = OFFLOAD_CHARS,
    ) -> None:
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0, got {cache_size!r}")
        bad_offload = isinstance(offload_chars, bool) or not isinstance(offload_chars, int)
        if offload_chars is not None and (bad_offload or offload_chars < 0):
            raise ValueError(f"offload_chars must be an int >= 0 or None, got {offload_chars!r}")
        self.offload_chars = offload_chars
        if not isinstance(approximation_margin, (int, float)) or not (
            0 < approximation_margin < math.inf
        ):
            raise ValueError(
                f"approximation_margin must be a positive number, got {approximation_margin!r}"
            )
        self._cache = _LRUCache(cache_size)
        self._memo = _HistoryMemo(min(cache_size, 64)) if cache_size else None
        self._margin = float(approximation_margin)
        self._plans: dict[str, _Plan] = {}

    @property
    def approximation_margin(self) -> float:
        """The factor applied to approximate counts."""
        return self._margin

    def clear_cache(self) -> None:
        """Forget every cached message and tool-list count.

        Example:
            >>> counter = TokenCounter()
            >>> counter.clear_cache()
        """
        self._cache.clear()
        if self._memo is not None:
            self._memo.clear()

    def encoding_name(self, model: str) -> str | None:
        """Return the tiktoken encoding of an OpenAI model, or None for other models.

        Provider prefixes (``openai/``, ``azure/``, ``openrouter/openai/``) and fine-tune
        names (``ft:gpt-4o-mini:...``) are understood.

        Example:
            >>> TokenCounter().encoding_name("openrouter/openai/gpt-4.1-mini")
            'o200k_base'
            >>> TokenCounter().encoding_name("claude-sonnet-4-5") is None
            True
        """
        return _openai_encoding(model)

    def is_exact(self, model: str) -> bool:
        """Return True if ``model`` is counted exactly with its own tiktoken encoding.

        Example:
            >>> TokenCounter().is_exact("gemini-2.5-pro")
            False
        """
        return self._plan(model).exact

    def count_text(self, model: str, text: str) -> int:
        """Return the tokens of plain text, with no chat-format overhead.

        Example:
            >>> TokenCounter().count_text("gpt-4o", "Hello world")
            2
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        plan = self._plan(model)
        return self._finish(plan, plan.encoder.count(text))

    def count_messages(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> int:
        """Return the prompt tokens of a chat request: messages, tools and reply priming.

        Args:
            model: The model name, with or without a provider prefix.
            messages: OpenAI-style chat messages (mappings with a ``role``).
            tools: OpenAI-style tool definitions, if the request has any.

        Raises:
            ValueError: If ``messages`` is not a sequence of messages; the message names the
                index of the first value that is not a mapping with a string ``role``.

        Example:
            >>> TokenCounter().count_messages(
            ...     "gpt-4o",
            ...     [{"role": "system", "content": "Be brief."},
            ...      {"role": "user", "name": "ada", "content": "Hi"}],
            ... )
            17
        """
        plan = self._plan(model)
        _check_sequence(messages)
        total = REPLY_PRIMING_TOKENS
        if messages:
            total += self._count_history(plan.encoder, messages)
        if tools:
            total += self._count_tools(plan, tools)
        return self._finish(plan, total)

    def _unseen(self, encoder: _Encoder, messages: Sequence[Mapping[str, Any]]) -> _Unseen:
        """The part of a history a count must still look up: after the prefix a remembered
        history already counted, with each message's cache key and cached count."""
        namespace = encoder.name
        first = _message_key(namespace, messages[0], 0)
        memo_key = first if self._memo is not None and type(messages) is list else None
        base: _History | None = None
        prefix = 0
        if memo_key is not None and self._memo is not None:
            base = self._memo.get(memo_key)
            if base is not None:
                prefix = base.common_prefix(messages)  # type: ignore[arg-type]
        rest = list(itertools.islice(messages, prefix, None))
        keys = [
            first if i == 0 else _message_key(namespace, m, i)
            for i, m in enumerate(rest, start=prefix)
        ]
        return _Unseen(memo_key, base, prefix, rest, keys, self._cache.get_many(keys))

    def _count_history(self, encoder: _Encoder, messages: Sequence[Mapping[str, Any]]) -> int:
        memo_key, base, prefix, rest, keys, hits = self._unseen(encoder, messages)
        counts: list[int] = []
        fresh: list[tuple[Hashable, int]] = []
        for message, key, hit in zip(rest, keys, hits, strict=True):
            if hit is None:
                hit = _count_message(encoder, message)
                if key is not None:
                    fresh.append((key, hit))
            counts.append(hit)
        if fresh:
            self._cache.put_many(fresh)
        if memo_key is not None and self._memo is not None and rest:
            self._memo.remember(memo_key, base, prefix, rest, counts)
        return (base.cumulative[prefix] if base is not None else 0) + sum(counts)

    async def aprepare(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Get ready for ``count_messages(model, messages, tools)`` without blocking the loop.

        When the text this counter has not counted yet is at least ``offload_chars`` long
        (16,384 characters by default: about 4k tokens, a third of a millisecond or more of
        encoding), it is counted now in the event loop's default executor, and the count
        that follows is a cache lookup. Shorter text is left for that count: a hop to a
        thread and back adds about 0.1 ms to the call. Nothing is raised here; a malformed
        request fails in the count itself.

        Example:
            >>> import asyncio
            >>> counter = TokenCounter(offload_chars=0)
            >>> messages = [{"role": "user", "content": "Hello!"}]
            >>> asyncio.run(counter.aprepare("gpt-4o", messages))
            >>> counter.count_messages("gpt-4o", messages)
            9
        """
        limit = self.offload_chars
        if limit is None or self._memo is None:
            return  # without a cache the count would run twice
        try:
            if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
                return  # not a history: the count says what is wrong with it
            if sum(_text_size(message) for message in messages) < limit:
                return  # short in all: no need to look up what is cached
            plan = self._plan(model)
            if not isinstance(plan.encoder, _TiktokenEncoder):
                return
            pending = self._uncounted_chars(plan.encoder, messages)
        except Exception:
            return
        if pending < limit:
            return
        import asyncio  # an event loop is running: already imported

        with contextlib.suppress(Exception):
            await asyncio.get_running_loop().run_in_executor(
                None, self.count_messages, model, messages, tools
            )

    def _uncounted_chars(self, encoder: _Encoder, messages: Sequence[Mapping[str, Any]]) -> int:
        """The text length of the messages a count would encode (not cached, not memoized)."""
        if not messages or isinstance(messages, (str, bytes)):
            return 0
        unseen = self._unseen(encoder, messages)
        return sum(
            _text_size(message)
            for message, hit in zip(unseen.messages, unseen.hits, strict=True)
            if hit is None
        )

    def _count_tools(self, plan: _Plan, tools: Sequence[Mapping[str, Any]]) -> int:
        if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
            return plan.encoder.count(_render(tools))
        stable = _stable_key(tools)
        key = None if stable is None else ("tools", plan.encoder.name, plan.tool_rules, stable)
        (hit,) = self._cache.get_many([key])
        if hit is None:
            hit = _count_tools(plan.encoder, plan.tool_rules, tools)
            if key is not None:
                self._cache.put_many([(key, hit)])
        return hit

    def _finish(self, plan: _Plan, raw: int) -> int:
        if plan.exact:
            return raw
        # round() first: 100 * 1.1 is 110.00000000000001 in floating point.
        return math.ceil(round(raw * self._margin, 6))

    def _plan(self, model: str) -> _Plan:
        plan = self._plans.get(model)
        if plan is None:
            if not isinstance(model, str):
                raise TypeError(f"model must be a str, got {type(model).__name__}")
            name = _openai_encoding(model)
            if name is None:
                encoder = _LOADER.get("cl100k_base")
                plan = _Plan(encoder, _GPT4_TOOL_RULES, exact=False)
            else:
                encoder = _LOADER.get(name)
                rules = _GPT4O_TOOL_RULES if name == "o200k_base" else _GPT4_TOOL_RULES
                plan = _Plan(encoder, rules, exact=isinstance(encoder, _TiktokenEncoder))
            if len(self._plans) >= 1024:  # model names can come from clients: stay bounded
                self._plans.clear()
            self._plans[model] = plan
        return plan


_default_lock = threading.Lock()
_default: TokenCounter | None = None


def default_counter() -> TokenCounter:
    """Return the process-wide shared :class:`TokenCounter` (created on first use).

    Example:
        >>> default_counter() is default_counter()
        True
    """
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = TokenCounter()
    return _default


def count_tokens(
    model: str,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> int:
    """Return the prompt tokens of a chat request, counted offline.

    Uses the shared :func:`default_counter`; see the module docstring for the rules.

    Example:
        >>> count_tokens("gpt-4o-mini", [{"role": "user", "content": "Hello!"}])
        9
    """
    return default_counter().count_messages(model, messages, tools)


# ------------------------------------------------------------------- message counting


def _check_sequence(messages: object) -> None:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(
            f"messages must be a sequence of chat messages, got {type(messages).__name__}"
        )


def _text_size(message: Mapping[str, Any]) -> int:
    """Characters of a message's text: its strings and the text parts of its content."""
    size = 0
    for value in message.values():
        if type(value) is str:
            size += len(value)
        elif isinstance(value, list):
            for part in value:
                if isinstance(part, Mapping):
                    text = part.get("text")
                    size += len(text) if isinstance(text, str) else 0
                elif isinstance(part, str):
                    size += len(part)
    return size


def _count_message(encoder: _Encoder, message: Mapping[str, Any]) -> int:
    tokens = TOKENS_PER_MESSAGE
    for key, value in message.items():
        if value is None:
            continue
        if key == "content":
            tokens += _count_content(encoder, value)
        elif key == "tool_calls":
            tokens += _count_tool_calls(encoder, value)
        elif key == "function_call":
            tokens += _count_call(encoder, value)
        else:
            tokens += encoder.count(value if isinstance(value, str) else _render(value))
            if key == "name":
                tokens += TOKENS_PER_NAME
    return tokens


def _count_text_or_json(encoder: _Encoder, value: object) -> int:
    if value is None:
        return 0
    return encoder.count(value if isinstance(value, str) else _render(value))


def _count_tool_calls(encoder: _Encoder, calls: object) -> int:
    if isinstance(calls, (str, bytes, Mapping)) or not isinstance(calls, Sequence):
        return encoder.count(_render(calls))
    return sum(_count_call(encoder, call) for call in calls)


def _count_call(encoder: _Encoder, call: object) -> int:
    """One tool call (``{"function": {name, arguments}}``, LangChain's ``{name, args}``)."""
    if not isinstance(call, Mapping):
        return encoder.count(_render(call))
    function = call.get("function")
    spec = function if isinstance(function, Mapping) else call
    if "name" not in spec and "arguments" not in spec and "args" not in spec:
        return encoder.count(_render(call))
    arguments = spec.get("arguments", spec.get("args"))
    return _count_text_or_json(encoder, spec.get("name")) + _count_text_or_json(encoder, arguments)


def _count_content(encoder: _Encoder, content: object) -> int:
    if isinstance(content, str):
        return encoder.count(content)
    if isinstance(content, (list, tuple)):
        return sum(_count_part(encoder, part) for part in content)
    return encoder.count(_render(content))


_TEXT_FIELDS = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
    "reasoning": "reasoning",
}


def _count_part(encoder: _Encoder, part: object) -> int:
    if isinstance(part, str):
        return encoder.count(part)
    if not isinstance(part, Mapping):
        return encoder.count(_render(part))
    kind = part.get("type")
    field = _TEXT_FIELDS.get(kind) if isinstance(kind, str) else None
    if field is not None and isinstance(part.get(field), str):
        return encoder.count(part[field])
    if kind in ("image_url", "input_image", "image"):
        return _image_part_tokens(part)
    if kind == "input_audio":
        audio = _audio_tokens(part.get("input_audio"))
        if audio is not None:
            return audio
    if kind == "file":
        spec = part.get("file")
        if isinstance(spec, Mapping):
            return _file_tokens(encoder, spec)
    return encoder.count(_render(part))


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


def _image_part_tokens(part: Mapping[str, Any]) -> int:
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


# ------------------------------------------------------------------------ audio, files


def _audio_tokens(spec: object) -> int | None:
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


_TEXT_MIMES = ("text/", "application/json", "application/xml", "application/x-ndjson")
_PDF_PAGE = re.compile(rb"/Type\s*/Page(?![a-zA-Z])")
_PDF_COUNT = re.compile(rb"/Type\s*/Pages\b[^>]*?/Count\s+(\d+)|/Count\s+(\d+)[^>]*?/Type\s*/Pages")


def _file_tokens(encoder: _Encoder, spec: Mapping[str, Any]) -> int:
    tokens = 0
    filename = spec.get("filename")
    if filename is not None:
        tokens += _count_text_or_json(encoder, filename)
    data = spec.get("file_data")
    if not isinstance(data, str):
        others = {k: v for k, v in spec.items() if k not in ("filename", "file_data")}
        return tokens + (encoder.count(_render(others)) if others else 0)
    parsed = _data_url_payload(data)
    if parsed is None:
        return tokens + encoder.count(data)
    mime, payload = parsed
    if mime.startswith(_TEXT_MIMES):
        return tokens + encoder.count(_b64decode(payload).decode("utf-8", "replace"))
    if mime.startswith("image/"):
        size = _image_size(data)
        return tokens + image_tokens(*(size or (None, None)))
    return tokens + _pdf_pages(_b64decode(payload)) * _PDF_PAGE_TOKENS


def _pdf_pages(data: bytes) -> int:
    pages = len(_PDF_PAGE.findall(data))
    for match in _PDF_COUNT.finditer(data):
        pages = max(pages, int(match.group(1) or match.group(2)))
    return max(1, pages)


# ------------------------------------------------------------------------------ tools


def _count_tools(encoder: _Encoder, rules: _ToolRules, tools: Sequence[object]) -> int:
    tokens = 0
    functions = 0
    for tool in tools:
        function = _function_of(tool)
        if function is None:
            tokens += encoder.count(_render(tool))
            continue
        functions += 1
        tokens += rules.func_init
        name = function.get("name")
        description = function.get("description")
        tokens += encoder.count(f"{_as_text(name)}:{_strip_dot(_as_text(description))}")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = function.get("input_schema")
        if isinstance(parameters, Mapping):
            properties = parameters.get("properties")
            if isinstance(properties, Mapping) and properties:
                tokens += rules.prop_init + _count_properties(encoder, rules, properties)
            for defs_key in ("$defs", "definitions"):
                if parameters.get(defs_key):
                    tokens += encoder.count(_render(parameters[defs_key]))
    if functions:
        tokens += rules.func_end
    return tokens


def _function_of(tool: object) -> Mapping[str, Any] | None:
    if not isinstance(tool, Mapping):
        return None
    function = tool.get("function")
    if isinstance(function, Mapping):
        return function
    # Flat forms: the Responses API / legacy `functions`, and Anthropic's input_schema.
    if "name" in tool and ("parameters" in tool or "input_schema" in tool or "description" in tool):
        return tool
    return None


def _count_properties(encoder: _Encoder, rules: _ToolRules, properties: Mapping[Any, Any]) -> int:
    tokens = 0
    for key, raw_spec in properties.items():
        spec: Mapping[str, Any] = raw_spec if isinstance(raw_spec, Mapping) else {}
        tokens += rules.prop_key
        enum = spec.get("enum")
        if isinstance(enum, (list, tuple)):
            tokens += rules.enum_init
            for item in enum:
                tokens += rules.enum_item + encoder.count(_as_text(item))
        description = _strip_dot(_as_text(spec.get("description")))
        tokens += encoder.count(f"{key}:{_type_text(spec)}:{description}")
        nested = _nested_properties(spec)
        if nested:
            tokens += rules.prop_init + _count_properties(encoder, rules, nested)
    return tokens


def _nested_properties(spec: Mapping[str, Any]) -> Mapping[Any, Any] | None:
    properties = spec.get("properties")
    if isinstance(properties, Mapping) and properties:
        return properties
    items = spec.get("items")
    if isinstance(items, Mapping):
        properties = items.get("properties")
        if isinstance(properties, Mapping) and properties:
            return properties
    return None


def _type_text(spec: Mapping[str, Any]) -> str:
    kind = spec.get("type")
    if isinstance(kind, str):
        return kind
    if isinstance(kind, (list, tuple)):
        return "|".join(str(k) for k in kind)
    for combinator in ("anyOf", "oneOf", "allOf"):
        if combinator in spec:
            return _render(spec[combinator])
    if "$ref" in spec:
        return str(spec["$ref"])
    return "any"


def _as_text(value: object) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else _render(value)


def _strip_dot(text: str) -> str:
    return text[:-1] if text.endswith(".") else text
