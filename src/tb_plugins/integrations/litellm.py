"""LiteLLM SDK integration: budgets on ``litellm.acompletion``, ``Router`` and sync calls.

``TokenBudgetLogger`` is a LiteLLM ``CustomLogger``. Register it once and every async call is
checked before it leaves the process::

    import litellm
    from tb_plugins import BudgetGuard
    from tb_plugins.integrations.litellm import TokenBudgetLogger

    guard = BudgetGuard.from_config("budgets.yaml")
    litellm.callbacks = [TokenBudgetLogger(guard, scopes=["team:search"])]
    await litellm.acompletion(model="gpt-4o", messages=[...], max_tokens=500)

* ``async_pre_call_deployment_hook`` (run by LiteLLM's async wrapper right before the
  provider call) reserves the estimate and applies the decision: a lower ``max_tokens``, the
  cheaper model, and ``stream_options.include_usage`` on streams (where the provider takes
  it) so the usage is exact. A refusal raises the guard's own
  :class:`~tb_plugins.errors.BudgetExceeded`, with ``status_code = 400`` so a ``Router``
  neither retries it nor cools the deployment down.
* ``async_log_success_event`` settles the hold with the usage LiteLLM reports (for a stream:
  the assembled stream's usage); ``async_log_failure_event`` releases it. Holds are keyed by
  ``litellm_call_id``.
* With a ``Router``, pass ``router=`` and a downgrade switches the call to a deployment of the
  cheaper model group, with that deployment's own ``litellm_params`` (key, base URL, version).
  Router calls are checked under their model group name, so ``downgrade:`` maps group names.

Register the logger once per process: LiteLLM copies ``litellm.callbacks`` into its success
and failure lists on first use, so a logger swapped in later would check calls but never hear
how they ended. To change the guard, set ``logger.guard``.

Sync ``litellm.completion`` never runs the deployment hook and swallows exceptions raised by
sync callbacks, so no callback can stop it: use :func:`guarded_completion` instead.

Importing this module imports LiteLLM (seconds); ``import tb_plugins`` never does.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from litellm.integrations.custom_logger import CustomLogger

from tb_plugins.core.usage import Usage, check_count
from tb_plugins.engine import BudgetGuard, Decision
from tb_plugins.engine.held import HeldCalls, afinish
from tb_plugins.errors import BudgetRefused

if TYPE_CHECKING:
    from litellm.router import Router

__all__ = ["RequestView", "TokenBudgetLogger", "guarded_completion", "request_view", "usage_of"]

logger = logging.getLogger("tb_plugins")

# A status the Router neither retries nor cools a deployment down for (it does both for 429
# and for errors without a status): a budget refusal is about the caller, not the deployment.
_NO_RETRY_STATUS = 400
_APIS = frozenset({"completion", "text_completion", "embedding", "responses", "anthropic_messages"})
_CHAT_CAPS = ("max_completion_tokens", "max_tokens")


@dataclass(frozen=True)
class RequestView:
    """What the guard needs from one LiteLLM request, whatever its API.

    Attributes:
        api: ``completion``, ``text_completion``, ``embedding``, ``responses`` or
            ``anthropic_messages``.
        model: the model the request names.
        messages: chat messages (Responses ``input`` and Anthropic ``system`` folded in).
        prompt: plain text input (embeddings, text completions).
        input_tokens: a known input size (embeddings given as token ids).
        tools: tool definitions, counted as input.
        max_tokens: the output cap the request sets, if any (for a chat request that sets
            both ``max_tokens`` and ``max_completion_tokens``, the larger).
        max_tokens_key: where that cap lives in the request (None: no output, e.g. embeddings).
    """

    api: str
    model: str | None
    messages: list[dict[str, Any]] | None = None
    prompt: str | list[str] | None = None
    input_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    max_tokens: int | None = None
    max_tokens_key: str | None = None

    @property
    def output_cap(self) -> int | None:
        """The ``max_tokens`` to check with (0 for calls without output)."""
        return 0 if self.max_tokens_key is None else self.max_tokens


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _cap(data: Mapping[str, Any], key: str) -> int | None:
    """The output cap ``data[key]`` (None when absent or null), checked: a cap the guard
    cannot trust must stop the request, never let it through unbudgeted."""
    value = data.get(key)
    return None if value is None else check_count(key, value)


def _chat_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        return []
    out = []
    for m in messages:
        if isinstance(m, Mapping) and isinstance(m.get("role"), str):
            out.append(dict(m))
        else:  # an object message or a Responses item without a role: count its JSON
            out.append({"role": "user", "content": json.dumps(m, default=str)})
    return out


def request_view(call_type: str | None, data: Mapping[str, Any]) -> RequestView | None:
    """Read a LiteLLM request (SDK kwargs or proxy body) for the guard.

    Returns None for calls that are not budgeted (images, audio, files, ...).

    Raises:
        TypeError: an output cap (``max_tokens``, ``max_completion_tokens``,
            ``max_output_tokens``) is not a whole number (text, ``1.5``, NaN, a boolean).
        ValueError: an output cap is negative or above
            :data:`~tb_plugins.core.usage.MAX_CALL_TOKENS`.

    Example:
        >>> v = request_view("acompletion", {"model": "gpt-4o", "max_tokens": 5,
        ...                                  "messages": [{"role": "user", "content": "hi"}]})
        >>> v.model, v.max_tokens, v.max_tokens_key
        ('gpt-4o', 5, 'max_tokens')
    """
    name = str(getattr(call_type, "value", call_type) or "")
    kind = name[1:] if name.startswith("a") and name[1:] in _APIS else name
    model = data.get("model")
    model = model if isinstance(model, str) else None
    tools = data.get("tools") if isinstance(data.get("tools"), list) else None
    if kind == "completion":
        key = "max_completion_tokens" if "max_completion_tokens" in data else "max_tokens"
        caps = [c for c in (_cap(data, k) for k in _CHAT_CAPS) if c is not None]
        return RequestView(
            kind,
            model,
            _chat_messages(data.get("messages")),
            tools=tools,
            max_tokens=max(caps) if caps else None,
            max_tokens_key=key,
        )
    if kind == "anthropic_messages":
        msgs = _chat_messages(data.get("messages"))
        system = data.get("system")
        if system:
            msgs.insert(0, {"role": "system", "content": system})
        return RequestView(
            kind,
            model,
            msgs,
            tools=tools,
            max_tokens=_cap(data, "max_tokens"),
            max_tokens_key="max_tokens",
        )
    if kind == "responses":
        inp = data.get("input")
        msgs = [{"role": "user", "content": inp}] if isinstance(inp, str) else _chat_messages(inp)
        if data.get("instructions"):
            msgs.insert(0, {"role": "system", "content": data["instructions"]})
        return RequestView(
            kind,
            model,
            msgs,
            tools=tools,
            max_tokens=_cap(data, "max_output_tokens"),
            max_tokens_key="max_output_tokens",
        )
    if kind == "embedding":
        inp = data.get("input")
        if isinstance(inp, str):
            return RequestView(kind, model, prompt=inp)
        if isinstance(inp, list) and inp and all(_int(x) is not None for x in inp):
            return RequestView(kind, model, input_tokens=len(inp))
        if isinstance(inp, list) and all(isinstance(x, list) for x in inp):
            return RequestView(kind, model, input_tokens=sum(len(x) for x in inp))
        if isinstance(inp, list):
            return RequestView(kind, model, prompt=[str(x) for x in inp])
        return RequestView(kind, model, input_tokens=0)
    if kind == "text_completion":
        prompt = data.get("prompt")
        text: str | list[str] = (
            prompt if isinstance(prompt, str) else [str(p) for p in prompt or []]
        )
        return RequestView(
            kind,
            model,
            prompt=text,
            max_tokens=_cap(data, "max_tokens"),
            max_tokens_key="max_tokens",
        )
    return None


def _get(obj: Any, *names: str) -> Any:
    for name in names:
        value = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
        if value is not None:
            return value
    return None


def _count(value: Any) -> int:
    """One reported count made safe to charge (see :meth:`Usage.reported`)."""
    return Usage.reported(value, 0).input_tokens


def usage_of(response: Any, kwargs: Mapping[str, Any] | None = None) -> Usage | None:
    """The usage a LiteLLM response reports (chat, stream, Responses, Anthropic, embeddings).

    Falls back to the ``standard_logging_object`` LiteLLM passes to success callbacks;
    None when neither reports an input count (the caller then charges the estimate). The
    counts go through :meth:`Usage.reported`: odd ones (negative, fractional, text, null,
    beyond :data:`~tb_plugins.core.usage.MAX_CALL_TOKENS`) are charged as it reads them,
    never raising.

    Example:
        >>> u = usage_of({"usage": {"prompt_tokens": 12, "completion_tokens": -3}})
        >>> u.input_tokens, u.output_tokens
        (12, 0)
    """
    u = _get(response, "usage")
    if u is None and kwargs is not None:
        u = _get(kwargs.get("async_complete_streaming_response"), "usage")
    if u is not None:
        inp = _get(u, "prompt_tokens", "input_tokens")
        if inp is not None:
            if _get(u, "prompt_tokens") is None:  # Anthropic counts cache reads apart
                inp = (
                    _count(inp)
                    + _count(_get(u, "cache_read_input_tokens"))
                    + _count(_get(u, "cache_creation_input_tokens"))
                )
            inp_d = _get(u, "prompt_tokens_details", "input_tokens_details")
            out_d = _get(u, "completion_tokens_details", "output_tokens_details")
            return Usage.reported(
                inp,
                _get(u, "completion_tokens", "output_tokens"),
                _get(inp_d, "cached_tokens"),
                _get(out_d, "reasoning_tokens"),
            )
    slo = (kwargs or {}).get("standard_logging_object")
    if isinstance(slo, Mapping) and slo.get("prompt_tokens") is not None:
        return Usage.reported(slo["prompt_tokens"], slo.get("completion_tokens"))
    return None


def _scopes_from(metadata: Any) -> list[str]:
    if not isinstance(metadata, Mapping):
        return []
    raw = metadata.get("tb_scopes")
    if isinstance(raw, str):
        raw = raw.split(",")
    return [s.strip() for s in raw or () if isinstance(s, str) and s.strip()]


@functools.lru_cache(maxsize=1024)
def _reports_stream_usage(model: str, provider: str | None) -> bool:
    """Whether LiteLLM passes ``stream_options`` to this model's provider."""
    import litellm

    try:
        _, prov, _, _ = litellm.get_llm_provider(model=model, custom_llm_provider=provider)
        params = litellm.get_supported_openai_params(model=model, custom_llm_provider=prov)
    except Exception:
        return False
    return "stream_options" in (params or ())


