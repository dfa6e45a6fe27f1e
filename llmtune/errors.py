"""Errors that the CLI maps to exit codes.

`UserError` (exit 2) is for anything the user can fix: a wrong recipe, a missing file, a malformed
data row. Its message is printed as is, without a traceback (unless `--debug`), so it must name the
key or row and say how to fix it.

Under llmtune's own multi-process launch, a rank's error is also left in a file for the launching
`llmtune train`, which ends on the same message and exit code (torchrun alone would report exit 1).
"""

import json
import os
from pathlib import Path

EXIT_DIR_ENV = "LLMTUNE_EXIT_DIR"  # where the ranks of llmtune's own launch leave the error they stopped on


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


def tell_the_launching_process(error: Exception) -> None:
    """Inside our own launch, leave the input error or failed gate this rank stopped on for the parent.

    torchrun reports any failed rank as exit 1 under a page of its own output; with this the parent
    `llmtune train` ends on the same one-line message and exit code (2 or 3) as a one-process run.
    """
    folder = os.environ.get(EXIT_DIR_ENV)
    if not folder or not Path(folder).is_dir():
        return
    record = {"failures": error.failures} if isinstance(error, GateFailed) else {"message": str(error)}
    Path(folder, f"rank{int(os.environ.get('RANK', '0')):05d}.json").write_text(json.dumps(record))
