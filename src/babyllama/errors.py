"""The one exception type for user mistakes.

Anything a user can cause (a missing file, a malformed JSON line, an impossible config) raises
`UserError` with a one-line message that names the file, the line and the problem. The CLI
prints that line and exits with status 2 instead of showing a traceback; programming errors
keep their tracebacks.
"""


class UserError(Exception):
    """A mistake in the user's input: printed as one line by the CLI, never as a traceback."""


def where(path, line: int | None = None) -> str:
    """`file:line` prefix for error messages (line is 1-based)."""
    return f"{path}:{line}" if line is not None else f"{path}"