def ask_stream_usage(kwargs: dict[str, Any]) -> None:
    """Ask a streamed chat call for its usage (``stream_options.include_usage``), where the
    provider takes that option; elsewhere LiteLLM assembles the usage itself."""
    model, provider = kwargs.get("model"), kwargs.get("custom_llm_provider")
    if not kwargs.get("stream") or not isinstance(model, str):
        return
    if not _reports_stream_usage(model, provider if isinstance(provider, str) else None):
        return
    opts = kwargs.get("stream_options")
    kwargs["stream_options"] = {
        **(opts if isinstance(opts, Mapping) else {}),
        "include_usage": True,
    }


def apply_decision(data: dict[str, Any], view: RequestView, decision: Decision) -> None:
    """Write a decision's ``max_tokens`` into a request, under the request's own key (and
    lower a chat request's other cap, ``max_tokens`` or ``max_completion_tokens``, if it
    asks for more, so no cap the provider may read is above the decision)."""
    key = view.max_tokens_key
    cap = decision.max_tokens
    if key is None or cap is None:
        return
    if cap != view.max_tokens:
        data[key] = cap
    if view.api == "completion":
        for other in _CHAT_CAPS:
            value = _int(data.get(other))
            if other != key and value is not None and value > cap:
                data[other] = cap


