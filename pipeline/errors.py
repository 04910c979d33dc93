"""Errors the pack raises for bad input: each names the file or spot and what was expected."""


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
