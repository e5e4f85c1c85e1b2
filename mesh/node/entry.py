"""The ``meshctl`` and ``meshd`` console scripts: Ctrl-C ends them quietly.

A console script is ``from MODULE import FUNCTION; sys.exit(FUNCTION())``, so a
KeyboardInterrupt raised while ``MODULE`` imports escapes any handler inside it
as a traceback. Python imports :mod:`mesh.node.cli` in a large fraction of a
second, and :mod:`mesh.node.daemon` in over one second (several under load): a
Ctrl-C typed just after the command lands there more often than not. This module
imports nothing heavy; its functions import the command inside
:func:`run_interruptible`, which turns Ctrl-C at any moment into exit status 130
(the shell's 128 + SIGINT) and no output.

What it cannot cover is Python's own start-up before the script's first line
(``site`` and the ``.pth`` files of site-packages): a Ctrl-C there is Python's.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

INTERRUPTED_STATUS = 130
"""Exit status after Ctrl-C: 128 + SIGINT, as a shell reports a command it interrupted."""


def run_interruptible(main: Callable[[], int]) -> int:
    """Run ``main`` and return its exit status, or :data:`INTERRUPTED_STATUS` if
    Ctrl-C interrupted it, at whatever point: a KeyboardInterrupt, alone or
    inside the exception group of a trio nursery, ends it without a traceback.
    A command that handles SIGINT itself keeps its own answer (``meshctl kv
    watch`` exits 0, ``meshd`` leaves the cluster and exits 0).

    Afterwards SIGINT takes its default action again, so that a Ctrl-C while
    the interpreter shuts down kills the process at once (which the shell also
    reports as 130) instead of printing a traceback from Python's exit.

    Raises:
        BaseException: whatever ``main`` raised that holds no KeyboardInterrupt.
    """
    try:
        return main()
    except (KeyboardInterrupt, BaseExceptionGroup) as exc:
        if isinstance(exc, BaseExceptionGroup) and exc.subgroup(KeyboardInterrupt) is None:
            raise
        return INTERRUPTED_STATUS
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL)


def meshctl() -> int:
    """The ``meshctl`` console script: :func:`mesh.node.cli.main` in
    :func:`run_interruptible`."""
    def main() -> int:
        from mesh.node import cli

        return cli.main()

    return run_interruptible(main)


def meshd() -> int:
    """The ``meshd`` console script: :func:`mesh.node.daemon.main` in
    :func:`run_interruptible`."""
    def main() -> int:
        from mesh.node import daemon

        return daemon.main()

    return run_interruptible(main)
