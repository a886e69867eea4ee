"""The dashboard's HTTP server: the page, its script and style, and the JSON it draws from.

Routes (``GET`` only; any other method is 405, any other path 404)::

    /                       the page (dashboard/static/index.html)
    /static/dashboard.js    its script: draws everything from the two APIs below
    /static/dashboard.css   its style
    /api/status[?scope=S]   every budget now: data.status_payload
    /api/usage[?since=&until=&bucket=&limit=]
                            the usage log over a period: data.usage_payload

A parameter the API cannot use is a 400 whose JSON ``error`` says what to send; a ledger that
cannot be read is a 503. Scope and model names are whatever the application sent, so the page
is static and its script puts every name in the page as text (``textContent``), never as
markup; a Content-Security-Policy allows only the server's own script and style besides.
Served on a loopback address, the server answers only requests addressed to a loopback name
(``localhost``, ``127.0.0.1``, ``[::1]``), so a web page cannot read it through a DNS name
of its own that points at 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import socketserver
import threading
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from tb_plugins.dashboard.data import (
    QueryError,
    status_payload,
    status_query,
    usage_payload,
    usage_query,
)
from tb_plugins.errors import LedgerError

if TYPE_CHECKING:
    from tb_plugins.engine import BudgetGuard

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "DashboardServer"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765

logger = logging.getLogger("tb_plugins.dashboard")

_ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/static/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": _CSP,
}
_LOOPBACK_NAMES = ("localhost", "localhost.")
_MAX_FIELDS = 20


class DashboardServer(ThreadingHTTPServer):
    """The read-only dashboard of ``guard``'s budgets and usage log, on ``host:port``.

    ``port=0`` takes a free port (see :attr:`url`). Run it with :meth:`serve_forever` (the
    ``tb serve`` way: Ctrl-C ends it) or in a background thread with :meth:`start` and
    :meth:`stop`. Requests are answered in threads; the ledger is read by one at a time.

    Raises:
        OSError: the address cannot be bound (in use, or not this host's).

    Example:
        >>> import json, urllib.request
        >>> from tb_plugins import BudgetGuard
        >>> guard = BudgetGuard.from_dict({"ledger": "memory://", "alerts": [],
        ...     "budgets": [{"scope": "team:search", "limit": "1k tokens/day"}]})
        >>> server = DashboardServer(guard, port=0).start()
        >>> with urllib.request.urlopen(server.url + "api/status") as r:
        ...     [(b["scope"], b["utilization"]) for b in json.load(r)["budgets"]]
        [('team:search', 0.0)]
        >>> server.stop()
    """

    daemon_threads = True

    def __init__(
        self, guard: BudgetGuard, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
    ) -> None:
        self.guard = guard
        self.reading = threading.Lock()  # one ledger read at a time, however many tabs poll
        self.assets = _load_assets()
        self.loopback = _is_loopback(host)
        self._thread: threading.Thread | None = None
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer's own looks the host's name up in DNS, which can take seconds.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.port

    @property
    def port(self) -> int:
        """The port listened on (the one chosen when asked for 0)."""
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        """The page's address, e.g. ``http://127.0.0.1:8765/``."""
        host = str(self.server_address[0])
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/"

    def start(self) -> DashboardServer:
        """Serve in a daemon thread; returns the server."""
        self._thread = threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": 0.1},  # how long stop() may wait
            name="tb-dashboard",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop a server started with :meth:`start` and close its socket."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away mid-answer; the handler answers every other failure itself.
        logger.debug("tb dashboard: connection from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server_version = "tb-dashboard"
    sys_version = ""

    @property
    def dashboard(self) -> DashboardServer:
        server = self.server
        assert isinstance(server, DashboardServer)
        return server

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if not self._host_allowed():
            self._json(
                HTTPStatus.FORBIDDEN, {"error": "this dashboard answers only loopback names"}
            )
            return
        asset = self.dashboard.assets.get(url.path)
        if asset is not None:
            self._send(HTTPStatus.OK, asset[0], asset[1])
            return
        api = _API.get(url.path)
        if api is None:
            self._json(
                HTTPStatus.NOT_FOUND,
                {"error": f"no such page: {url.path[:200]}; see / , /api/status or /api/usage"},
            )
            return
        try:
            params = _params(url.query)
            with self.dashboard.reading:
                payload = api(self.dashboard.guard, params)
        except QueryError as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        except LedgerError as exc:
            logger.warning("tb dashboard: %s: the ledger cannot be read: %s", url.path, exc)
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"the ledger: {exc}"})
        except Exception:
            logger.exception("tb dashboard: %s failed", url.path)
            self._json(
                HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error; see the server's log"}
            )
        else:
            self._json(HTTPStatus.OK, payload)

    def _refuse(self) -> None:
        self.close_connection = True  # a body the client sent is never read
        self._json(
            HTTPStatus.METHOD_NOT_ALLOWED,
            {"error": f"{self.command} is not allowed: the dashboard is read-only (GET)"},
            Allow="GET",
        )

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _refuse
    do_TRACE = do_CONNECT = _refuse

    def _host_allowed(self) -> bool:
        if not self.dashboard.loopback:
            return True
        host = self.headers.get("Host")
        if host is None:
            return True  # not a browser: browsers always send it
        name = host.strip().lower()
        if name.startswith("["):
            name = name[1 : name.find("]")] if "]" in name else name
        else:
            name = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
        return name in _LOOPBACK_NAMES or _is_loopback(name)

    def _json(self, status: HTTPStatus, payload: Any, **headers: str) -> None:
        body = json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()
        self._send(status, body, "application/json", **headers)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in {**_HEADERS, **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("tb dashboard: %s " + format, self.address_string(), *args)


def _api_status(guard: BudgetGuard, params: Mapping[str, str]) -> dict[str, Any]:
    return status_payload(guard, status_query(params))


def _api_usage(guard: BudgetGuard, params: Mapping[str, str]) -> dict[str, Any]:
    return usage_payload(guard, usage_query(params, guard.now()))


_API: dict[str, Callable[[BudgetGuard, Mapping[str, str]], dict[str, Any]]] = {
    "/api/status": _api_status,
    "/api/usage": _api_usage,
}


def _params(query: str) -> dict[str, str]:
    """The query string as a dict; a parameter given twice, or too many, is a QueryError."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=_MAX_FIELDS)
    except ValueError:
        raise QueryError(f"too many query parameters (at most {_MAX_FIELDS})") from None
    out: dict[str, str] = {}
    for name, value in pairs:
        if name in out:
            raise QueryError(f"parameter {name[:40]!r} is given more than once")
        out[name] = value
    return out


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _load_assets() -> dict[str, tuple[bytes, str]]:
    static = resources.files("tb_plugins.dashboard").joinpath("static")
    return {
        path: (static.joinpath(name).read_bytes(), kind) for path, (name, kind) in _ASSETS.items()
    }
