"""The recovery ladder: call; after each out-of-memory error apply the next rung and call again. Pure logic:
the attempt and the rungs are callables handed in (guard.py builds them)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .memory import is_oom
from .report import first_line

log = logging.getLogger(__name__)


@dataclass
class Rung:
    name: str                   # what kind of rung ("empty_cache", "split", ...)
    apply: Callable[[], str]    # does it; returns what it did, for the log and the report


@dataclass
class Recovered:
    value: Any
    retries: int
    actions: list


class LadderExhausted(Exception):
    def __init__(self, actions: list, last_error: str):
        super().__init__(last_error)
        self.actions = actions
        self.last_error = last_error


def call_with_recovery(attempt: Callable[[int], Any], rungs: Callable[[], Sequence[Rung]], max_retries: int,
                       where: object = "call") -> Recovered:
    """Calls attempt(0); after each out-of-memory error applies the next rung and calls attempt(k) again, at
    most `max_retries` times. Errors other than out-of-memory go straight through. The rung runs after the
    `except` block has ended, so the failed attempt's tensors (held by the traceback) can be freed."""
    ladder: Sequence[Rung] | None = None
    actions: list[str] = []
    retry = 0
    while True:
        failure = None
        try:
            value = attempt(retry)
        except Exception as e:  # noqa: BLE001 - filtered by is_oom; everything else re-raised as is
            if not is_oom(e):
                raise
            failure = str(e)
        if failure is None:
            return Recovered(value, retry, actions)
        if ladder is None:
            ladder = list(rungs())
        if retry >= max_retries or retry >= len(ladder):
            raise LadderExhausted(actions, failure)
        log.warning("NewBie OOM guard: %s ran out of memory (attempt %d): %s", where, retry + 1, first_line(failure))
        done = ladder[retry].apply()
        actions.append(done)
        log.warning("NewBie OOM guard: %s: %s; retrying", where, done)
        retry += 1
