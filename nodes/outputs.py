"""Outputs a node cannot produce this run (an optional input left empty): fail clearly, never hand on None.

A node that hands `None` to the graph makes the next node fail with an error about its own internals. Instead:
when the prompt itself connects such an output, the node fails at once, naming the consumer and the fix; the
output is otherwise an ExecutionBlocker carrying the same message, so a consumer that arrives later (through
ComfyUI's cache of this node's result) is stopped with it too.
"""
from __future__ import annotations

from comfy_execution.graph_utils import ExecutionBlocker

from ..pipeline.errors import NewBieError


def consumers(prompt: dict | None, node_id: str | None, outputs: set[int]) -> list[str]:
    """'<id> (<class>)' of each node in the API-format `prompt` that takes one of `outputs` of `node_id`."""
    found = []
    for other_id, node in (prompt or {}).items():
        for value in (node.get("inputs") or {}).values() if isinstance(node, dict) else ():
            if (isinstance(value, list) and len(value) == 2 and str(value[0]) == str(node_id)
                    and value[1] in outputs):
                found.append(f"{other_id} ({node.get('class_type', '?')})")
                break
    return found


def unavailable(prompt: dict | None, node_id: str | None, outputs: dict[int, str], message: str) -> list:
    """One value per entry of `outputs` ({index: output name}): raises if the prompt connects any of them,
    else ExecutionBlockers with `message`."""
    used = consumers(prompt, node_id, set(outputs))
    if used:
        names = " and ".join(outputs.values())
        raise NewBieError(f"the {names} output is connected to node {', '.join(used)}, but {message}")
    return [ExecutionBlocker(message) for _ in outputs]
