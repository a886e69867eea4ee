"""``tb watch``: the ``tb status`` table, redrawn in place every few seconds until Ctrl-C.

On a terminal each frame moves the cursor home, rewrites every line, clears what is left of
the last frame and hides the cursor meanwhile: plain ANSI escapes, no curses. Frames that do
not fit the terminal's height are cut with a line saying how many lines were left out. Not
on a terminal (piped to a file), the frames are printed one after another, without escapes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from tb_plugins._format import redact_url, wrap
from tb_plugins.cli.common import config_option, open_guard
from tb_plugins.cli.status import STATUS_WIDTH, render_status
from tb_plugins.core.scopes import escape_text
from tb_plugins.errors import LedgerError

if TYPE_CHECKING:
    from tb_plugins.engine import BudgetGuard

HOME = "\x1b[H"
"""Move the cursor to the top left corner."""
CLEAR_LINE = "\x1b[K"
"""Clear from the cursor to the end of the line."""
CLEAR_BELOW = "\x1b[J"
"""Clear from the cursor to the end of the screen."""
CLEAR_SCREEN = "\x1b[2J"
HIDE_CURSOR = "\x1b[?25l"
SHOW_CURSOR = "\x1b[?25h"


def cmd_watch(args: argparse.Namespace) -> int:
    """Show the ``tb status`` table and redraw it in place every ``--interval`` seconds
    (default 2), until Ctrl-C, or ``--count`` frames. Each frame fits 80 columns; a ledger
    that cannot be read shows its error in the frame, and the next frame tries again."""
    if not args.interval > 0:
        raise ValueError(f"--interval must be a positive number of seconds, not {args.interval}")
    if args.count is not None and args.count < 1:
        raise ValueError(f"--count must be at least 1, not {args.count}")
    guard = open_guard(args)
    out = sys.stdout
    live = out.isatty()
    if live:
        out.write(HIDE_CURSOR + CLEAR_SCREEN)
    frames = 0
    try:
        while True:
            text = frame(guard, args.scope, args.interval)
            frames += 1
            out.write(_in_place(text) if live else text + "\n\n")
            out.flush()
            if args.count is not None and frames >= args.count:
                break
            time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    finally:
        if live:
            out.write(SHOW_CURSOR)
            out.flush()
        guard.ledger.close()
    return 0


def frame(guard: BudgetGuard, scope: str | None, interval: float) -> str:
    """One frame: a title (the time, the interval, the ledger) and the ``tb status`` table,
    or the error the ledger gave instead of the table."""
    try:
        now = guard.now()
        body = render_status(guard.status(scope), now)
    except LedgerError as exc:
        now = time.time()
        text = escape_text(f"tb: {exc}")
        body = "\n".join(line[:STATUS_WIDTH] for line in wrap(text, STATUS_WIDTH))
    clock = datetime.fromtimestamp(now, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    title = f"tb watch  {clock}  every {interval:g}s  Ctrl-C to stop"
    where = f"ledger {escape_text(redact_url(guard.ledger.url))}"
    if len(where) > STATUS_WIDTH:  # keep the scheme and the end (a file's name)
        where = where[: STATUS_WIDTH // 2] + "..." + where[3 - STATUS_WIDTH // 2 :]
    return f"{title}\n{where}\n\n{body}"


def _in_place(text: str) -> str:
    """``text`` as a frame drawn over the last one: from the top left, each line cleared to
    its end, the rest of the screen cleared, and cut to the terminal's height."""
    height = shutil.get_terminal_size((STATUS_WIDTH, 24)).lines
    lines = text.split("\n")
    if len(lines) > height - 1 > 1:
        cut = len(lines) - (height - 2)
        lines = [*lines[: height - 2], f"... {cut} more lines (narrow it with --scope)"]
    return HOME + "".join(line + CLEAR_LINE + "\n" for line in lines) + CLEAR_BELOW


def add_parser(sub: Any) -> None:
    """Register ``tb watch``."""
    p = sub.add_parser(
        "watch", help="the status table, redrawn live until Ctrl-C", description=cmd_watch.__doc__
    )
    p.add_argument(
        "--interval",
        type=float,
        default=2.0,
        metavar="S",
        help="seconds between redraws (default: 2)",
    )
    p.add_argument("--scope", help="only this scope, e.g. team:search")
    p.add_argument(
        "--count", type=int, metavar="N", help="stop after N frames (default: until Ctrl-C)"
    )
    config_option(p, after_command=True)
    p.set_defaults(func=cmd_watch)
