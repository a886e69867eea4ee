"""LangChain and LangGraph: token budgets through a callback handler, agent middleware, and a
downgrade helper for plain chains.

Three ways to put a budget on LangChain calls, all sharing one :class:`~tb_plugins.BudgetGuard`:

* :class:`TokenBudgetCallbackHandler` reserves when a chat model (or LLM) run starts, settles
  from ``usage_metadata`` when it ends, and refuses by raising. It cannot change a request, so
  it only allows or refuses. Register it in the constructor (``ChatOpenAI(callbacks=[h])``),
  per call (``chain.invoke(x, config={"callbacks": [h]})``), or for everything in a block with
  :func:`budget_scope` (which also reaches runs LangGraph starts in its own threads and tasks).
* :class:`TokenBudgetMiddleware` for ``langchain.agents.create_agent`` applies the full decision
  ladder to each model call: the cheaper model at ``downgrade_at``, a lower ``max_tokens`` near
  the limit, and a graceful end of the agent (or an error) when a budget or the per-run
  ``calls`` limit is spent.
* :func:`with_budget_downgrade` does the same switch and clamp for a model in a plain chain.

Refusals are raised as :class:`BudgetRefusedError` subclasses. They are also
``langchain_core.exceptions.ModelError`` with ``is_retryable = False``, so
``ModelRetryMiddleware`` (default ``retry_on``) re-raises them at once instead of retrying and
then hiding them in an AI message.

Example:
    >>> from tb_plugins import BudgetGuard
    >>> from tb_plugins.integrations.langchain import budget_scope
    >>> from tb_plugins.testing.fake_chat_model import FakeChatModel
    >>> guard = BudgetGuard.from_dict({"ledger": "memory://", "alerts": [],
    ...     "budgets": [{"scope": "user:*", "limit": "10k tokens/day"}]})
    >>> with budget_scope(guard, scopes=["user:alice"]):
    ...     _ = FakeChatModel(model="gpt-4o-mini").invoke("hi")
    >>> guard.status("user:alice")[0].spent > 0
    True
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal
from uuid import UUID

try:
    from langchain.agents.middleware import (
        AgentMiddleware,
        AgentState,
        ExtendedModelResponse,
        ModelRequest,
        ModelResponse,
    )
    from langchain.agents.middleware.types import PrivateStateAttr
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.exceptions import ModelError
    from langchain_core.language_models import BaseChatModel, LanguageModelInput
    from langchain_core.messages import AIMessage, BaseMessage, BaseMessageChunk
    from langchain_core.outputs import LLMResult
    from langchain_core.runnables import Runnable, RunnableConfig
    from langchain_core.runnables.config import ensure_config
    from langchain_core.tracers.context import register_configure_hook
    from langgraph.runtime import Runtime
    from langgraph.types import Command
    from typing_extensions import NotRequired
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "tb_plugins.integrations.langchain needs LangChain and LangGraph: "
        "pip install 'tb-plugins[langchain]'"
    ) from exc

from tb_plugins.engine import BudgetGuard, Decision
from tb_plugins.engine.held import HeldCalls
from tb_plugins.errors import (
    BudgetExceeded,
    BudgetRefused,
    LoopLimitExceeded,
    RequestTooLarge,
    UnpricedModel,
)
from tb_plugins.integrations import _langchain_scopes as lc

__all__ = [
    "BudgetExceededError",
    "BudgetRefusedError",
    "BudgetScope",
    "LoopLimitExceededError",
    "RequestTooLargeError",
    "TokenBudgetCallbackHandler",
    "TokenBudgetMiddleware",
    "UnpricedModelError",
    "budget_scope",
    "with_budget_downgrade",
]

logger = logging.getLogger("tb_plugins")

# -- refusals LangChain will not retry ---------------------------------------------------------


class BudgetRefusedError(BudgetRefused, ModelError):
    """A budget refusal raised inside LangChain. ``ModelError`` with ``is_retryable = False``:
    ``ModelRetryMiddleware``'s default ``retry_on`` re-raises it at once (it never retries it
    nor turns it into an AI message). Catch it as the tb_plugins class or as this one."""

    is_retryable = False


class BudgetExceededError(BudgetExceeded, BudgetRefusedError):
    """:class:`~tb_plugins.BudgetExceeded`, raised inside LangChain."""


class LoopLimitExceededError(LoopLimitExceeded, BudgetExceededError):
    """:class:`~tb_plugins.LoopLimitExceeded` (the per-run ``calls`` cutoff) inside LangChain."""


class RequestTooLargeError(RequestTooLarge, BudgetExceededError):
    """:class:`~tb_plugins.RequestTooLarge`, raised inside LangChain."""


class UnpricedModelError(UnpricedModel, BudgetRefusedError):
    """:class:`~tb_plugins.UnpricedModel`, raised inside LangChain."""


_LC_ERRORS: dict[type[BudgetRefused], type[BudgetRefusedError]] = {
    LoopLimitExceeded: LoopLimitExceededError,
    RequestTooLarge: RequestTooLargeError,
    BudgetExceeded: BudgetExceededError,
    UnpricedModel: UnpricedModelError,
    BudgetRefused: BudgetRefusedError,
}


def _lc_error(err: BudgetRefused) -> BudgetRefusedError:
    """The same refusal (same fields and message) as its LangChain-safe subclass."""
    if isinstance(err, BudgetRefusedError):
        return err
    cls = next(_LC_ERRORS[t] for t in type(err).__mro__ if t in _LC_ERRORS)
    new = cls.__new__(cls)
    new.__dict__.update(err.__dict__)
    new.args = err.args
    return new.with_traceback(err.__traceback__)


# Set while a middleware or the downgrade helper holds a reservation for the model call it is
# making: a callback handler on the same call then stands aside instead of charging it twice.
_GUARDED: ContextVar[bool] = ContextVar("tb_plugins_guarded", default=False)


# -- the callback handler ----------------------------------------------------------------------


@dataclass(slots=True)
class _Root:
    name: str | None
    members: set[UUID] = field(default_factory=set)
    holds: set[UUID] = field(default_factory=set)


class TokenBudgetCallbackHandler(BaseCallbackHandler):
    """Reserve, settle and refuse LangChain model calls against a :class:`BudgetGuard`.

    A sync handler (``raise_error=True``) that works under ``invoke``, ``ainvoke``, ``stream``,
    ``astream``, ``batch``/``abatch`` and inside LangGraph. Under async code LangChain runs it
    in a worker thread, so a blocking ledger never stalls the event loop.

    Each chat model (or LLM) run is checked with ``adjust=False`` (a callback cannot change the
    request: it allows or raises :class:`BudgetRefusedError`, and the model is never called),
    settled from ``usage_metadata`` (input, output, cached and reasoning tokens) when it ends,
    and released when it fails before producing anything. A run that ends without usage, or
    that is cut short (a stream abandoned half way: ``GeneratorExit``/``CancelledError``, or a
    failure after output began, or a root run ending while the model run is still open) is
    charged its estimate, never zero.

    Scope path: ``scopes`` + ``team:<team>``, ``user:<user_id>`` and ``tb_scopes`` from run
    metadata + ``chain:<root run name>`` (when the model runs inside a chain or graph) +
    ``agent:<lc_agent_name>`` (``create_agent(name=...)``) + ``run:<root run id>``. The run tree
    behind ``chain:`` and ``run:`` is pruned when its root run ends.

    Args:
        guard: the process's guard.
        scopes: scopes charged for every call, e.g. ``["team:search"]``.

    Example:
        >>> from tb_plugins import BudgetGuard
        >>> from tb_plugins.testing.fake_chat_model import FakeChatModel
        >>> guard = BudgetGuard.from_dict({"ledger": "memory://", "alerts": [],
        ...     "budgets": [{"scope": "team:search", "limit": "100k tokens/day"}]})
        >>> handler = TokenBudgetCallbackHandler(guard, scopes=["team:search"])
        >>> model = FakeChatModel(model="gpt-4o-mini", callbacks=[handler])  # constructor
        >>> _ = model.invoke("hi")
        >>> _ = FakeChatModel(model="gpt-4o-mini").invoke(  # or per call
        ...     "hi", config={"callbacks": [handler]})
        >>> [s.spent for s in guard.status("team:search")]
        [28.0]
    """

    raise_error = True

    def __init__(self, guard: BudgetGuard, scopes: Iterable[str] = ()) -> None:
        super().__init__()
        self.guard = guard
        self.scopes: tuple[str, ...] = tuple(scopes)
        self._lock = threading.Lock()
        self._root_of: dict[UUID, UUID] = {}
        self._roots: dict[UUID, _Root] = {}
        self._holds: HeldCalls[UUID] = HeldCalls()
        self._scoped = False  # made by budget_scope()

    def __repr__(self) -> str:
        return f"TokenBudgetCallbackHandler(scopes={list(self.scopes)!r})"

    @property
    def open_runs(self) -> int:
        """Runs tracked now (0 when nothing is in flight: the tree is pruned)."""
        return len(self._root_of) + len(self._roots) + len(self._holds)

    # run tree -------------------------------------------------------------------------------

    def _enter(self, run_id: UUID, parent_run_id: UUID | None, name: str | None) -> UUID:
        with self._lock:
            root = self._root_of.get(parent_run_id) if parent_run_id is not None else None
            if root is None:
                # A root, or a run whose parent this handler never saw (it joined mid-tree):
                # the run then stands as the root of what it can see.
                root = run_id
                self._roots[run_id] = _Root(name if parent_run_id is None else None)
            self._root_of[run_id] = root
            self._roots[root].members.add(run_id)
            return root

    def _leave(self, run_id: UUID) -> None:
        orphans: list[Decision] = []
        with self._lock:
            root = self._root_of.pop(run_id, None)
            if root is None:
                return
            if root != run_id:
                r = self._roots.get(root)
                if r is not None:
                    r.members.discard(run_id)
                return
            r = self._roots.pop(root)
            for member in r.members:
                self._root_of.pop(member, None)
            for held in r.holds:
                hold = self._holds.take(held)
                if hold is not None:
                    orphans.append(hold)
        for decision in orphans:  # the run ended under a model call that never finished
            lc.finish(self.guard, decision, None)

    def _stands_aside(self) -> bool:
        if _GUARDED.get():
            return True
        if self._scoped:
            current = _SCOPE.get()
            return current is not None and current is not self and current.guard is self.guard
        return False

    # model runs -----------------------------------------------------------------------------

    def _start_model(
        self,
        run_id: UUID,
        parent_run_id: UUID | None,
        metadata: dict[str, Any] | None,
        kwargs: dict[str, Any],
        serialized: dict[str, Any] | None,
        messages: list[BaseMessage] | None = None,
        prompt: str | None = None,
    ) -> None:
        if run_id in self._holds or self._stands_aside():
            return  # registered twice on one run, or another guard layer holds this call
        root = self._enter(run_id, parent_run_id, None)
        params = kwargs.get("invocation_params") or {}
        scopes = [*self.scopes, *lc.metadata_scopes(metadata)]
        with self._lock:
            r = self._roots.get(root)
            root_name = r.name if r is not None else None
        if root_name:
            scopes.append(f"chain:{root_name}")
        agent = (metadata or {}).get("lc_agent_name")
        if agent:
            scopes.append(f"agent:{agent}")
        scopes.append(f"run:{root}")
        try:
            decision = self.guard.check(
                lc.invocation_model(params, metadata, serialized),
                lc.openai_messages(messages) if messages is not None else None,
                prompt=prompt,
                max_tokens=lc.invocation_max_tokens(params, metadata),
                tools=lc.openai_tools(params.get("tools")),
                scopes=scopes,
                reservation_id=run_id.hex,
                adjust=False,
            )
        except BudgetRefused as err:
            self._leave(run_id)
            raise _lc_error(err) from None
        except BaseException:
            self._leave(run_id)
            raise
        with self._lock:
            self._holds.hold(run_id, decision)
            r = self._roots.get(root)
            if r is not None:
                r.holds.add(run_id)

    def _pop_hold(self, run_id: UUID) -> Decision | None:
        with self._lock:
            hold = self._holds.take(run_id)
            root = self._root_of.get(run_id)
            if hold is not None and root is not None:
                r = self._roots.get(root)
                if r is not None:
                    r.holds.discard(run_id)
        self._leave(run_id)
        return hold

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Check and reserve; raises :class:`BudgetRefusedError` so the model is not called."""
        self._start_model(run_id, parent_run_id, metadata, kwargs, serialized, messages[0])

    def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Check and reserve a completion-style LLM run."""
        self._start_model(run_id, parent_run_id, metadata, kwargs, serialized, prompt=prompts[0])

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        """Settle from the reported usage (the estimate if there is none)."""
        decision = self._pop_hold(run_id)
        if decision is not None:
            lc.finish(self.guard, decision, lc.usage_from_result(response, decision.model))

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Release the hold, or charge the estimate if the call was cut short mid-way."""
        decision = self._pop_hold(run_id)
        if decision is not None:
            cost = lc.failure_cost(error, decision.model, kwargs.get("response"))
            lc.finish(self.guard, decision, cost)

    # other runs only shape the tree ---------------------------------------------------------

    def on_chain_start(
        self,
        serialized: dict[str, Any] | None,
        inputs: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        """Track the run (its name becomes ``chain:<name>`` if it is a root)."""
        name = kwargs.get("name") or (serialized or {}).get("name")
        self._enter(run_id, parent_run_id, name)

    def on_tool_start(
        self,
        serialized: dict[str, Any] | None,
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        """Track the run."""
        self._enter(run_id, parent_run_id, kwargs.get("name"))

    def on_retriever_start(
        self,
        serialized: dict[str, Any] | None,
        query: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        """Track the run."""
        self._enter(run_id, parent_run_id, kwargs.get("name"))

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Prune the run (a root takes its whole tree, charging model calls left open)."""
        self._leave(run_id)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Prune the run."""
        self._leave(run_id)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Prune the run."""
        self._leave(run_id)

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Prune the run."""
        self._leave(run_id)

    def on_retriever_end(self, documents: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Prune the run."""
        self._leave(run_id)

    def on_retriever_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Prune the run."""
        self._leave(run_id)


# -- budget_scope ------------------------------------------------------------------------------

_SCOPE: ContextVar[TokenBudgetCallbackHandler | None] = ContextVar(
    "tb_plugins_budget_scope", default=None
)
register_configure_hook(_SCOPE, inheritable=True)


class BudgetScope:
    """The context manager :func:`budget_scope` returns; usable with ``with`` and ``async with``.

    Entering yields the :class:`TokenBudgetCallbackHandler` attached to every run started
    inside the block (in the manner of ``get_openai_callback``: a ContextVar read by
    ``CallbackManager.configure``, so it follows LangGraph into its threads and tasks).
    """

    def __init__(self, guard: BudgetGuard, scopes: Iterable[str] = ()) -> None:
        self.guard = guard
        self.scopes = tuple(scopes)
        self.handler: TokenBudgetCallbackHandler | None = None
        self._token: Token[TokenBudgetCallbackHandler | None] | None = None

    def __enter__(self) -> TokenBudgetCallbackHandler:
        outer = _SCOPE.get()
        scopes = self.scopes
        if outer is not None and outer.guard is self.guard:
            scopes = (*outer.scopes, *(s for s in scopes if s not in outer.scopes))
        self.handler = TokenBudgetCallbackHandler(self.guard, scopes)
        self.handler._scoped = True
        self._token = _SCOPE.set(self.handler)
        return self.handler

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _SCOPE.reset(self._token)
            self._token = None

    async def __aenter__(self) -> TokenBudgetCallbackHandler:
        return self.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        self.__exit__(*exc)


def budget_scope(guard: BudgetGuard, scopes: Iterable[str] = ()) -> BudgetScope:
    """Charge every LangChain/LangGraph model call inside the block to ``scopes``.

    Nested blocks on the same guard add their scopes to the enclosing ones (the innermost
    block's handler charges, once). Do not also pass a handler of the same guard in
    ``callbacks``: the call would be charged twice.

    Example:
        >>> from tb_plugins import BudgetGuard
        >>> from tb_plugins.testing.fake_chat_model import FakeChatModel
        >>> guard = BudgetGuard.from_dict({"ledger": "memory://", "alerts": []})
        >>> with budget_scope(guard, ["team:search"]):
        ...     with budget_scope(guard, ["user:alice"]) as handler:
        ...         _ = FakeChatModel().invoke("hi")
        >>> handler.scopes
        ('team:search', 'user:alice')
    """
    return BudgetScope(guard, scopes)


# -- agent middleware --------------------------------------------------------------------------


class BudgetState(AgentState[Any]):
    """Agent state with the id of the current run (one agent invocation)."""

    tb_run_id: NotRequired[Annotated[str, PrivateStateAttr]]


class TokenBudgetMiddleware(AgentMiddleware[BudgetState, Any, Any]):
    """Budgets for ``create_agent``: downgrade, clamp, and end the agent when spent.

    Every model call is checked with the full decision ladder and the decision is applied to
    the request: ``request.override(model=<cheaper model>)`` on a downgrade (taken from
    ``models``, else built with ``init_chat_model``), ``model_settings={"max_tokens": n}`` on a
    clamp (bound to the model like any other setting). The call is settled from the answer's
    ``usage_metadata`` and released if it fails.

    When a budget (or the per-run ``calls`` limit) has no room, the agent ends gracefully with a
    final AI message that names the budget and when it resets (``on_exhausted="end"``; the
    message history stays valid: the last tool calls are all answered, the final message has
    none), or raises :class:`BudgetRefusedError` (``on_exhausted="raise"``).

    Scope path: ``scopes`` + scopes from run metadata (``team``, ``user_id``, ``tb_scopes``) +
    ``agent:<name>`` (``create_agent(name=...)``) + ``run:<id>``. Here a *run* is one
    invocation of the agent: an id minted by ``before_agent`` and kept in the agent state, so it
    survives interrupts/resume and is new for each ``invoke``. Pass ``metadata={"tb_run_id":
    ...}`` in the config to charge several agents (e.g. the nodes of one graph) to one run.

    Place it after ``ModelRetryMiddleware``/``ModelFallbackMiddleware`` in ``middleware=[...]``
    so that each attempt is checked; do not also attach a :class:`TokenBudgetCallbackHandler` to
    the same calls expecting a second charge: the handler stands aside for them.

    Args:
        guard: the process's guard.
        scopes: scopes charged for every call.
        models: ready chat models by name for downgrade targets, e.g.
            ``{"gpt-4o-mini": ChatOpenAI(model="gpt-4o-mini")}``.
        on_exhausted: ``"end"`` (default) or ``"raise"``.

    Example:
        >>> from langchain.agents import create_agent
        >>> from tb_plugins import BudgetGuard
        >>> from tb_plugins.testing.fake_chat_model import FakeChatModel
        >>> guard = BudgetGuard.from_dict({"ledger": "memory://", "alerts": [],
        ...     "budgets": [{"scope": "run:*", "calls": 5, "window": "total"}]})
        >>> agent = create_agent(FakeChatModel(model="gpt-4o"), tools=[], name="planner",
        ...     middleware=[TokenBudgetMiddleware(guard, scopes=["team:search"])])
        >>> agent.invoke({"messages": [("user", "hi")]})["messages"][-1].content
        'Hello from the fake model.'
    """

    state_schema = BudgetState

    def __init__(
        self,
        guard: BudgetGuard,
        scopes: Iterable[str] = (),
        *,
        models: Mapping[str, BaseChatModel] | None = None,
        on_exhausted: Literal["end", "raise"] = "end",
    ) -> None:
        super().__init__()
        if on_exhausted not in ("end", "raise"):
            raise ValueError(f"on_exhausted is 'end' or 'raise', got {on_exhausted!r}")
        self.guard = guard
        self.scopes = tuple(scopes)
        self.models: dict[str, BaseChatModel] = dict(models or {})
        self.on_exhausted = on_exhausted
        self.tools = []
        self._models_lock = threading.Lock()

    def before_agent(self, state: BudgetState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        """Start a run: mint the id charged as ``run:<id>``."""
        return {"tb_run_id": uuid.uuid4().hex}

    async def abefore_agent(
        self, state: BudgetState, runtime: Runtime[Any]
    ) -> dict[str, Any] | None:
        """Async :meth:`before_agent`."""
        return self.before_agent(state, runtime)

    def wrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], ModelResponse[Any]],
    ) -> ModelResponse[Any] | AIMessage | ExtendedModelResponse[Any]:
        """Check, apply the decision, call, settle."""
        call = self._call(request)
        try:
            decision = self.guard.check(**call.check_kwargs())
        except BudgetRefused as err:
            return self._exhausted(err)
        token = _GUARDED.set(True)
        try:
            response = handler(self._apply(request, call, decision))
        except BaseException as exc:
            lc.finish(self.guard, decision, lc.failure_cost(exc, decision.model))
            raise
        finally:
            _GUARDED.reset(token)
        lc.finish(self.guard, decision, lc.response_usage(response, decision.model))
        return response

    async def awrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], Awaitable[ModelResponse[Any]]],
    ) -> ModelResponse[Any] | AIMessage | ExtendedModelResponse[Any]:
        """Async :meth:`wrap_model_call`."""
        call = self._call(request)
        try:
            decision = await self.guard.acheck(**call.check_kwargs())
        except BudgetRefused as err:
            return self._exhausted(err)
        token = _GUARDED.set(True)
        try:
            response = await handler(self._apply(request, call, decision))
        except BaseException as exc:
            await lc.afinish(self.guard, decision, lc.failure_cost(exc, decision.model))
            raise
        finally:
            _GUARDED.reset(token)
        await lc.afinish(self.guard, decision, lc.response_usage(response, decision.model))
        return response

    # helpers --------------------------------------------------------------------------------

    def _call(self, request: ModelRequest[Any]) -> lc.Call:
        metadata = lc.current_metadata()
        scopes = [*self.scopes, *lc.metadata_scopes(metadata)]
        agent = metadata.get("lc_agent_name")
        if agent:
            scopes.append(f"agent:{agent}")
        run = metadata.get("tb_run_id") or request.state.get("tb_run_id")
        if run:
            scopes.append(f"run:{run}")
        messages = list(request.messages)
        if request.system_message is not None:
            messages.insert(0, request.system_message)
        return lc.Call(
            model=lc.model_name(request.model),
            messages=lc.openai_messages(messages),
            tools=lc.openai_tools(request.tools),
            max_tokens=lc.requested_max_tokens(request.model, request.model_settings),
            scopes=scopes,
        )

    def _apply(
        self, request: ModelRequest[Any], call: lc.Call, decision: Decision
    ) -> ModelRequest[Any]:
        model = request.model
        if decision.model != call.model:
            model = self._model_for(decision.model)
        if model is request.model and decision.max_tokens == call.max_tokens:
            return request
        settings = dict(request.model_settings)
        if decision.max_tokens is not None:
            for key in lc.OUTPUT_CAP_KEYS:  # one cap, under the key this model takes
                settings.pop(key, None)
            settings[lc.max_tokens_key(model)] = decision.max_tokens
        return request.override(model=model, model_settings=settings)

    def _model_for(self, name: str) -> BaseChatModel:
        with self._models_lock:
            model = self.models.get(name)
            if model is None:
                from langchain.chat_models import init_chat_model

                model = self.models[name] = init_chat_model(name)
            return model

    def _exhausted(self, err: BudgetRefused) -> ExtendedModelResponse[Any]:
        if self.on_exhausted == "raise":
            raise _lc_error(err) from None
        message = AIMessage(
            content=f"I have to stop here: {err}",
            response_metadata={"finish_reason": "budget_exhausted", "tb_plugins": err.to_dict()},
        )
        return ExtendedModelResponse(
            model_response=ModelResponse(result=[message]),
            command=Command(update={"jump_to": "end"}),
        )


