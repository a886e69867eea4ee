"""A fake OpenAI-compatible server on 127.0.0.1 that reports exact usage.

It serves ``/v1/chat/completions`` (streaming too, with the final usage chunk when the
request sets ``stream_options.include_usage``), ``/v1/responses`` (streaming too),
``/v1/embeddings`` and ``/v1/models``. Usage is exact: prompt tokens are counted with
tiktoken by OpenAI's chat-format rules, completion tokens are the tokens of the reply it
sends, and the reply is cut to the request's ``max_tokens`` (``finish_reason: length``), as
a real model's would be. Every request it served is recorded (path, model, max_tokens,
API key, usage, outcome) for assertions.

It uses only the standard library (plus tb_plugins' offline token counter), runs in a
background thread or in its own process, and can be told to fail with an HTTP error, to
hang, or to stop mid-stream.

Example:
    >>> from tb_plugins.testing.fake_openai import FakeOpenAI
    >>> with FakeOpenAI() as fake:                               # doctest: +SKIP
    ...     import openai
    ...     client = openai.OpenAI(base_url=fake.base_url, api_key="sk-fake")
    ...     r = client.chat.completions.create(
    ...         model="gpt-4o", max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
    ...     r.usage.completion_tokens, fake.requests[-1].max_tokens
    (5, 5)

Run it alone with ``python -m tb_plugins.testing.fake_openai --port 8099``; it prints
``FAKE_OPENAI_URL=http://127.0.0.1:8099`` once it listens. Control endpoints for a server
in another process: ``GET /_fake/requests``, ``POST /_fake/script`` (the keyword
arguments of :meth:`FakeOpenAI.script` as JSON), ``POST /_fake/reset``,
``POST /_fake/release``; :class:`FakeOpenAIProcess` wraps them.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tb_plugins.counting import TokenCounter

__all__ = ["DEFAULT_REPLY", "FakeOpenAI", "FakeOpenAIProcess", "Served"]

DEFAULT_REPLY = (
    "Token budgets keep every model call inside what a team agreed to spend. This reply "
    "comes from a fake OpenAI server on the loopback interface, so it costs nothing, needs "
    "no key and reports exact usage for every request it answers, streamed or not. It is "
    "long enough that a small max_tokens visibly cuts it short."
)
DEFAULT_MODELS = ("gpt-4o", "gpt-4o-mini", "text-embedding-3-small")


@dataclass(frozen=True)
class Served:
    """One request the fake server answered (or failed, or lost).

    Attributes:
        path: the URL path, e.g. ``/v1/chat/completions``.
        model: the ``model`` field of the request.
        max_tokens: the output cap asked for (``max_tokens``, ``max_completion_tokens``
            or ``max_output_tokens``), None if none.
        stream: whether the request asked for a stream.
        include_usage: whether a streamed chat request asked for the final usage chunk.
        api_key: the bearer token it came with.
        prompt_tokens: input tokens reported (0 if the request failed before usage).
        completion_tokens: output tokens reported (for a cut stream: those sent).
        status: the HTTP status sent.
        outcome: ``ok``, ``failed`` (scripted error), ``stopped`` (connection cut
            mid-stream) or ``disconnected`` (the client went away).
        chunks: content chunks sent (streams only).
        at: when it was recorded (epoch seconds).
        messages: the chat ``messages`` the request carried, as received (None: none).
    """

    path: str
    model: str | None
    max_tokens: int | None
    stream: bool
    include_usage: bool
    api_key: str | None
    prompt_tokens: int
    completion_tokens: int
    status: int
    outcome: str
    chunks: int = 0
    at: float = 0.0
    messages: list[dict[str, Any]] | None = None


@dataclass
class _Rule:
    reply: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    fail: int | None = None
    hang: float | None = None
    stop: bool = False
    after_chunks: int = 0
    model: str | None = None
    path: str | None = None
    times: int | None = 1
    usage: dict[str, Any] | None = None

    def matches(self, path: str, model: str | None) -> bool:
        return (self.model is None or self.model == model) and (
            self.path is None or path.endswith(self.path)
        )


@dataclass
class _Reply:
    text: str | None
    tokens: int
    finish_reason: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


class _Lost(Exception):
    """The client went away, or the script cut the connection."""

    def __init__(self, outcome: str, chunks: int, tokens: int) -> None:
        super().__init__(outcome)
        self.outcome, self.chunks, self.tokens = outcome, chunks, tokens


class FakeOpenAI:
    """A fake OpenAI-compatible HTTP server, run in a background thread.

    Args:
        host: the address to bind (keep the loopback default).
        port: the port; 0 picks a free one (read it back from :attr:`url`).
        reply: what the assistant says unless a script says otherwise.
        models: the ids ``/v1/models`` lists (any model name is served regardless).
        latency: seconds to wait before answering each request (and between chunks / 10).
        embedding_dim: the length of the fake embedding vectors.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        reply: str = DEFAULT_REPLY,
        models: Sequence[str] = DEFAULT_MODELS,
        latency: float = 0.0,
        embedding_dim: int = 16,
    ) -> None:
        self.reply = reply
        self.models = tuple(models)
        self.latency = latency
        self.embedding_dim = embedding_dim
        self._counter = TokenCounter(approximation_margin=1.0)
        self._lock = threading.Condition()
        self._served: list[Served] = []
        self._finishing = 0  # answers whose last bytes went out but are not recorded yet
        self._rules: list[_Rule] = []
        self._release = threading.Event()
        self._cut_cache: dict[tuple[str, str, int | None], tuple[str, int]] = {}
        self._httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (``…/v1``) to give a client or a LiteLLM ``api_base``."""
        return self.url + "/v1"

    def start(self) -> FakeOpenAI:
        """Serve in a daemon thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, name="fake-openai", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (hung requests are released)."""
        self._release.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted."""
        self._httpd.serve_forever()

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- assertions and scripting ----------------------------------------------------------

    @property
    def requests(self) -> list[Served]:
        """Every request served so far, oldest first (a copy); a request is recorded when
        it ends (answered, failed, cut or abandoned). An answer whose last bytes already
        reached the client is always included: a client that got its response never reads
        a log that lacks it."""
        with self._lock:
            self._lock.wait_for(lambda: self._finishing == 0, 5.0)
            return list(self._served)

    def served(self, *, model: str | None = None, path: str | None = None) -> list[Served]:
        """The requests served for ``model`` and/or on a path ending with ``path``."""
        return [
            r
            for r in self.requests
            if (model is None or r.model == model) and (path is None or r.path.endswith(path))
        ]

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Served]:
        """Block until at least ``count`` requests were recorded; return them.

        Raises:
            TimeoutError: fewer arrived within ``timeout`` seconds.
        """
        with self._lock:
            if not self._lock.wait_for(lambda: len(self._served) >= count, timeout):
                raise TimeoutError(f"{len(self._served)} of {count} requests after {timeout}s")
            return list(self._served)

    def reset(self) -> None:
        """Forget recorded requests and scripts, and release hung requests."""
        with self._lock:
            self._served.clear()
            self._rules.clear()
        self.release()

    def release(self) -> None:
        """Let every request hung by ``script(hang=...)`` go on."""
        old, self._release = self._release, threading.Event()
        old.set()

    def script(
        self,
        *,
        reply: str | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
        fail: int | None = None,
        hang: float | None = None,
        stop: bool = False,
        after_chunks: int = 0,
        model: str | None = None,
        path: str | None = None,
        times: int | None = 1,
        usage: dict[str, Any] | None = None,
    ) -> None:
        """Script how the next matching request(s) are answered (first script that matches).

        Args:
            reply: the assistant's text instead of the default reply.
            tool_calls: answer with tool calls, e.g. ``[{"name": "f", "arguments": {}}]``.
            fail: answer with this HTTP status and an OpenAI-style error body.
            hang: wait this long (``math.inf``: until :meth:`release`) before answering, or,
                for a stream with ``after_chunks`` > 0, after that many content chunks. A
                client that goes away meanwhile is recorded as ``disconnected``.
            stop: cut the connection (no final chunk, no usage) instead of finishing; for
                a stream, after ``after_chunks`` content chunks.
            after_chunks: where ``hang``/``stop`` strike in a stream.
            model: only requests for this model.
            path: only requests whose path ends with this, e.g. ``/embeddings``.
            times: how many requests this applies to (None: every one until reset).
            usage: fields that replace those of the ``usage`` object the answer reports
                (chat and Responses, streamed or not), e.g. ``{"prompt_tokens": -5}`` or
                ``{"completion_tokens": "7"}``, to play an upstream that reports odd usage;
                the request is still recorded with the usage it really had.
        """
        rule = _Rule(reply, tool_calls, fail, hang, stop, after_chunks, model, path, times, usage)
        with self._lock:
            self._rules.append(rule)

    # -- internals -------------------------------------------------------------------------

    def _take_rule(self, path: str, model: str | None) -> _Rule:
        with self._lock:
            for rule in self._rules:
                if rule.matches(path, model):
                    if rule.times is not None:
                        rule.times -= 1
                        if rule.times <= 0:
                            self._rules.remove(rule)
                    return rule
        return _Rule()

    def _record(self, served: Served, *, finishing: bool = False) -> None:
        with self._lock:
            self._served.append(served)
            if finishing:
                self._finishing -= 1
            self._lock.notify_all()

    def _finish(self) -> None:
        """An answer's last bytes are about to go out: count it until it is recorded."""
        with self._lock:
            self._finishing += 1

    def _count_text(self, model: str, text: str) -> int:
        return self._counter.count_text(model, text) if text else 0

    def _cut(self, model: str, text: str, max_tokens: int | None) -> tuple[str, int]:
        """``text`` cut at a word boundary to at most ``max_tokens`` tokens, and its tokens."""
        enc = self._counter.encoding_name(model) or "cl100k_base"
        key = (enc, text, max_tokens)
        hit = self._cut_cache.get(key)
        if hit is not None:
            return hit
        full = self._count_text(model, text)
        if max_tokens is None or full <= max_tokens:
            result = (text, full)
        else:
            words = text.split(" ")
            lo, hi = 0, len(words)
            while lo < hi:  # the longest prefix of words that fits
                mid = (lo + hi + 1) // 2
                if self._count_text(model, " ".join(words[:mid])) <= max_tokens:
                    lo = mid
                else:
                    hi = mid - 1
            cut = " ".join(words[:lo])
            result = (cut, self._count_text(model, cut))
        if len(self._cut_cache) > 4096:
            self._cut_cache.clear()
        self._cut_cache[key] = result
        return result

    def _make_reply(self, model: str, rule: _Rule, max_tokens: int | None) -> _Reply:
        if rule.tool_calls:
            calls = []
            tokens = 0
            for i, call in enumerate(rule.tool_calls):
                args = call.get("arguments", {})
                args_text = args if isinstance(args, str) else json.dumps(args)
                name = str(call["name"])
                tokens += self._count_text(model, name) + self._count_text(model, args_text) + 3
                calls.append(
                    {
                        "id": call.get("id", f"call_{i}"),
                        "type": "function",
                        "function": {"name": name, "arguments": args_text},
                    }
                )
            return _Reply(None, tokens, "tool_calls", calls)
        reply = rule.reply if rule.reply is not None else self.reply
        text, tokens = self._cut(model, reply, max_tokens)
        _, full = self._cut(model, reply, None)
        return _Reply(text, tokens, "length" if tokens < full else "stop")

    def _prompt_tokens(
        self, model: str, messages: Sequence[dict[str, Any]], tools: Any = None
    ) -> int:
        return self._counter.count_messages(model, messages, tools or None)


