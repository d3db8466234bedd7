"""SIGINT / SIGTERM as a clean stop at a safe point.

Inside :func:`handle_signals` both signals raise
:class:`~fedsel_jax.errors.Interrupted` in the main thread, except while a
:func:`critical` section runs (a checkpoint and its metrics being written):
then the stop waits for the section to finish, so a checkpoint is either
complete or never started. A second signal during a critical section is
remembered, not acted on twice. ``fedsel_jax.main`` turns the exception
into one line and exit code 128 + signal (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from fedsel_jax.errors import Interrupted

_state = {"depth": 0, "pending": None}


def _handler(signum, frame):
  del frame
  if _state["depth"] > 0:
    _state["pending"] = signum
    return
  raise Interrupted(signum)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
  """Installs the handlers for the duration (main thread only; else a no-op)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
    _state["pending"] = None


@contextlib.contextmanager
def critical() -> Iterator[None]:
  """Defers SIGINT/SIGTERM until the block has finished."""
  _state["depth"] += 1
  try:
    yield
  finally:
    _state["depth"] -= 1
  if _state["depth"] == 0 and _state["pending"] is not None:
    signum, _state["pending"] = _state["pending"], None
    raise Interrupted(signum)