class TokenBudgetLogger(CustomLogger):
    """Budgets on async LiteLLM calls (``acompletion``, ``aembedding``, ``aresponses``,
    ``Router``), streams included.

    Args:
        guard: the process's :class:`~tb_plugins.BudgetGuard`.
        scopes: scopes charged for every call, e.g. ``["team:search"]``; a call adds its
            own with ``metadata={"tb_scopes": ["user:alice", "agent:planner"]}``.
        router: the ``Router`` whose calls may be downgraded to a cheaper model group (the
            downgrade targets in the policy are model group names).

    Example:
        >>> logger = TokenBudgetLogger(guard, scopes=["team:search"])   # doctest: +SKIP
        >>> litellm.callbacks = [logger]                                 # doctest: +SKIP
        >>> await litellm.acompletion(model="gpt-4o", messages=msgs,      # doctest: +SKIP
        ...     metadata={"tb_scopes": ["user:alice"]})
    """

    def __init__(
        self, guard: BudgetGuard, scopes: Sequence[str] = (), *, router: Router | None = None
    ) -> None:
        super().__init__()
        self.guard = guard
        self.scopes = tuple(scopes)
        self.router = router
        self._holds: HeldCalls[str] = HeldCalls()

    @property
    def holds(self) -> int:
        """Calls checked whose outcome is not known yet."""
        return len(self._holds)

    async def async_pre_call_deployment_hook(
        self, kwargs: dict[str, Any], call_type: Any
    ) -> dict[str, Any] | None:
        """Check the call against its budgets and apply the decision (or raise the refusal)."""
        view = request_view(call_type, kwargs)
        call_id = kwargs.get("litellm_call_id")
        if view is None or not isinstance(call_id, str):
            return None
        log_obj = kwargs.get("litellm_logging_obj")
        metadata = kwargs.get("metadata") if isinstance(kwargs.get("metadata"), Mapping) else {}
        group = metadata.get("model_group") if isinstance(metadata, Mapping) else None
        model = group if isinstance(group, str) and group else view.model
        adjust = True
        if model is None:  # passed positionally: visible, but cannot be rewritten
            model, adjust = getattr(log_obj, "model", None), False
        messages = view.messages
        if messages is not None and not messages and "messages" not in kwargs:
            messages = _chat_messages(getattr(log_obj, "messages", None))
        if not isinstance(model, str):
            return None
        scopes = [
            *self.scopes,
            *_scopes_from(metadata),
            *_scopes_from(kwargs.get("litellm_metadata")),
        ]
        decision = await self._check(view, model, messages, scopes, adjust)
        if decision.model != model:
            if isinstance(group, str) and group:
                swapped = await self._swap_deployment(kwargs, decision.model, messages)
            else:
                kwargs["model"] = decision.model
                swapped = True
            if not swapped:  # no cheaper deployment to go to: decide without the downgrade
                await self.guard.arelease(decision)
                decision = await self._check(view, model, messages, scopes, adjust=False)
        apply_decision(kwargs, view, decision)
        if view.api in ("completion", "text_completion"):
            ask_stream_usage(kwargs)
        # A caller reusing a call id in flight would orphan the earlier hold: return it.
        await afinish(self.guard, self._holds.hold(call_id, decision), False)
        return kwargs

    async def _check(
        self,
        view: RequestView,
        model: str,
        messages: list[dict[str, Any]] | None,
        scopes: list[str],
        adjust: bool,
    ) -> Decision:
        try:
            return await self.guard.acheck(
                model,
                messages,
                max_tokens=view.output_cap,
                scopes=scopes,
                tools=view.tools,
                prompt=view.prompt,
                input_tokens=view.input_tokens,
                adjust=adjust,
            )
        except BudgetRefused as err:
            err.status_code = _NO_RETRY_STATUS  # type: ignore[attr-defined]
            raise

    async def _swap_deployment(
        self, kwargs: dict[str, Any], group: str, messages: list[dict[str, Any]] | None
    ) -> bool:
        """Point a Router call at a deployment of ``group``, with its own credentials."""
        router = self.router
        if router is None or not router.get_model_list(model_name=group):
            logger.warning(
                "tb_plugins: cannot downgrade to model group %r (%s); the call keeps its model",
                group,
                "pass router= to TokenBudgetLogger" if router is None else "no such group",
            )
            return False
        dep = await router.async_get_available_deployment(
            model=group, request_kwargs={}, messages=messages
        )
        metadata = dict(kwargs.get("metadata") or {})
        old_id = (metadata.get("model_info") or {}).get("id")
        old = router.get_deployment(model_id=old_id) if old_id else None
        if old is not None:
            for key in old.litellm_params.model_dump(exclude_none=True):
                kwargs.pop(key, None)
        params = dict(dep["litellm_params"])
        kwargs.update(params)
        kwargs.pop("client", None)  # the Router's cached client carries the old credentials
        kwargs["model_info"] = dep.get("model_info", {})
        metadata.update(
            model_group=group,
            deployment=params.get("model"),
            model_info=kwargs["model_info"],
            api_base=params.get("api_base"),
            deployment_model_name=dep.get("model_name"),
        )
        kwargs["metadata"] = metadata
        return True

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        """Settle the call's hold with the usage LiteLLM reports."""
        decision = self._holds.take(str(kwargs.get("litellm_call_id")))
        if decision is None:
            return
        try:
            usage = usage_of(response_obj, kwargs)
        except Exception:  # charge the estimate rather than nothing
            logger.exception("tb_plugins: reading the usage of %s failed", decision.reservation_id)
            usage = None
        await afinish(self.guard, decision, usage)

    async def async_log_failure_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        """Release the hold of a call that failed."""
        await afinish(self.guard, self._holds.take(str(kwargs.get("litellm_call_id"))), False)