# -- chain downgrade ---------------------------------------------------------------------------


class BudgetDowngrade(Runnable[LanguageModelInput, BaseMessage]):
    """A chat model step that runs ``model`` or ``cheaper_model`` as the guard decides.

    Built by :func:`with_budget_downgrade`; see there.
    """

    def __init__(
        self,
        model: Runnable[LanguageModelInput, BaseMessage],
        cheaper_model: Runnable[LanguageModelInput, BaseMessage],
        guard: BudgetGuard,
        scopes: Iterable[str] = (),
    ) -> None:
        self.model = model
        self.cheaper_model = cheaper_model
        self.guard = guard
        self.scopes = tuple(scopes)
        self.name = "BudgetDowngrade"

    def _plan(
        self, input: LanguageModelInput, config: RunnableConfig
    ) -> tuple[lc.Call, list[BaseMessage]]:
        base, settings = lc.unwrap_chat_model(self.model)
        messages = base._convert_input(input).to_messages()
        call = lc.Call(
            model=lc.model_name(base),
            messages=lc.openai_messages(messages),
            tools=lc.openai_tools(settings.get("tools")),
            max_tokens=lc.requested_max_tokens(base, settings),
            scopes=[*self.scopes, *lc.metadata_scopes(config.get("metadata"))],
        )
        return call, messages

    def _choose(
        self, call: lc.Call, decision: Decision
    ) -> Runnable[LanguageModelInput, BaseMessage]:
        chosen = self.model if decision.model == call.model else self.cheaper_model
        if decision.max_tokens is not None and (
            decision.max_tokens != call.max_tokens or chosen is not self.model
        ):
            key = lc.max_tokens_key(lc.unwrap_chat_model(chosen)[0])
            chosen = chosen.bind(**{key: decision.max_tokens})
        return chosen

    def _check(self, call: lc.Call) -> Decision:
        try:
            return self.guard.check(**call.check_kwargs())
        except BudgetRefused as err:
            raise _lc_error(err) from None

    async def _acheck(self, call: lc.Call) -> Decision:
        try:
            return await self.guard.acheck(**call.check_kwargs())
        except BudgetRefused as err:
            raise _lc_error(err) from None

    def invoke(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> BaseMessage:
        """Check, run the model the decision names, settle."""
        config = ensure_config(config)
        call, messages = self._plan(input, config)
        decision = self._check(call)
        token = _GUARDED.set(True)
        try:
            out = self._choose(call, decision).invoke(messages, config, **kwargs)
        except BaseException as exc:
            lc.finish(self.guard, decision, lc.failure_cost(exc, decision.model))
            raise
        finally:
            _GUARDED.reset(token)
        lc.finish(self.guard, decision, lc.usage_from_message(out, decision.model))
        return out

    async def ainvoke(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> BaseMessage:
        """Async :meth:`invoke`."""
        config = ensure_config(config)
        call, messages = self._plan(input, config)
        decision = await self._acheck(call)
        token = _GUARDED.set(True)
        try:
            out = await self._choose(call, decision).ainvoke(messages, config, **kwargs)
        except BaseException as exc:
            await lc.afinish(self.guard, decision, lc.failure_cost(exc, decision.model))
            raise
        finally:
            _GUARDED.reset(token)
        await lc.afinish(self.guard, decision, lc.usage_from_message(out, decision.model))
        return out

    def stream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[BaseMessage]:
        """Stream from the model the decision names; settle when the stream ends (its
        estimate if it reports no usage or is abandoned)."""
        config = ensure_config(config)
        call, messages = self._plan(input, config)
        decision = self._check(call)
        merged: BaseMessageChunk | None = None
        chunks = self._choose(call, decision).stream(messages, config, **kwargs)
        try:
            while True:
                # LangChain may resume this generator in another context: set the flag
                # around each step, never across a yield.
                token = _GUARDED.set(True)
                try:
                    chunk = next(chunks)
                except StopIteration:
                    break
                finally:
                    _GUARDED.reset(token)
                merged = lc.merge_chunk(merged, chunk)
                yield chunk
        except BaseException as exc:
            getattr(chunks, "close", lambda: None)()
            lc.finish(self.guard, decision, lc.failure_cost(exc, decision.model, partial=merged))
            raise
        lc.finish(self.guard, decision, lc.usage_from_message(merged, decision.model))

    async def astream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[BaseMessage]:
        """Async :meth:`stream`."""
        config = ensure_config(config)
        call, messages = self._plan(input, config)
        decision = await self._acheck(call)
        merged: BaseMessageChunk | None = None
        chunks = self._choose(call, decision).astream(messages, config, **kwargs)
        try:
            while True:
                token = _GUARDED.set(True)
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                finally:
                    _GUARDED.reset(token)
                merged = lc.merge_chunk(merged, chunk)
                yield chunk
        except BaseException as exc:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
            cost = lc.failure_cost(exc, decision.model, partial=merged)
            await lc.afinish(self.guard, decision, cost)
            raise
        await lc.afinish(self.guard, decision, lc.usage_from_message(merged, decision.model))


def with_budget_downgrade(
    model: Runnable[LanguageModelInput, BaseMessage],
    cheaper_model: Runnable[LanguageModelInput, BaseMessage],
    guard: BudgetGuard,
    scopes: Iterable[str] = (),
) -> Runnable[LanguageModelInput, BaseMessage]:
    """A chat model step for plain chains that switches to ``cheaper_model`` when the guard
    downgrades (``downgrade_at``, or only the cheaper model fits) and lowers ``max_tokens`` when
    it clamps. Refusals raise :class:`BudgetRefusedError`.

    The policy's ``downgrade:`` table decides *when*; ``cheaper_model`` is what runs then. The
    scope path is ``scopes`` + scopes from run metadata (``team``, ``user_id``, ``tb_scopes``);
    a :class:`TokenBudgetCallbackHandler` on the same chain stands aside for these calls.

    Example:
        >>> from langchain_core.prompts import ChatPromptTemplate
        >>> from tb_plugins import BudgetGuard
        >>> from tb_plugins.testing.fake_chat_model import FakeChatModel
        >>> guard = BudgetGuard.from_dict({"ledger": "memory://", "alerts": [],
        ...     "downgrade": {"gpt-4o": "gpt-4o-mini"},
        ...     "budgets": [{"scope": "team:a", "tokens": 100, "window": "day",
        ...                  "downgrade_at": 0.01}]})
        >>> big, small = FakeChatModel(model="gpt-4o"), FakeChatModel(model="gpt-4o-mini")
        >>> chain = ChatPromptTemplate.from_template("Say {x}") | with_budget_downgrade(
        ...     big.bind(max_tokens=20), small, guard, scopes=["team:a"])
        >>> [chain.invoke({"x": "hi"}).response_metadata["model_name"] for _ in range(2)]
        ['gpt-4o', 'gpt-4o-mini']
    """
    return BudgetDowngrade(model, cheaper_model, guard, scopes)
