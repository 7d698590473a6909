"""The console script's entry: no traceback for a Ctrl-C at any moment. Until `cli.main`'s
signal receiver takes over (and again after it ends), SIGINT has its default action, so an
interrupt while Python imports the client ends the process quietly, as for any program.
Imports only the standard library before that, and resets SIGINT as the module loads (the
earliest moment code of ours runs), not only when `main` is called."""

# _signal, the C module under `signal`: importing `signal` loads `enum` first, long enough
# for a Ctrl-C to land in it.
import _signal  # type: ignore[import-not-found]  # (no stubs: the C module under signal)

_signal.signal(_signal.SIGINT, _signal.SIG_DFL)

import signal  # noqa: E402  (after the reset, on purpose)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # again: a caller may have set its own
    from .cli import main as run

    run()