def _pieces(text: str) -> list[str]:
    """Stream pieces: one word each, the space kept in front as models do."""
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)] if text else []


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _responses_usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def _responses_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The Responses API ``instructions`` + ``input`` as chat messages, for counting."""
    messages: list[dict[str, Any]] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": str(body["instructions"])})
    inp = body.get("input")
    if isinstance(inp, str):
        messages.append({"role": "user", "content": inp})
    elif isinstance(inp, list):
        for item in inp:
            if isinstance(item, dict) and isinstance(item.get("role"), str):
                content = item.get("content")
                if isinstance(content, list):
                    content = "".join(
                        str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content
                    )
                messages.append({"role": item["role"], "content": content or ""})
            else:
                messages.append({"role": "user", "content": json.dumps(item)})
    return messages


def _vector(text: str, dim: int) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    raw = (digest * (dim // len(digest) + 1))[:dim]
    return [round(b / 127.5 - 1.0, 6) for b in raw]


def _make_handler(fake: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "FakeOpenAI/1.0"

        def setup(self) -> None:
            super().setup()
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        # -- plumbing ----------------------------------------------------------------------

        def _body(self) -> dict[str, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                data = json.loads(raw) if raw else {}
            except ValueError:
                data = {}
            return data if isinstance(data, dict) else {}

        def _api_key(self) -> str | None:
            auth = self.headers.get("Authorization") or ""
            if auth.lower().startswith("bearer "):
                return auth[7:].strip()
            return self.headers.get("api-key") or self.headers.get("x-api-key")

        def _send_json(self, status: int, obj: Any) -> None:
            self._last_write()
            payload = json.dumps(obj).encode()
            head = (
                f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                f"x-request-id: req_{uuid.uuid4().hex[:12]}\r\n\r\n"
            ).encode()
            self.wfile.write(head + payload)

        def _start_stream(self) -> None:
            self.wfile.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
            )

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

        def _end_stream(self) -> None:
            self._last_write()
            self.wfile.write(b"0\r\n\r\n")

        def _last_write(self) -> None:
            if getattr(self, "_recording", False) and not getattr(self, "_finishing", False):
                self._finishing = True
                fake._finish()

        def _client_gone(self) -> bool:
            try:
                ready, _, _ = select.select([self.connection], [], [], 0)
                if not ready:
                    return False
                return bool(self.connection.recv(1, socket.MSG_PEEK) == b"")
            except OSError:
                return True

        def _hang(self, seconds: float, chunks: int, tokens: int) -> None:
            deadline = time.monotonic() + seconds
            release = fake._release
            while not release.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                if self._client_gone():
                    raise _Lost("disconnected", chunks, tokens)
                release.wait(min(0.02, left))

        def _cut_connection(self) -> None:
            self.close_connection = True
            try:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        # -- routes ------------------------------------------------------------------------

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/")
            if path.endswith("/models"):
                data = [
                    {"id": m, "object": "model", "created": 0, "owned_by": "fake-openai"}
                    for m in fake.models
                ]
                self._send_json(200, {"object": "list", "data": data})
            elif path == "/_fake/requests":
                self._send_json(200, [asdict(r) for r in fake.requests])
            elif path in ("", "/health", "/_fake/health"):
                self._send_json(200, {"status": "ok"})
            else:
                self._send_json(404, {"error": {"message": f"no route {path}", "type": "none"}})

        def do_POST(self) -> None:
            try:
                self._do_post()
            finally:
                if getattr(self, "_finishing", False):  # died between the last write and record
                    self._finishing = False
                    with fake._lock:
                        fake._finishing -= 1
                        fake._lock.notify_all()
                self._recording = False

        def _do_post(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/")
            body = self._body()
            if path.startswith("/_fake/"):
                self._control(path, body)
                return
            model = body.get("model")
            model = model if isinstance(model, str) else None
            stream = bool(body.get("stream"))
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
            if path.endswith("/responses"):
                max_tokens = body.get("max_output_tokens")
            max_tokens = max_tokens if isinstance(max_tokens, int) else None
            rule = fake._take_rule(path, model)
            api_key = self._api_key()
            messages = body.get("messages") if isinstance(body.get("messages"), list) else None
            self._recording, self._finishing = True, False

            def record(
                prompt: int, completion: int, status: int, outcome: str, chunks: int = 0
            ) -> None:
                fake._record(
                    Served(
                        path,
                        model,
                        max_tokens,
                        stream,
                        include_usage,
                        api_key,
                        prompt,
                        completion,
                        status,
                        outcome,
                        chunks,
                        time.time(),
                        messages,
                    ),
                    finishing=self._finishing,
                )
                self._recording = self._finishing = False

            if fake.latency:
                time.sleep(fake.latency)
            prompt = 0
            try:
                if rule.hang is not None and not (stream and rule.after_chunks):
                    self._hang(rule.hang, 0, 0)
                if rule.fail is not None:
                    self._send_json(
                        rule.fail,
                        {
                            "error": {
                                "message": f"fake upstream failure ({rule.fail})",
                                "type": "server_error",
                                "param": None,
                                "code": None,
                            }
                        },
                    )
                    record(0, 0, rule.fail, "failed")
                    return
                if rule.stop and not stream:
                    raise _Lost("stopped", 0, 0)
                name = model or "gpt-4o"
                if path.endswith("/chat/completions"):
                    prompt = fake._prompt_tokens(
                        name, body.get("messages") or [], body.get("tools")
                    )
                    done = self._chat(name, body, rule, prompt, max_tokens, stream, include_usage)
                elif path.endswith("/responses"):
                    prompt = fake._prompt_tokens(name, _responses_messages(body))
                    done = self._responses(name, body, rule, prompt, max_tokens, stream)
                elif path.endswith("/embeddings"):
                    prompt, done = self._embeddings(name, body), (0, 0)
                else:
                    self._send_json(
                        404,
                        {"error": {"message": f"no route {path}", "type": "invalid_request_error"}},
                    )
                    return
            except _Lost as lost:
                if lost.outcome == "stopped":
                    self._cut_connection()
                self.close_connection = True
                record(prompt, lost.tokens, 200, lost.outcome, lost.chunks)
                return
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
                record(prompt, 0, 200, "disconnected")
                return
            completion, chunks = done
            record(prompt, completion, 200, "ok", chunks)

        def _control(self, path: str, body: dict[str, Any]) -> None:
            if path == "/_fake/script":
                fake.script(**body)
            elif path == "/_fake/reset":
                fake.reset()
            elif path == "/_fake/release":
                fake.release()
            else:
                self._send_json(404, {"error": {"message": f"no control {path}"}})
                return
            self._send_json(200, {"ok": True})

        def _stream_pieces(self, rule: _Rule, pieces: Sequence[str], model: str, frame: Any) -> int:
            """Send content pieces through ``frame(piece)``; honour hang/stop. Returns tokens."""
            sent_text = ""
            for i, piece in enumerate(pieces):
                if i == rule.after_chunks and (rule.hang is not None or rule.stop):
                    tokens = fake._count_text(model, sent_text)
                    if rule.hang is not None:
                        self._hang(rule.hang, i, tokens)
                    if rule.stop:
                        raise _Lost("stopped", i, tokens)
                self._chunk(frame(piece))
                sent_text += piece
                if fake.latency:
                    time.sleep(fake.latency / 10)
            return fake._count_text(model, sent_text)

        def _chat(
            self,
            model: str,
            body: dict[str, Any],
            rule: _Rule,
            prompt: int,
            max_tokens: int | None,
            stream: bool,
            include_usage: bool,
        ) -> tuple[int, int]:
            reply = fake._make_reply(model, rule, max_tokens)
            cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
            created = int(time.time())
            if not stream:
                message: dict[str, Any] = {
                    "role": "assistant",
                    "content": reply.text,
                    "refusal": None,
                }
                if reply.tool_calls:
                    message["tool_calls"] = reply.tool_calls
                self._send_json(
                    200,
                    {
                        "id": cid,
                        "object": "chat.completion",
                        "created": created,
                        "model": model,
                        "system_fingerprint": "fp_fake",
                        "choices": [
                            {
                                "index": 0,
                                "message": message,
                                "logprobs": None,
                                "finish_reason": reply.finish_reason,
                            }
                        ],
                        "usage": {**_usage(prompt, reply.tokens), **(rule.usage or {})},
                    },
                )
                return reply.tokens, 0
            head = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
            }
            extra = {"usage": None} if include_usage else {}

            def frame(delta: dict[str, Any], finish: str | None = None) -> bytes:
                obj = {
                    **head,
                    "choices": [
                        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                    ],
                    **extra,
                }
                return b"data: " + json.dumps(obj).encode() + b"\n\n"

            self._start_stream()
            self._chunk(frame({"role": "assistant", "content": "", "refusal": None}))
            if reply.tool_calls:
                pieces = [json.dumps(c) for c in reply.tool_calls]
                calls = {json.dumps(c): (i, c) for i, c in enumerate(reply.tool_calls)}

                def call_frame(piece: str) -> bytes:
                    i, c = calls[piece]
                    return frame({"tool_calls": [{"index": i, **c}]})

                self._stream_pieces(rule, pieces, model, call_frame)
                tokens, count = reply.tokens, len(pieces)
            else:
                pieces = _pieces(reply.text or "")
                self._stream_pieces(rule, pieces, model, lambda p: frame({"content": p}))
                tokens, count = reply.tokens, len(pieces)
            self._chunk(frame({}, reply.finish_reason))
            if include_usage:
                final = {
                    **head,
                    "choices": [],
                    "usage": {**_usage(prompt, tokens), **(rule.usage or {})},
                }
                self._chunk(b"data: " + json.dumps(final).encode() + b"\n\n")
            self._chunk(b"data: [DONE]\n\n")
            self._end_stream()
            return tokens, count

        def _responses(
            self,
            model: str,
            body: dict[str, Any],
            rule: _Rule,
            prompt: int,
            max_tokens: int | None,
            stream: bool,
        ) -> tuple[int, int]:
            reply = fake._make_reply(model, _Rule(reply=rule.reply), max_tokens)
            rid, mid = f"resp_{uuid.uuid4().hex[:24]}", f"msg_{uuid.uuid4().hex[:24]}"
            text = reply.text or ""

            def response(status: str, output: list[Any], usage: Any) -> dict[str, Any]:
                return {
                    "id": rid,
                    "object": "response",
                    "created_at": int(time.time()),
                    "status": status,
                    "error": None,
                    "incomplete_details": None,
                    "instructions": body.get("instructions"),
                    "max_output_tokens": max_tokens,
                    "model": model,
                    "output": output,
                    "parallel_tool_calls": True,
                    "previous_response_id": None,
                    "reasoning": None,
                    "store": False,
                    "temperature": 1.0,
                    "text": {"format": {"type": "text"}},
                    "tool_choice": "auto",
                    "tools": [],
                    "top_p": 1.0,
                    "truncation": "disabled",
                    "usage": usage,
                    "user": None,
                    "metadata": {},
                }

            def item(t: str, status: str) -> dict[str, Any]:
                return {
                    "type": "message",
                    "id": mid,
                    "status": status,
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": t, "annotations": []}],
                }

            if not stream:
                self._send_json(
                    200,
                    response(
                        "completed",
                        [item(text, "completed")],
                        {**_responses_usage(prompt, reply.tokens), **(rule.usage or {})},
                    ),
                )
                return reply.tokens, 0
            seq = iter(range(1_000_000))

            def event(kind: str, **data: Any) -> bytes:
                obj = {"type": kind, "sequence_number": next(seq), **data}
                return f"event: {kind}\ndata: {json.dumps(obj)}\n\n".encode()

            self._start_stream()
            self._chunk(event("response.created", response=response("in_progress", [], None)))
            self._chunk(
                event(
                    "response.output_item.added",
                    output_index=0,
                    item={**item("", "in_progress"), "content": []},
                )
            )
            self._chunk(
                event(
                    "response.content_part.added",
                    item_id=mid,
                    output_index=0,
                    content_index=0,
                    part={"type": "output_text", "text": "", "annotations": []},
                )
            )
            pieces = _pieces(text)
            tokens = self._stream_pieces(
                rule,
                pieces,
                model,
                lambda p: event(
                    "response.output_text.delta",
                    item_id=mid,
                    output_index=0,
                    content_index=0,
                    delta=p,
                ),
            )
            self._chunk(
                event(
                    "response.output_text.done",
                    item_id=mid,
                    output_index=0,
                    content_index=0,
                    text=text,
                )
            )
            self._chunk(
                event(
                    "response.content_part.done",
                    item_id=mid,
                    output_index=0,
                    content_index=0,
                    part={"type": "output_text", "text": text, "annotations": []},
                )
            )
            self._chunk(
                event("response.output_item.done", output_index=0, item=item(text, "completed"))
            )
            self._chunk(
                event(
                    "response.completed",
                    response=response(
                        "completed",
                        [item(text, "completed")],
                        {**_responses_usage(prompt, tokens), **(rule.usage or {})},
                    ),
                )
            )
            self._end_stream()
            return tokens, len(pieces)

        def _embeddings(self, model: str, body: dict[str, Any]) -> int:
            inp = body.get("input")
            items: list[Any] = (
                [inp]
                if isinstance(inp, str)
                or (isinstance(inp, list) and inp and isinstance(inp[0], int))
                else list(inp or [])
            )
            data, tokens = [], 0
            b64 = body.get("encoding_format") == "base64"
            for i, x in enumerate(items):
                if isinstance(x, list):  # token ids
                    tokens += len(x)
                    text = " ".join(map(str, x))
                else:
                    text = str(x)
                    tokens += fake._count_text(model, text)
                vec = _vector(text, fake.embedding_dim)
                emb: Any = (
                    base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if b64 else vec
                )
                data.append({"object": "embedding", "index": i, "embedding": emb})
            self._send_json(
                200,
                {
                    "object": "list",
                    "data": data,
                    "model": model,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                },
            )
            return tokens

    return Handler


class FakeOpenAIProcess:
    """A :class:`FakeOpenAI` in its own process (no GIL shared with the caller).

    Example:
        >>> fake = FakeOpenAIProcess.spawn()                      # doctest: +SKIP
        >>> fake.base_url                                         # doctest: +SKIP
        'http://127.0.0.1:40123/v1'
        >>> fake.stop()                                           # doctest: +SKIP
    """

    def __init__(self, process: subprocess.Popen[str] | None, url: str) -> None:
        self.process = process
        self.url = url
        self.base_url = url + "/v1"

    @classmethod
    def spawn(
        cls, *, reply: str | None = None, latency: float = 0.0, timeout: float = 30.0
    ) -> FakeOpenAIProcess:
        """Start ``python -m tb_plugins.testing.fake_openai`` on a free port and wait for it."""
        cmd = [
            sys.executable,
            "-m",
            "tb_plugins.testing.fake_openai",
            "--port",
            "0",
            "--latency",
            str(latency),
        ]
        if reply is not None:
            cmd += ["--reply", reply]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.startswith("FAKE_OPENAI_URL="):
                return cls(proc, line.split("=", 1)[1].strip())
            if not line and proc.poll() is not None:
                break
        proc.kill()
        raise RuntimeError("the fake OpenAI server did not start")

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    @property
    def requests(self) -> list[Served]:
        """Every request the server recorded."""
        return [Served(**r) for r in self._call("GET", "/_fake/requests")]

    def script(self, **kwargs: Any) -> None:
        """See :meth:`FakeOpenAI.script` (``hang=math.inf`` is sent as a large number)."""
        if kwargs.get("hang") == math.inf:
            kwargs["hang"] = 1e9
        self._call("POST", "/_fake/script", kwargs)

    def reset(self) -> None:
        """See :meth:`FakeOpenAI.reset`."""
        self._call("POST", "/_fake/reset", {})

    def release(self) -> None:
        """See :meth:`FakeOpenAI.release`."""
        self._call("POST", "/_fake/release", {})

    def stop(self) -> None:
        """Terminate the process."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _iter_signals() -> Iterator[signal.Signals]:
    yield signal.SIGTERM
    yield signal.SIGINT


def main(argv: Sequence[str] | None = None) -> None:
    """Run the fake server in the foreground (``python -m tb_plugins.testing.fake_openai``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--reply", default=DEFAULT_REPLY)
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args(argv)
    fake = FakeOpenAI(host=args.host, port=args.port, reply=args.reply, latency=args.latency)

    def _stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    for sig in _iter_signals():
        signal.signal(sig, _stop)
    print(f"FAKE_OPENAI_URL={fake.url}", flush=True)
    try:
        fake.serve_forever()
    finally:
        fake._httpd.server_close()


if __name__ == "__main__":
    main()
