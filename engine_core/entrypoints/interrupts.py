"""Ctrl-C at a safe point: a synchronous loop records SIGINT and raises it between steps."""

from __future__ import annotations

import signal
import threading
from types import FrameType


class DeferredInterrupt:
    """While active, the first SIGINT is recorded instead of raising KeyboardInterrupt wherever
    the main thread happens to be; `check()` raises it at the loop's next safe point. A second
    SIGINT raises at once, so an impatient user still gets out (the engine stays sound either
    way; a deferred interrupt only saves cancelling a step half-submitted).

    It only acts in the main thread and when SIGINT has Python's default handler; otherwise
    (another thread, a handler of the application's own) it changes nothing.

        with DeferredInterrupt() as interrupt:
            while work:
                step()
                interrupt.check()
    """

    def __init__(self) -> None:
        self.pending = False
        self._installed = False

    def __enter__(self) -> DeferredInterrupt:
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            signal.signal(signal.SIGINT, self._on_sigint)
            self._installed = True
        return self

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True

    def check(self) -> None:
        """Raise KeyboardInterrupt if a SIGINT arrived since the last check."""
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self._installed = False
        if exc_type is None:
            self.check()  # one that arrived after the last check is not lost
