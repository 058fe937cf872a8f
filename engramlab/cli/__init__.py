"""The ``engram`` command: one thin sub-command per verb (parse -> call the API -> write the run).

Every sub-command that produces results takes ``--out DIR`` and writes a run directory
(``manifest.json``, ``summary.json``, artifacts; see ``engramlab.runs``). User errors print one
line starting with ``error:`` and exit with status 2. Verbs live in one module per topic; importing
a module registers its commands on ``app``.
"""

from engramlab.cli import (circuit, continual, corpus, dkn, doctor, evolve, factcheck, freeze, models, neurons, plan,  # noqa: F401
                           regions, study, trace, training)  # (importing a module registers its commands)
from engramlab.cli.common import app


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="engram")


__all__ = ["app", "main"]