def guarded_completion(
    guard: BudgetGuard, *, scopes: Sequence[str] = (), **completion_kwargs: Any
) -> Any:
    """``litellm.completion(**completion_kwargs)`` under the guard: check, call, settle.

    Why not a callback: sync ``litellm.completion`` never runs
    ``async_pre_call_deployment_hook``, and LiteLLM catches and logs whatever a sync
    callback raises, so a callback can observe a sync call but cannot stop it or change
    its model. This wrapper decides first, applies the decision (model, ``max_tokens``,
    ``stream_options.include_usage``), calls LiteLLM, then settles the real usage or
    releases the hold if the call fails. A stream is settled when it ends; if it is closed
    early, the output already received is charged.

    Args:
        guard: the process's guard.
        scopes: who is charged (besides ``metadata["tb_scopes"]`` of the call).
        **completion_kwargs: what ``litellm.completion`` takes; pass ``model`` and
            ``messages`` by keyword.

    Raises:
        BudgetExceeded: a budget has no room; nothing was sent.

    Example:
        >>> r = guarded_completion(guard, scopes=["user:alice"], model="gpt-4o",  # doctest: +SKIP
        ...                        messages=[{"role": "user", "content": "Hi"}], max_tokens=50)
    """
    import litellm

    view = request_view("completion", completion_kwargs)
    if view is None or view.model is None:
        raise TypeError("guarded_completion() needs model= and messages= keyword arguments")
    all_scopes = [*scopes, *_scopes_from(completion_kwargs.get("metadata"))]
    decision = guard.check(
        view.model, view.messages, max_tokens=view.max_tokens, scopes=all_scopes, tools=view.tools
    )
    kwargs = dict(completion_kwargs, model=decision.model)
    apply_decision(kwargs, view, decision)
    ask_stream_usage(kwargs)
    try:
        response = litellm.completion(**kwargs)
    except BaseException:
        guard.release(decision)
        raise
    if kwargs.get("stream"):
        return _SettledStream(guard, decision, response)
    guard.settle(decision, usage_of(response))
    return response


class _SettledStream:
    """A sync LiteLLM stream that settles its hold when it ends or is closed."""

    def __init__(self, guard: BudgetGuard, decision: Decision, stream: Any) -> None:
        self._guard, self._decision, self._stream = guard, decision, stream
        self._text: list[str] = []
        self._usage: Usage | None = None
        self._done = False

    def __iter__(self) -> Iterator[Any]:
        try:
            for chunk in self._stream:
                u = usage_of(chunk)
                if u is not None:
                    self._usage = u
                for choice in getattr(chunk, "choices", None) or ():
                    text = getattr(getattr(choice, "delta", None), "content", None)
                    if isinstance(text, str):
                        self._text.append(text)
                yield chunk
        finally:
            self.close()

    def close(self) -> None:
        """Settle now: the reported usage, else the estimate's input and the output seen."""
        if self._done:
            return
        self._done = True
        usage = self._usage
        if usage is None:
            out = self._guard.tokenizer.count_text(self._decision.model, "".join(self._text))
            usage = Usage(self._decision.estimate.input_tokens, out)
        try:
            self._guard.settle(self._decision, usage)
        except Exception:
            logger.exception("tb_plugins: settling %s failed", self._decision.reservation_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
