"""``tb demo``: every part of tb_plugins working end to end, offline, in seconds.

It starts a fake OpenAI-compatible server on 127.0.0.1, writes a policy whose ledger is an
embedded SQLite file, and drives real LiteLLM calls (``litellm.acompletion`` with
:class:`~tb_plugins.integrations.litellm.TokenBudgetLogger`) and a real LangChain agent
(``create_agent`` with tools, :class:`~tb_plugins.integrations.langchain.TokenBudgetMiddleware`)
through one team budget: allow → threshold alert → downgrade → clamp → deny, then a looping
agent cut off by its per-run ``calls`` limit. It ends with the status table and the report, and
checks that the ledger holds exactly the usage the server reported.

Needs the ``[langchain]`` and ``[litellm]`` extras and ``langchain-openai`` (all in ``[all]``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tb_plugins._format import fmt_amount, hanging, table

__all__ = ["DemoReport", "run_demo"]

POLICY = """\
# The demo's policy: one small team budget that the calls walk through every step.
ledger: sqlite:///{ledger}
timezone: UTC
default_output_tokens: 256
min_output_tokens: 16
downgrade:
  gpt-4o: gpt-4o-mini
alerts: []
budgets:
  - scope: team:demo
    tokens: {team_tokens}
    window: day
    alerts: [0.5, 0.8, 1.0]
    downgrade_at: 0.6
  - scope: team:loops
    tokens: 100k
    window: day
  - scope: run:*
    calls: 3
    window: total
"""
TEAM_TOKENS = 450
QUESTION = "In two sentences: why put token budgets on LLM calls?"


@dataclass
class DemoReport:
    """What the demo saw, for ``--json`` and for tests."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    ledger_tokens: int = 0
    server_tokens: int = 0
    status: list[dict[str, Any]] = field(default_factory=list)
    report: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    workdir: str = ""

    @property
    def decisions(self) -> dict[str, int]:
        """How many times each decision kind happened."""
        out: dict[str, int] = {}
        for s in self.steps:
            out[s["decision"]] = out.get(s["decision"], 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        """The JSON summary."""
        return {
            "decisions": self.decisions,
            "steps": self.steps,
            "alerts": self.alerts,
            "ledger_tokens": self.ledger_tokens,
            "server_tokens": self.server_tokens,
            "ledger_matches_server": self.ledger_tokens == self.server_tokens,
            "status": self.status,
            "report": self.report,
            "seconds": round(self.seconds, 2),
            "workdir": self.workdir,
        }


class _Narrator:
    """Prints the story as it happens (rich when available), or stays quiet for --json."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.console: Any = None
        self.width = shutil.get_terminal_size((120, 24)).columns
        if not quiet:
            with contextlib.suppress(ImportError):
                from rich.console import Console

                self.console = Console(highlight=False, width=self.width)

    def say(self, text: str, style: str = "") -> None:
        if self.quiet:
            return
        if self.console is not None:
            self.console.print(text, style=style or None)
        else:
            print(text)

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        if self.quiet:
            yield
            return
        if self.console is not None:
            self.console.rule(f"[bold]{title}")
            with self.console.status(title, spinner="dots"):
                yield
        else:
            print(f"\n== {title}")
            yield


_STYLE = {
    "allow": "green",
    "clamp": "yellow",
    "downgrade": "cyan",
    "deny": "bold red",
    "cutoff": "bold magenta",
}


def step_line(
    decision: str, model: str | None, max_tokens: int | None, note: str, width: int
) -> str:
    """One step as the demo prints it: the decision, the model that served the call with its
    ``max_tokens``, and the note wrapped under itself to ``width`` columns, never cut.

    ``model`` is None for a call that reached no model (refused, or cut off): it shows ``-``,
    not the model the call asked for.

    Example:
        >>> step_line("deny", None, None, "budget 'team:a 5 tokens/day' is spent", 80)
        "  → deny      -                                budget 'team:a 5 tokens/day' is spent"
    """
    shown = "-" if model is None else model + (f", max_tokens={max_tokens}" if max_tokens else "")
    return hanging(f"  → {decision:<9} {shown:<32} ", note, width)


def run_demo(workdir: str | Path | None = None, *, quiet: bool = False) -> DemoReport:
    """Run the demo; returns what happened. ``workdir`` keeps the policy and ledger."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    start = time.perf_counter()
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="tb-demo-")
        workdir = tmp.name
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = asyncio.run(_demo(work, _Narrator(quiet)))
    finally:
        if tmp is not None:
            tmp.cleanup()
    report.seconds = time.perf_counter() - start
    report.workdir = "" if tmp is not None else str(work)
    return report


