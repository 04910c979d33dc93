"""The pack's switches in ComfyUI's environment (NEWBIE_*, for comparisons or a system where a feature misbehaves):
one vocabulary for on and off, case and surrounding blanks ignored."""
from __future__ import annotations

import os

ON = frozenset({"1", "on", "true", "yes"})
OFF = frozenset({"0", "off", "false", "no"})


def value(name: str, default: str = "") -> str:
    """The variable's value, stripped and lower-cased; `default` where it is unset."""
    return os.environ.get(name, default).strip().lower()


def switch(name: str, default: bool) -> bool:
    """True for an ON value, False for an OFF one, `default` when unset or anything else."""
    v = value(name)
    return True if v in ON else False if v in OFF else default
