"""Errors that the CLI maps to exit codes.

`UserError` (exit 2) is for anything the user can fix: a wrong recipe, a missing file, a malformed
data row. Its message is printed as is, without a traceback (unless `--debug`), so it must name the
key or row and say how to fix it.
"""


class UserError(Exception):
    """The user's input is wrong; exit code 2."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or []

    def __str__(self) -> str:
        head = super().__str__()
        if not self.problems:
            return head
        return head + "\n" + "\n".join(f"  {p}" for p in self.problems)


class GateFailed(Exception):
    """The run finished, but the trained model missed a gate of eval.gates; exit code 3.

    summary.json is already written (`status: failed`, `gates.failures`)."""

    def __init__(self, failures: list[str]):
        super().__init__("evaluation gate failed:\n" + "\n".join(f"  {f}" for f in failures))
        self.failures = failures