async def _demo(work: Path, out: _Narrator) -> DemoReport:
    from tb_plugins.engine import BudgetGuard
    from tb_plugins.testing.fake_openai import FakeOpenAI

    ledger = work / "tb_demo.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{ledger}{suffix}").unlink(missing_ok=True)
    policy_path = work / "budgets.yaml"
    policy_path.write_text(POLICY.format(ledger=ledger, team_tokens=TEAM_TOKENS))
    report = DemoReport()

    with out.step("Starting a fake OpenAI server on 127.0.0.1 and loading the frameworks"):
        server = FakeOpenAI().start()
        guard = BudgetGuard.from_config(policy_path)
        import litellm

        from tb_plugins.integrations.litellm import TokenBudgetLogger

        litellm.suppress_debug_info = True
        logger = TokenBudgetLogger(guard, scopes=["team:demo"])
        litellm.callbacks = [logger]
    out.say(f"policy: {policy_path}   ledger: sqlite:///{ledger}   upstream: {server.url}")
    out.say(
        f"team:demo may spend {TEAM_TOKENS:,} tokens a day; alerts at 50/80/100 %, "
        f"downgrade gpt-4o → gpt-4o-mini past 60 %; every run may make 3 model calls."
    )

    def on_event(kind: str, data: Any) -> None:
        if kind == "alert":
            a = data["alert"]
            report.alerts.append(a.to_dict())
            out.say(hanging("  ⚠ alert: ", a.message, out.width), "bold yellow")

    guard.listeners.append(on_event)

    def record(
        step: str, via: str, decision: str, model: str | None, max_tokens: int | None, note: str
    ) -> None:
        report.steps.append(
            {
                "step": step,
                "via": via,
                "decision": decision,
                "model": model,
                "max_tokens": max_tokens,
                "note": note,
            }
        )
        out.say(step_line(decision, model, max_tokens, note, out.width), _STYLE.get(decision, ""))

    async def litellm_call(step: str, max_tokens: int, model: str = "gpt-4o") -> None:
        from tb_plugins.errors import BudgetRefused

        seen: dict[str, Any] = {}
        guard.listeners.append(
            lambda k, d: seen.setdefault("d", d["decision"]) if k == "decision" else None
        )
        try:
            await litellm.acompletion(
                model=f"openai/{model}",
                api_base=server.base_url,
                api_key="sk-demo",
                messages=[{"role": "user", "content": QUESTION}],
                max_tokens=max_tokens,
                metadata={"tb_scopes": ["user:ann", "feature:faq"]},
            )
            await _drained(logger)
            d = seen["d"]
            served = server.requests[-1]
            note = f"served by {served.model}; " + ("; ".join(d.reasons) or "fits the budget")
            record(step, "litellm", d.action, served.model, served.max_tokens, note)
        except BudgetRefused as exc:
            record(step, "litellm", "deny", None, None, str(exc))
        finally:
            guard.listeners.pop()

    with out.step("1. LiteLLM: a call that fits is allowed"):
        await litellm_call("allow", 200)

    with out.step("2. LangChain: an agent with a tool, under the same team budget"):
        await _agent_run(guard, server, report, record, team="team:demo", loop=False)

    with out.step("3. LiteLLM: past 60 % of the team budget, calls switch to the cheaper model"):
        await litellm_call("downgrade", 100)

    with out.step("4. LiteLLM: near the limit, max_tokens is clamped to what is left"):
        await litellm_call("clamp", 600, model="gpt-4o-mini")

    with out.step("5. LiteLLM and LangChain: the budget is spent, calls are refused"):
        await litellm_call("deny", 200)
        await _agent_run(
            guard, server, report, record, team="team:demo", loop=False, with_tool=False
        )

    with out.step("6. LangChain: a runaway agent loop is cut off at 3 calls per run"):
        # the model asks for the tool again and again; the run's calls budget ends the loop
        server.script(tool_calls=[{"name": "lookup", "arguments": {"topic": "more"}}], times=3)
        await _agent_run(guard, server, report, record, team="team:loops", loop=True)

    await _drained(logger)
    rows = guard.usage(group_by="scope")
    report.ledger_tokens = next((r.tokens for r in rows if r.key == "global"), 0)
    report.server_tokens = sum(s.prompt_tokens + s.completion_tokens for s in server.requests)
    report.status = [s.to_dict() for s in guard.status()]
    report.report = [
        {
            "scope": r.key,
            "requests": r.requests,
            "denied": r.denied,
            "tokens": r.tokens,
            "usd": r.usd,
        }
        for r in rows
    ]
    _final_tables(out, guard, report, policy_path)
    litellm.callbacks = []
    server.stop()
    guard.close()
    return report


