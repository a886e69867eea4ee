"""Replay: the recorded calls of a usage log run through another policy, in memory.

:class:`Replay` takes usage records oldest first (:func:`iter_records
<tb_plugins.engine.usage_log.iter_records>` pages them out of a ledger) and decides each one
as a guard running the other policy would have, with the rules of
:func:`~tb_plugins.core.ladder.decide` and the lines of
:class:`~tb_plugins.engine.planning.LinePlanner` (windows, patterns and scope paths as
recorded), keeping each line's spend in a dict. Nothing is written anywhere.

What a recorded call asks for and spends:

* **asked** — the model the caller asked for (``requested_model``), and its estimate: for a
  call recorded in shadow mode, the input counted at the time and the request's ``max_tokens``
  (the new policy's ``default_output_tokens`` when it set none), exactly as a guard would
  hold; for any other call, the input and output it used (a guard holds ``max_tokens``, often
  more, so a replay is a little lenient on calls near a limit).
* **spent** — as recorded, tokens and dollars; a clamp cuts the output to the new cap (the
  dollars by the model's output price), a downgrade prices the same tokens at the cheaper
  model, a deny spends nothing. What the replay charges is what the next calls see.

Every budget of the new policy is enforced, ``mode: shadow`` or not (a replay asks what
enforcing them would have done), per-request caps included; runtime overrides in the ledger
are not applied. Refusals in the log (``action: deny``) did not run and have no usage to
replay: they are counted, not replayed. A call spends in the windows of its admission time
(``ts``), rolling windows too.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from tb_plugins.core.ladder import Verdict, decide
from tb_plugins.core.lines import Line, LineState
from tb_plugins.core.policy import LinePlan, Plan
from tb_plugins.core.usage import NANO, UNITS, USD, ZERO, UsageRecord
from tb_plugins.engine.estimate import Estimator
from tb_plugins.engine.planning import LinePlanner
from tb_plugins.engine.replay_lines import (
    LineCounter,
    PathLine,
    WindowSlot,
    charge,
    downgrade_due,
    fits,
    roll,
)
from tb_plugins.engine.tallies import BudgetTally, ReplayReport
from tb_plugins.engine.usage_log import iter_records
from tb_plugins.errors import UnpricedModel

if TYPE_CHECKING:
    from tb_plugins.config import Policy
    from tb_plugins.core.budgets import Budget
    from tb_plugins.core.pricing import PriceTable

__all__ = ["BudgetTally", "Replay", "ReplayReport", "iter_records", "replay"]

_REQUEST_IN = "request.max_input_tokens"
_REQUEST_OUT = "request.max_output_tokens"
_UNPRICED = "unpriced: deny"
_NOT_PRICED = (0.0, 0.0, False)
_NO_REASONS: list[str] = []  # shared, never changed: decide() copies what it is given
_INF = float("inf")

Price = tuple[float, float, bool]  # nano-dollars per input and output token, priced


class Replay:
    """Feed it records oldest first (:meth:`feed`), then read :meth:`report`.

    Args:
        policy: the policy to replay the calls through.
        prices: a price table (default: LiteLLM's bundled map) under the policy's overrides.

    Example:
        >>> from tb_plugins.config import load_policy_dict
        >>> from tb_plugins.core.usage import UsageRecord
        >>> policy = load_policy_dict({"budgets": [{"scope": "team:a", "limit": "1k tokens/day"}]})
        >>> rows = [UsageRecord(1.8e9 + i, f"r{i}", ("global", "team:a"), "gpt-4o", "gpt-4o",
        ...                     "allow", input_tokens=100, output_tokens=300) for i in range(3)]
        >>> r = replay(policy, rows)
        >>> (r.totals.calls, r.totals.allowed, r.totals.clamped, r.totals.denied)
        (3, 2, 1, 0)
    """

    def __init__(self, policy: Policy, *, prices: PriceTable | None = None) -> None:
        self.policy = policy
        self.estimator = Estimator(policy, None, prices)  # prices only: nothing is counted
        budgets = [dataclasses.replace(b, shadow=False) for b in policy.compiled_budgets()]
        self.planner = LinePlanner(budgets, policy.tz)
        self.totals = BudgetTally("all calls", "*", "*")
        self.records = self.not_replayed = 0
        self.first: float | None = None
        self.last: float | None = None
        self.recorded: collections.Counter[str] = collections.Counter()
        self._tallies: dict[object, BudgetTally] = {}
        self._calls: collections.Counter[tuple[int, ...]] = collections.Counter()
        self._budgets: dict[int, Budget] = {}
        self._counters: dict[str, LineCounter] = {}
        self._windows: dict[str, WindowSlot] = {}
        self._valid = (_INF, -_INF)  # while the time is in this range, no slot moves on
        self._prices: dict[str, Price | UnpricedModel] = {}
        self._cheaper: dict[str, str | None] = {}
        self._paths: dict[tuple[str, ...], tuple[tuple[PathLine, ...], tuple[int, ...]]] = {}
        self._min_out = policy.min_output_tokens
        self._default_out = policy.default_output_tokens
        self._cap_in = policy.request.max_input_tokens
        self._cap_out = policy.request.max_output_tokens

    def feed(self, records: Iterable[UsageRecord]) -> None:
        """Replay ``records``, oldest first.

        Python's cyclic garbage collector is paused meanwhile (and restored after): records
        and the replay's state hold no reference cycles, and a million records read and
        replayed run a third faster without it (``benchmarks/bench_replay.py``).
        """
        one = self._one
        actions: collections.Counter[str] = collections.Counter()
        n = skipped = 0
        last: UsageRecord | None = None
        paused = gc.isenabled()
        gc.disable()
        try:
            for r in records:
                n += 1
                actions[r.action] += 1
                if r.action == "deny":
                    skipped += 1
                    continue
                if last is None and self.first is None:
                    self.first = r.ts
                last = r
                one(r)
        finally:
            if paused:
                gc.enable()
            self.records += n
            self.not_replayed += skipped
            self.recorded.update(actions)
            if last is not None:
                self.last = last.ts

    # -- one call ----------------------------------------------------------------------------

    def _one(self, r: UsageRecord) -> None:  # one loop, unrolled: it runs per record
        ts = r.ts
        entry = self._paths.get(r.scopes) or self._path(r.scopes)
        lines = entry[0]
        self._calls[entry[1]] += 1
        inp = r.input_tokens
        out = r.output_tokens
        asked: int | None = out
        if r.extra:  # recorded in shadow mode: the estimate the guard held
            shadow: Any = r.extra.get("shadow")
            request: Any = shadow.get("request") if type(shadow) is dict else None
            counted = request.get("input_tokens") if type(request) is dict else None
            if type(counted) is int and counted >= 0:
                self.recorded["would_" + str(shadow.get("action"))] += 1
                inp = counted
                given = request.get("max_tokens")
                asked = given if type(given) is int and given >= 0 else None
                out = self._default_out if asked is None else asked
        model = r.requested_model or r.model
        price = self._prices.get(model) or self._price(model)
        verdict: Verdict | None = None
        if type(price) is not tuple:  # an UnpricedModel: unpriced: deny
            verdict = _refused(model, inp, out, _UNPRICED, str(price))
            price = _NOT_PRICED
        reasons: list[str] = _NO_REASONS
        if self._cap_out is not None and out > self._cap_out:
            reasons = [f"max_tokens {out} above the per-request cap {self._cap_out}"]
            out = asked = self._cap_out
        if verdict is None and self._cap_in is not None and inp > self._cap_in:
            why = f"{inp:,} input tokens, above the per-request cap of {self._cap_in:,}"
            verdict = _refused(model, inp, out, _REQUEST_IN, why)
        usd_nano = math.ceil(inp * price[0] + out * price[1] - 1e-9)  # as Plan.usd_nano
        want = (inp + out, inp, out, usd_nano, 1, 1)
        # Move each line to its window now, and see whether the call fits as asked.
        if not self._valid[0] <= ts < self._valid[1]:
            self._move(ts)
        fit = verdict is None and not reasons
        due: tuple[Budget, str] | None = None
        for lo in lines:
            counter = lo.counter
            if counter.parts is not None:
                roll(counter, counter.parts, lo.window.slot)
            elif counter.bucket != lo.window.slot.bucket:  # a new calendar window
                counter.bucket = lo.window.slot.bucket
                counter.sums = [0, 0, 0, 0, 0, 0]
            if fit:
                sums = counter.sums
                for u, limit in lo.checks:
                    if sums[u] + want[u] > limit:
                        fit = False
                        break
                else:
                    if due is None and lo.watch:
                        due = downgrade_due(lo, sums)
        if verdict is None and not (fit and due is None):
            cheaper = self._cheaper.get(model, "")
            if cheaper == "":
                cheaper = self._cheaper[model] = self.estimator.downgrade_model(model)
            if not fit or (cheaper is not None and cheaper != model):  # else: allowed as asked
                plan = Plan(model, inp, out, asked, price[0], price[1], price[2], True)
                verdict = self._step_down(plan, reasons, lines, fit, due)
        if verdict is None:  # allowed as asked: spent as recorded
            used_in, used_out, usd = r.input_tokens, r.output_tokens, r.usd
            if model != r.model:  # the log shows another model (e.g. downgraded): price it
                usd = self._usd(model, used_in, used_out, r)
            charge(lines, used_in, used_out, usd)
        else:
            self._settle(r, verdict, lines)

    def _step_down(
        self,
        plan: Plan,
        reasons: list[str],
        lines: tuple[PathLine, ...],
        fit: bool,
        due: tuple[Budget, str] | None,
    ) -> Verdict | None:
        """The verdict for a call that does not simply fit (None: allow after all), as
        :func:`~tb_plugins.core.ladder.decide` gives it; the two commonest cases are worked out
        here first (a downgrade past ``downgrade_at``; a deny no clamp or cheaper model can
        avoid), and they agree with it (``tests/test_shadow_replay.py``)."""
        try:
            if fit and due is not None:  # fits, past a downgrade_at: the cheaper model?
                cheap = self._cheaper_plan(plan)
                if cheap is None:
                    return None
                if fits(cheap, lines):
                    return Verdict("downgrade", cheap, (), due[0], due[1], None, None)
            elif not reasons:
                denied = self._hopeless(plan, lines)
                if denied is not None:
                    return denied
            return self._decide(plan, reasons, lines)
        except UnpricedModel as err:  # the cheaper model, under unpriced: deny
            return _refused(plan.model, plan.input_tokens, plan.output_tokens, _UNPRICED, str(err))

    def _hopeless(self, plan: Plan, lines: tuple[PathLine, ...]) -> Verdict | None:
        """A deny when a line lacks room even for the least the call needs in a unit no
        clamp and no cheaper model changes (tokens, input or output tokens, requests,
        calls), on the budget :func:`~tb_plugins.core.policy.refusal` names; else None."""
        m = min(plan.output_tokens, self._min_out)
        inp = plan.input_tokens
        usd = math.ceil(inp * plan.input_nano_per_token + m * plan.output_nano_per_token - 1e-9)
        need = (inp + m, inp, m, usd, 1, 1)
        hopeless = False
        worst: tuple[float, int, int] | None = None
        for i, lo in enumerate(lines):
            sums = lo.counter.sums
            for u, limit in lo.checks:
                if sums[u] + need[u] > limit:
                    hopeless = hopeless or u != USD
                    resets = lo.window.slot.resets_at
                    key = (_INF if resets is None else resets, -i, u)
                    if worst is None or key > worst:
                        worst = key
        if not hopeless or worst is None:
            return None
        lo = lines[-worst[1]]
        return Verdict("deny", plan, (), lo.owners[worst[2]], lo.scope, UNITS[worst[2]], None)

    def _decide(self, plan: Plan, reasons: list[str], lines: tuple[PathLine, ...]) -> Verdict:
        """The whole ladder (:func:`~tb_plugins.core.ladder.decide`) on the lines as planned."""
        plans, states = [], []
        for lo in lines:
            slot, t = lo.window.slot, lo.template
            line = Line(
                t.key, lo.scope, t.window, slot.bucket, slot.span, slot.width, t.limits, None
            )
            plans.append(LinePlan(line, t.budgets, t.names, slot.resets_at, False, bool(lo.watch)))
            s = lo.counter.sums
            states.append(LineState(spent=(s[0], s[1], s[2], s[3], s[4], s[5]), held=ZERO))

        def alt() -> tuple[Plan, list[str]]:
            cheap = self._cheaper_plan(plan)
            return (cheap if cheap is not None else plan), list(reasons)

        return decide(plan, reasons, alt, plans, states, self._min_out)

    def _settle(self, r: UsageRecord, verdict: Verdict, lines: tuple[PathLine, ...]) -> None:
        """Tally a call the replayed policy changes, and charge what it would have spent."""
        used_in, used_out = r.input_tokens, r.output_tokens
        inp, out, usd = used_in, used_out, r.usd
        action, run = verdict.action, verdict.plan
        if action == "deny":
            inp = out = 0
            usd = 0.0
        else:
            if run.max_tokens is not None and run.output_tokens < out:
                out = run.output_tokens  # a clamp cuts what the call produced
            if run.model != r.model or out != used_out:  # another model, or fewer tokens
                usd = self._usd(run.model, inp, out, r)
        if action != "allow":
            saved_tokens, saved_usd = used_in + used_out - inp - out, r.usd - usd
            self.totals.count(action, saved_tokens, saved_usd)
            cause = self._cause(verdict)
            if cause is not None:
                cause.count(action, saved_tokens, saved_usd)
        if action != "deny":
            charge(lines, inp, out, usd)

    # -- lines, prices, tallies ------------------------------------------------------------

    def _path(self, path: tuple[str, ...]) -> tuple[tuple[PathLine, ...], tuple[int, ...]]:
        """The lines of a scope path and the budgets they carry (cached: they do not change
        with the time, only their slots do)."""
        out: list[PathLine] = []
        seen: dict[int, None] = {}
        for scope in path:
            for t in self.planner.templates(scope):
                counter = self._counters.get(t.key)
                if counter is None:
                    counter = self._counters[t.key] = LineCounter(t.window.startswith("rolling:"))
                checks = tuple((u, lim) for u, lim in enumerate(t.limits) if lim is not None)
                watch = tuple(
                    (b, b.downgrade_at, tuple((u, lim) for u, lim in enumerate(b.limits)
                                              if lim is not None))
                    for b in t.budgets
                    if b.downgrade_at is not None
                )  # fmt: skip
                owners = tuple(
                    next((b for b in t.budgets if b.name == name), None) for name in t.names
                )
                window = self._windows.get(t.window)
                if window is None:  # a window first seen: every slot is looked up again
                    slot = self.planner.slot(t.budgets[0], 0.0)[0]
                    window = self._windows[t.window] = WindowSlot(t.budgets[0], slot)
                    self._valid = (_INF, -_INF)
                out.append(PathLine(t, scope, window, counter, checks, watch, owners))
                for b in t.budgets:
                    self._budgets.setdefault(b.index, b)
                    seen[b.index] = None
        if len(self._paths) > 65536:
            self._paths.clear()
        entry = self._paths[path] = (tuple(out), tuple(seen))
        return entry

    def _move(self, ts: float) -> None:
        """Every window's slot at ``ts``, and the range of time they all hold for."""
        lo, hi = -_INF, _INF
        for window in self._windows.values():
            slot, start, end = self.planner.slot(window.follows, ts)
            window.slot = slot
            lo, hi = max(lo, start), min(hi, end)
        self._valid = (lo, hi)

    def _price(self, model: str) -> Price | UnpricedModel:
        try:
            price, priced = self.estimator.price(model)
        except UnpricedModel as err:
            known: Price | UnpricedModel = err
        else:
            known = (
                (price.input_per_token * NANO, price.output_per_token * NANO, priced)
                if price is not None
                else _NOT_PRICED
            )
        self._prices[model] = known
        return known

    def _cheaper_plan(self, plan: Plan) -> Plan | None:
        """``plan`` on the cheaper model of its downgrade mapping (None: no mapping).

        Raises:
            UnpricedModel: the cheaper model has no price and the policy says unpriced: deny.
        """
        cheaper = self._cheaper.get(plan.model, "")
        if cheaper == "":
            cheaper = self._cheaper[plan.model] = self.estimator.downgrade_model(plan.model)
        if cheaper is None or cheaper == plan.model:
            return None
        p = self._prices.get(cheaper) or self._price(cheaper)
        if isinstance(p, UnpricedModel):
            raise p
        return Plan(cheaper, plan.input_tokens, plan.output_tokens, plan.max_tokens,
                    p[0], p[1], p[2], True)  # fmt: skip

    def _usd(self, model: str, inp: int, out: int, r: UsageRecord) -> float:
        """Dollars of ``inp`` + ``out`` tokens on ``model``; unpriced: the recorded dollars
        in proportion to the tokens."""
        usd = self.estimator.pricing.cost(model, inp, out, min(r.cached_input_tokens, inp))
        if usd is not None:
            return usd
        used = r.input_tokens + r.output_tokens
        return r.usd * (inp + out) / used if used else 0.0

    def _tally(self, key: object, budget: str, scope: str, window: str) -> BudgetTally:
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = BudgetTally(budget, scope, window)
        return tally

    def _cause(self, verdict: Verdict) -> BudgetTally | None:
        """The tally of what caused a verdict: a budget, a request cap, the unpriced rule."""
        b = verdict.budget
        if b is not None:
            return self._tally(b.index, b.name, b.pattern, b.window.spec)
        name = verdict.scope if verdict.scope in (_REQUEST_IN, _UNPRICED) else None
        if name is None and verdict.reasons and "per-request cap" in verdict.reasons[0]:
            name = _REQUEST_OUT
        if name is None:
            return None
        tally = self._tally(name, name, "request", "-")
        tally.calls += 1
        return tally

    def report(self) -> ReplayReport:
        """What the replay found so far."""
        per_budget: collections.Counter[int] = collections.Counter()
        for key, n in self._calls.items():  # the calls of each budget, from those of paths
            for index in key:
                per_budget[index] += n
        for index, n in per_budget.items():
            b = self._budgets[index]
            self._tally(index, b.name, b.pattern, b.window.spec).calls = n
        order = sorted(
            self._tallies.items(), key=lambda kv: (isinstance(kv[0], str), str(kv[0]).zfill(9))
        )
        replayed = sum(self._calls.values())
        return ReplayReport(
            records=self.records,
            replayed=replayed,
            not_replayed=self.not_replayed,
            since=self.first,
            until=self.last,
            totals=dataclasses.replace(self.totals, calls=replayed),
            budgets=[t for _, t in order],
            recorded={k: self.recorded[k] for k in sorted(self.recorded, key=_recorded_order)},
        )


def _refused(model: str, inp: int, out: int, what: str, why: str) -> Verdict:
    plan = Plan(model, inp, out, out, 0.0, 0.0, False, True)
    return Verdict("deny", plan, (why,), None, what, None, None)


def _recorded_order(key: str) -> tuple[bool, int, str]:
    """Decisions first, then shadow verdicts, each in ladder order."""
    would = key.startswith("would_")
    action = key[6:] if would else key
    order = ("allow", "clamp", "downgrade", "deny")
    return would, order.index(action) if action in order else len(order), key


def replay(
    policy: Policy, records: Iterable[UsageRecord], *, prices: PriceTable | None = None
) -> ReplayReport:
    """Replay ``records`` (oldest first) through ``policy``; see :class:`Replay`."""
    r = Replay(policy, prices=prices)
    r.feed(records)
    return r.report()
