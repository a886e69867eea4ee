"""Agent middleware for ``create_agent``: the whole decision ladder on each model call, a
graceful end (an error, or an interrupt) when a budget or the per-run ``calls`` limit is spent,
and the agent limits (``tool_calls``, ``repeats``, ``seconds``) checked before each tool call."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Annotated, Any, Literal

from langchain.agents.middleware import (
    AgentMiddleware,
    AgentState,
    ExtendedModelResponse,
    ModelRequest,
    ModelResponse,
)
from langchain.agents.middleware.types import PrivateStateAttr
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, ToolMessage
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.runtime import Runtime
from langgraph.types import Command, interrupt
from typing_extensions import NotRequired

from tb_plugins.core.request import Request
from tb_plugins.engine import BudgetGuard, Decision
from tb_plugins.errors import BudgetExceeded, BudgetRefused, RunLimitExceeded
from tb_plugins.integrations.langchain import adapters as lc
from tb_plugins.integrations.langchain import interrupts
from tb_plugins.integrations.langchain.errors import _lc_error
from tb_plugins.integrations.langchain.handler import _GUARDED

logger = logging.getLogger("tb_plugins")

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

    With ``on_exhausted="interrupt"``, a budget of the run's own scope (``run:*`` tokens, usd,
    ``calls``...) that is spent pauses the graph with a LangGraph ``interrupt`` naming the
    budget, scope, spent, limit and unit; ``Command(resume={"extend": "5k tokens"})`` raises
    that run's limit by the amount (a runtime override on ``run:<id>``, in ``tb budgets
    history`` with its reason) and the call goes on; any other answer ends the run with the
    final message, as does an extension still too small for the call. Other refusals end the
    run as with ``"end"``. This needs a checkpointer (``create_agent(...,
    checkpointer=InMemorySaver())``); a run without one is refused at its start with a
    ``ValueError``. See :mod:`tb_plugins.integrations.langchain.interrupts`.

    Under ``request: {on_too_long: trim}`` in the policy, a conversation above
    ``request.max_input_tokens`` loses its oldest messages until it fits (system messages, the
    latest user message and tool-call/result pairs are kept together) and the model receives
    the trimmed list (``request.override(messages=...)``); the agent's state keeps them all.

    Each tool call is checked before the tool runs (``wrap_tool_call``) against the policy's
    agent limits: past a ``tool_calls`` budget the tool is not run and the agent gets a
    ``ToolMessage`` (``status="error"``) naming the tool, the limit and the scope, and goes on
    (other tools still run). When a run must end (the same tool with the same arguments
    ``repeats`` times, or past its ``seconds``), the tool is not run, the agent gets a
    ``ToolMessage`` saying why, and its next model call ends the run like an exhausted
    ``calls`` budget (``on_exhausted="raise"`` raises :class:`RunLimitExceededError` at once
    instead). ``seconds`` is also checked before each model call, on the guard's clock.

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
        on_exhausted: ``"end"`` (default), ``"raise"`` or ``"interrupt"``: what an exhausted
            budget or an ended run does (a ``tool_calls`` refusal is always a tool message).

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
        on_exhausted: Literal["end", "raise", "interrupt"] = "end",
    ) -> None:
        super().__init__()
        if on_exhausted not in ("end", "raise", "interrupt"):
            raise ValueError(f"on_exhausted is 'end', 'raise' or 'interrupt', got {on_exhausted!r}")
        self.guard = guard
        self.scopes = tuple(scopes)
        self.models: dict[str, BaseChatModel] = dict(models or {})
        self.on_exhausted = on_exhausted
        self.tools = []
        self._models_lock = threading.Lock()

    def before_agent(self, state: BudgetState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        """Start a run: mint the id charged as ``run:<id>``."""
        if self.on_exhausted == "interrupt":
            interrupts.require_checkpointer()
        return {"tb_run_id": uuid.uuid4().hex}

    async def abefore_agent(
        self, state: BudgetState, runtime: Runtime[Any]
    ) -> dict[str, Any] | None:
        """Async :meth:`before_agent`."""
        return self.before_agent(state, runtime)

    def after_agent(self, state: BudgetState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        """End the run: drop its in-memory agent counters (not for a ``tb_run_id`` from
        metadata, which may span several invocations)."""
        run = state.get("tb_run_id")
        if run and not lc.current_metadata().get("tb_run_id"):
            self.guard.end_run(f"run:{run}")
        return None

    async def aafter_agent(
        self, state: BudgetState, runtime: Runtime[Any]
    ) -> dict[str, Any] | None:
        """Async :meth:`after_agent`."""
        return self.after_agent(state, runtime)

    def wrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], ModelResponse[Any]],
    ) -> ModelResponse[Any] | AIMessage | ExtendedModelResponse[Any]:
        """Check, apply the decision, call, settle."""
        call = self._call(request)
        try:
            decision = self.guard.check_request(call)
        except BudgetRefused as err:
            change = self._extension(err, call)
            if change is None:
                return self._exhausted(err)
            self.guard.set_budget(**change)
            try:
                decision = self.guard.check_request(call)
            except BudgetRefused as again:
                return self._exhausted(again)
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
            decision = await self.guard.acheck_request(call)
        except BudgetRefused as err:
            change = self._extension(err, call)
            if change is None:
                return self._exhausted(err)
            await self.guard.aset_budget(**change)
            try:
                decision = await self.guard.acheck_request(call)
            except BudgetRefused as again:
                return self._exhausted(again)
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

    def wrap_tool_call(
        self,
        request: ToolCallRequest,
        handler: Callable[[ToolCallRequest], ToolMessage | Command[Any]],
    ) -> ToolMessage | Command[Any]:
        """Check the agent limits before the tool runs; a refused tool is answered with a
        ``ToolMessage`` saying why and never runs."""
        refused = self._check_tool(request)
        if refused is not None:
            return refused
        token = _GUARDED.set(True)  # a callback handler on this tool run stands aside
        try:
            return handler(request)
        finally:
            _GUARDED.reset(token)

    async def awrap_tool_call(
        self,
        request: ToolCallRequest,
        handler: Callable[[ToolCallRequest], Awaitable[ToolMessage | Command[Any]]],
    ) -> ToolMessage | Command[Any]:
        """Async :meth:`wrap_tool_call`."""
        refused = self._check_tool(request)
        if refused is not None:
            return refused
        token = _GUARDED.set(True)
        try:
            return await handler(request)
        finally:
            _GUARDED.reset(token)

    # helpers --------------------------------------------------------------------------------

    def _scopes(self, state: Any) -> list[str]:
        metadata = lc.current_metadata()
        scopes = [*self.scopes, *lc.metadata_scopes(metadata)]
        agent = metadata.get("lc_agent_name")
        if agent:
            scopes.append(f"agent:{agent}")
        run = metadata.get("tb_run_id") or (
            state.get("tb_run_id") if isinstance(state, Mapping) else None
        )
        if run:
            scopes.append(f"run:{run}")
        return scopes

    def _check_tool(self, request: ToolCallRequest) -> ToolMessage | None:
        call = request.tool_call
        try:
            self.guard.check_tool(self._scopes(request.state), call["name"], call.get("args"))
        except BudgetRefused as err:
            if self.on_exhausted == "raise" and isinstance(err, RunLimitExceeded):
                raise _lc_error(err) from None
            return ToolMessage(
                content=str(err),
                name=call["name"],
                tool_call_id=call["id"] or "",
                status="error",
                response_metadata={"tb_plugins": err.to_dict()},
            )
        return None

    def _extension(self, err: BudgetRefused, call: Request) -> dict[str, Any] | None:
        """With ``on_exhausted="interrupt"``, ask (interrupt) for an extension of a run's
        spent budget; the ``set_budget`` arguments that apply it, or None (end the run)."""
        run = interrupts.run_scope(call.scopes)
        if self.on_exhausted != "interrupt" or not interrupts.extendable(err, run):
            return None
        assert isinstance(err, BudgetExceeded)
        extra = interrupts.extension(interrupt(interrupts.interrupt_payload(err)), err.unit)
        return None if extra is None else interrupts.extend_change(self.guard, err, extra)

    def _call(self, request: ModelRequest[Any]) -> Request:
        scopes = self._scopes(request.state)
        messages = list(request.messages)
        if request.system_message is not None:
            messages.insert(0, request.system_message)
        sent = lc.openai_messages(messages)
        return Request(
            model=lc.model_name(request.model),
            messages=sent,
            trimmable=len(sent) == len(messages),  # one dict per message: a cut maps back
            tools=lc.openai_tools(request.tools),
            max_tokens=lc.requested_max_tokens(request.model, request.model_settings),
            scopes=tuple(scopes),
            priority=lc.metadata_priority(lc.current_metadata()),
        )

    def _apply(
        self, request: ModelRequest[Any], call: Request, decision: Decision
    ) -> ModelRequest[Any]:
        if decision.kept_messages is not None:  # trimmed to fit request.max_input_tokens
            first = 0 if request.system_message is None else 1
            kept = [request.messages[i - first] for i in decision.kept_messages if i >= first]
            request = request.override(messages=kept)
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
