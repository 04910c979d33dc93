"""Errors the pack raises for bad input: each names the file or spot and what was expected."""
import math


class NewBieError(Exception):
    """Base class: a message meant for the ComfyUI user, shown as the prompt's error."""


class ModelFileError(NewBieError):
    """A model file or folder is missing, corrupt, of the wrong kind or of mismatched shapes."""

    def __init__(self, path, problem: str, expected: str | None = None):
        self.path = str(path)
        self.problem = problem
        self.expected = expected
        text = f"{self.path}: {problem}"
        if expected:
            text += f" (expected {expected})"
        super().__init__(text)


def require_finite(value: float, input_name: str, node: str, valid: str) -> float:
    """`value`, or a clear error: JSON sent to /prompt may carry NaN, which passes ComfyUI's min/max checks."""
    if not math.isfinite(value):
        raise NewBieError(f"{node}: {input_name} is {value}, not a number; give {valid}")
    return value
