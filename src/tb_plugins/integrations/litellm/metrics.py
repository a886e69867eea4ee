"""The guard's Prometheus series on the LiteLLM proxy's own ``/metrics``.

How the proxy (LiteLLM 1.106) serves ``/metrics``: only when its ``prometheus`` callback is
configured does it mount an ASGI app there
(``PrometheusLogger._mount_metrics_endpoint``), which renders prometheus_client's default
``REGISTRY`` in a worker thread; with ``PROMETHEUS_MULTIPROC_DIR`` set it renders a fresh
registry that reads the workers' files instead (``--prometheus_metrics_port`` serves that on
a port of its own). The ``PrometheusAuthMiddleware`` guards every path under ``/metrics``
with the proxy's API-key auth unless ``litellm_settings.require_auth_for_metrics_endpoint``
is false.

:func:`expose` registers the guard's collector on the default ``REGISTRY``, so the series show
on the proxy's ``/metrics`` whether or not its ``prometheus`` callback is on; without that
callback it mounts the same renderer at ``/metrics`` itself (behind the same auth). In
multiprocess mode the proxy's ``/metrics`` reads only the workers' files, which a collector
cannot write to: the tb series are then left off it (a warning says so) and
``tb metrics serve`` is the endpoint for the budgets.

Options come from the proxy's ``config.yaml``::

    callback_settings:
      tb_plugins:
        config: budgets.yaml
        metrics:                 # or `metrics: false` to leave /metrics alone
          per_scope: ["team:*"]  # each team its own series (users stay under user:*)
"""

from __future__ import annotations

import logging
import os
import sys
import weakref
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from tb_plugins.engine.guard import BudgetGuard
    from tb_plugins.metrics import BudgetCollector

__all__ = ["METRICS_PATH", "expose"]

logger = logging.getLogger("tb_plugins")

METRICS_PATH = "/metrics"

_EXPOSED: weakref.WeakKeyDictionary[BudgetGuard, BudgetCollector] = weakref.WeakKeyDictionary()


def expose(
    guard: BudgetGuard,
    registry: CollectorRegistry | None = None,
    *,
    app: Any = None,
    per_scope: Iterable[str] | None = None,
) -> BudgetCollector | None:
    """Show ``guard``'s series on the proxy's ``/metrics``.

    Args:
        guard: the proxy's guard (``proxy_handler.guard``).
        registry: the registry to join (default prometheus_client's ``REGISTRY``, the one
            the proxy serves).
        app: the ASGI app to mount ``/metrics`` on when it has none (default the proxy's
            ``litellm.proxy.proxy_server.app`` when the proxy is running, else none).
        per_scope: patterns whose scopes get series of their own (default the proxy
            config's ``callback_settings.tb_plugins.metrics.per_scope``).

    Returns:
        The collector, or None when prometheus_client is not installed or the proxy config
        says ``metrics: false``. Called again for the same guard, the same collector.

    Example:
        >>> expose(guard)  # doctest: +SKIP
    """
    settings = _settings()
    if settings is False:
        return None
    known = _EXPOSED.get(guard)
    if known is not None:
        return known
    try:
        from tb_plugins.metrics import register

        prom = _prometheus()
    except ImportError as exc:
        logger.info("tb_plugins: budgets are not on /metrics: %s", exc)
        return None
    if per_scope is None:
        per_scope = _per_scope(settings)
    target: CollectorRegistry = prom.REGISTRY if registry is None else registry
    collector = register(guard, target, per_scope=per_scope)
    _EXPOSED[guard] = collector
    if app is None:
        server = sys.modules.get("litellm.proxy.proxy_server")
        app = getattr(server, "app", None)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        logger.warning(
            "tb_plugins: PROMETHEUS_MULTIPROC_DIR is set, so the proxy's /metrics shows only "
            "what its workers write there and not the budgets; serve them with "
            "`tb metrics serve --port N`"
        )
    elif app is not None and not _has_route(app, METRICS_PATH):
        app.mount(METRICS_PATH, _metrics_app(target))
        logger.info("tb_plugins: budgets on %s", METRICS_PATH)
    return collector


def _prometheus() -> Any:
    from tb_plugins._lazy import require

    return require("prometheus_client", "metrics")


def _settings() -> object:
    """``callback_settings.tb_plugins.metrics`` of the proxy config (None when unset)."""
    litellm = sys.modules.get("litellm")
    settings = getattr(litellm, "callback_settings", None)
    section = settings.get("tb_plugins") if isinstance(settings, Mapping) else None
    return section.get("metrics") if isinstance(section, Mapping) else None


def _per_scope(settings: object) -> list[str]:
    value = settings.get("per_scope") if isinstance(settings, Mapping) else None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    if value is not None:
        logger.warning("tb_plugins: metrics.per_scope must be a list of patterns, not %r", value)
    return []


def _has_route(app: Any, path: str) -> bool:
    return any(getattr(route, "path", None) == path for route in getattr(app, "routes", ()))


def _metrics_app(registry: CollectorRegistry) -> Any:
    """The proxy's own ``/metrics`` renderer (off the event loop), or prometheus_client's."""
    try:
        from litellm.integrations.prometheus_metrics_endpoint import make_metrics_asgi_app
    except ImportError:  # another LiteLLM version
        from prometheus_client import make_asgi_app

        return make_asgi_app(registry)
    return make_metrics_asgi_app(registry)
