"""The exceptions whose message the command line prints as one ``error:`` line.

Each carries a message written for the user (field, value, what is allowed
or what to do); ``fedsel_jax.main`` prints it and exits with ``exit_code``.
"""

from __future__ import annotations


class UserError(Exception):
  """A problem the user can fix; the message says how."""

  exit_code = 2


class ConfigError(UserError, ValueError):
  """A config field, argument or combination of fields is not allowed."""


class WorkdirError(UserError):
  """The workdir holds another run, is locked, damaged or cannot be written."""


class DivergedError(UserError):
  """Training stopped: ``fl.max_bad_rounds`` rounds in a row changed nothing."""

  exit_code = 3


class Interrupted(Exception):
  """SIGINT / SIGTERM arrived; the run stopped at a round boundary."""

  def __init__(self, signum: int, round_idx: int | None = None):
    super().__init__(signum, round_idx)
    self.signum = signum
    self.round_idx = round_idx

  @property
  def exit_code(self) -> int:
    return 128 + self.signum