async def _drained(logger: Any, timeout: float = 10.0) -> None:
    """Wait until LiteLLM's background success/failure callbacks settled every hold."""
    deadline = time.monotonic() + timeout
    while logger.holds and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


async def _agent_run(
    guard: Any,
    server: Any,
    report: DemoReport,
    record: Any,
    *,
    team: str,
    loop: bool,
    with_tool: bool = True,
) -> None:
    from langchain.agents import create_agent
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    from tb_plugins.integrations.langchain import TokenBudgetMiddleware

    @tool
    def lookup(topic: str) -> str:
        """Look a topic up in the team wiki."""
        return f"The wiki says {topic} are agreed per team, per day, in tokens and dollars."

    def chat(model: str) -> ChatOpenAI:
        settings: dict[str, Any] = {"max_tokens": 120, "max_retries": 0, "api_key": "sk-demo"}
        return ChatOpenAI(model=model, base_url=server.base_url, **settings)

    middleware = TokenBudgetMiddleware(
        guard, scopes=[team, "user:bea"], models={"gpt-4o-mini": chat("gpt-4o-mini")}
    )
    agent = create_agent(
        chat("gpt-4o"),
        tools=[lookup],
        middleware=[middleware],
        name="looper" if loop else "researcher",
    )
    if with_tool and not loop:
        server.script(tool_calls=[{"name": "lookup", "arguments": {"topic": "budgets"}}])
    events: list[tuple[str, Any]] = []

    def listen(kind: str, data: Any) -> None:
        if kind == "decision":
            events.append((kind, data["decision"]))
        elif kind == "deny":
            events.append((kind, data["error"]))

    guard.listeners.append(listen)
    before = len(server.requests)
    try:
        state: Any = {"messages": [("user", QUESTION)]}
        result = await agent.ainvoke(state)
    finally:
        guard.listeners.remove(listen)
    from tb_plugins.errors import LoopLimitExceeded

    served = iter(server.requests[before:])
    last = str(result["messages"][-1].content)
    for kind, data in events:
        if kind == "decision":
            s = next(served, None)  # None: the call never reached the model
            note = "agent step; " + ("; ".join(data.reasons) or "fits the budget")
            record(
                "agent",
                "langchain",
                data.action,
                s.model if s else None,
                s.max_tokens if s else None,
                note,
            )
        else:
            k = "cutoff" if isinstance(data, LoopLimitExceeded) else "deny"
            record(k, "langchain", k, None, None, f"the agent ended with: {last}")


def _final_tables(out: _Narrator, guard: Any, report: DemoReport, policy_path: Path) -> None:
    if out.quiet:
        return

    def short(scope: str) -> str:
        return scope[:14] + "…" if scope.startswith("run:") else scope

    out.say("")
    out.say("Status (tb status):", "bold")
    print(
        table(
            ["scope", "budget", "unit", "spent", "held", "limit", "used"],
            [
                [
                    short(s["scope"]),
                    s["budget"],
                    s["unit"],
                    fmt_amount(s["unit"], s["spent"]),
                    fmt_amount(s["unit"], s["reserved"]),
                    fmt_amount(s["unit"], s["limit"]),
                    f"{s['utilization']:.0%}",
                ]
                for s in report.status
            ],
        )
    )
    out.say("")
    out.say("Report (tb report --by scope):", "bold")
    print(
        table(
            ["scope", "requests", "denied", "tokens", "usd"],
            [
                [
                    short(r["scope"]),
                    r["requests"],
                    r["denied"],
                    f"{r['tokens']:,}",
                    f"${r['usd']:.5f}",
                ]
                for r in report.report
            ],
        )
    )
    same = report.ledger_tokens == report.server_tokens
    out.say("")
    out.say(f"decisions: {json.dumps(report.decisions)}; alerts fired: {len(report.alerts)}")
    out.say(
        f"ledger spend {report.ledger_tokens:,} tokens "
        f"{'==' if same else '!='} usage the server reported {report.server_tokens:,} tokens",
        "bold green" if same else "bold red",
    )
