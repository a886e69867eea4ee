"""The policy file (``budgets.yaml``): who may spend how much, per window.

The file is validated whole; a bad file is refused with a :class:`~tb_plugins.errors.ConfigError`
that names the file, the entry and the field::

    budgets.yaml: budgets[2] (scope 'user:*'): field 'window': unknown window 'fortnight' …

Quantities are readable: ``2_000_000``, ``"2,000,000"``, ``"2M"``, ``"200k"``, ``"$40"``. A comma
only separates thousands (``"1,5M"`` is refused: write ``"1.5M"``). Each budget may also be
written in one line: ``limit: 200k tokens/day`` or ``limit: $5/month``.

Every amount has a maximum, checked here so that a policy that loads can never overflow a
ledger later (see :mod:`tb_plugins.core.usage`):

* ``tokens``, ``input_tokens``, ``output_tokens``, ``requests``, ``calls``: at most
  :data:`~tb_plugins.core.usage.MAX_LIMIT` (10**15).
* ``usd``: finite, at most :data:`~tb_plugins.core.usage.MAX_LIMIT_USD` ($1,000,000,000).
* ``request.max_input_tokens``, ``request.max_output_tokens``, ``default_output_tokens``,
  ``min_output_tokens``: at most :data:`~tb_plugins.core.usage.MAX_CALL_TOKENS` (10**9).
* ``prices:`` and ``unpriced: {use_price: …}``: finite, not negative, at most
  :data:`~tb_plugins.core.usage.MAX_PRICE` ($0.01 per token, $10,000 per million tokens).
* ``window: rolling:<d>``: 1 second to :data:`~tb_plugins.core.windows.MAX_ROLLING` (366 days).
* ``reservation_ttl``: positive, at most :data:`MAX_RESERVATION_TTL` (7 days).
* ``ledger_timeout``: positive, at most :data:`MAX_LEDGER_TIMEOUT` (60 seconds).
* ``alerts``, ``downgrade_at``: fractions in (0, 1] (NaN and infinity refused).

A YAML file is refused whole, before any of that, if it is larger than
:data:`MAX_POLICY_BYTES` (1 MiB), repeats a key in any mapping, nests deeper than
:data:`MAX_YAML_DEPTH` levels, or expands (through anchors and aliases) to more than
:data:`MAX_YAML_NODES` nodes.

Example:
    >>> policy = load_policy_dict({"budgets": [{"scope": "team:search", "limit": "2M tokens/day"}]})
    >>> policy.budgets[0].tokens, policy.budgets[0].window
    (2000000, 'day')
"""

from tb_plugins.config.budgets import BudgetSpec, compile_budget
from tb_plugins.config.fields import (
    MAX_LEDGER_TIMEOUT,
    MAX_OVERRIDE_REFRESH,
    MAX_RESERVATION_TTL,
)
from tb_plugins.config.policy import (
    AlertSinkSpec,
    Policy,
    PriceSpec,
    RequestCaps,
    UsePrice,
    load_policy,
    load_policy_dict,
)
from tb_plugins.core.budgets import Budget
from tb_plugins.core.quantities import parse_quantity, parse_usd
from tb_plugins.core.scopes import KNOWN_KINDS
from tb_plugins.policy_yaml import MAX_POLICY_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES

__all__ = [
    "KNOWN_KINDS",
    "MAX_LEDGER_TIMEOUT",
    "MAX_OVERRIDE_REFRESH",
    "MAX_POLICY_BYTES",
    "MAX_RESERVATION_TTL",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "AlertSinkSpec",
    "Budget",
    "compile_budget",
    "BudgetSpec",
    "Policy",
    "PriceSpec",
    "RequestCaps",
    "UsePrice",
    "load_policy",
    "load_policy_dict",
    "parse_quantity",
    "parse_usd",
]
