"""The callback handler: reserve when a model run starts, settle when it ends, refuse by
raising; and :func:`budget_scope`, which registers it for every run started in a block."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage
from langchain_core.outputs import LLMResult
from langchain_core.tracers.context import register_configure_hook

from tb_plugins.core.request import Request
from tb_plugins.engine import BudgetGuard, Decision
from tb_plugins.engine.held import HeldCalls
from tb_plugins.errors import (
    BudgetRefused,
)
from tb_plugins.integrations.langchain import adapters as lc
from tb_plugins.integrations.langchain.errors import _lc_error

logger = logging.getLogger("tb_plugins")

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

    Tool runs are checked in ``on_tool_start`` against the agent limits (``tool_calls``,
    ``repeats``, ``seconds``: see :mod:`tb_plugins.engine.agents`) on the same scope path; a
    refusal raises :class:`ToolLimitExceededError` or :class:`RunLimitExceededError`, so the
    tool never runs (and, as a callback cannot answer for the tool, the run stops with that
    error; :class:`TokenBudgetMiddleware` answers the agent with a tool message instead).

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
        agents = getattr(guard, "agents", None)  # a stand-in guard may have no agent limits
        self._agent_limits = bool(agents is not None and agents.active)

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
            if self._agent_limits:
                self.guard.end_run(f"run:{root}")  # its in-memory agent counters
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
        scopes = self._scopes(root, metadata)
        try:
            request = Request(
                model=lc.invocation_model(params, metadata, serialized),
                messages=lc.openai_messages(messages) if messages is not None else None,
                prompt=prompt,
                max_tokens=lc.invocation_max_tokens(params, metadata),
                tools=lc.openai_tools(params.get("tools")),
                scopes=tuple(scopes),
                reservation_id=run_id.hex,
                adjust=False,
                priority=lc.metadata_priority(metadata),
            )
            decision = self.guard.check_request(request)
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

    def _scopes(self, root: UUID, metadata: dict[str, Any] | None) -> list[str]:
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
        return scopes

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
        """Track the run, and check the agent limits: raises :class:`ToolLimitExceededError`
        or :class:`RunLimitExceededError` so a refused tool never runs."""
        root = self._enter(run_id, parent_run_id, kwargs.get("name"))
        if not self._agent_limits or self._stands_aside():
            return  # no tool is limited, or the middleware checked this tool call
        name = (serialized or {}).get("name") or kwargs.get("name") or "unknown"
        inputs = kwargs.get("inputs")
        try:
            scopes = self._scopes(root, kwargs.get("metadata"))
            self.guard.check_tool(scopes, str(name), input_str if inputs is None else inputs)
        except BudgetRefused as err:
            self._leave(run_id)
            raise _lc_error(err) from None
        except BaseException:
            self._leave(run_id)
            raise

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
