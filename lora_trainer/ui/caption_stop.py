"""Interrupt for the tab's captioning: the tab's Interrupt buttons set it, ``caption_folder`` polls it per batch."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class CaptionStop:
    """A stop request for the captioning that runs now; a request while nothing runs is not kept for later."""

    def __init__(self) -> None:
        self._running = threading.Event()
        self._requested = threading.Event()

    @contextmanager
    def running(self) -> Iterator[None]:
        """Mark captioning as running (an old request is forgotten) for the ``with`` block."""
        self._requested.clear()
        self._running.set()
        try:
            yield
        finally:
            self._running.clear()

    def request(self) -> bool:
        """Ask the running captioning to stop after its current batch; False when none runs."""
        if not self._running.is_set():
            return False
        self._requested.set()
        return True

    def __call__(self) -> bool:
        """True once a stop was requested: the ``should_stop`` that ``caption_folder`` polls."""
        return self._requested.is_set()


CAPTION_STOP = CaptionStop()  # process-wide, like the training job: any page's Interrupt stops the captioning
