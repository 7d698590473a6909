"""The console script's entry: no traceback for a Ctrl-C at any moment. Until `cli.main`'s
signal receiver takes over (and again after it ends), SIGINT has its default action, so an
interrupt while Python imports the client ends the process quietly, as for any program.
Imports only the standard library before that."""

from __future__ import annotations

import signal


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    from .cli import main as run

    run()
