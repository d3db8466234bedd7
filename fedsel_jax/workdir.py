"""A workdir is one run: its config fingerprint, its lock, ``--restart``.

* ``fingerprint.json`` holds the run's config (flattened, dotted names)
  minus :data:`RESUMABLE` fields, and its hash. Resuming with any other
  value of a fingerprinted field is refused with one line naming the fields.
* ``.lock`` holds the owner's process id (and its start time, so a reused
  pid is not mistaken for the owner). A lock whose process is gone is stale:
  it is taken over with a message.
* ``restart`` moves everything but the lock to a sibling folder
  ``DIR.old-<time>`` and leaves an empty workdir.

Nothing of the run (config, metrics, checkpoints) is written before
:func:`claim` has checked the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import sys
import time
from typing import Any

import ml_collections

from fedsel_jax.errors import WorkdirError

# Fields that may change when a run resumes: they change what is logged or
# where data is read from, not the model a round produces. fl.num_rounds may
# grow (never fall below the rounds done; train.py checks).
RESUMABLE = ("fl.num_rounds", "fl.max_bad_rounds", "eval_every", "eval_batch_size",
             "checkpoint_every", "checkpoint_keep", "diagnostics.every",
             "compare_strategies", "selection.check_exact", "data.data_dir", "data.archive",
             "fl.device_data", "fl.device_data_max_mb")   # where data lives, not what it is

# Fields added after runs were recorded, with the value that reproduces the
# programs of before: a fingerprint leaves such a field out while it holds
# that value, so older workdirs and sweeps still resume and count as done.
ADDED_LATER = {"fl.grad_gates": False}

FINGERPRINT = "fingerprint.json"
LOCK = ".lock"
_RUN_FILES = ("checkpoints", "metrics.csv", "selection.npz", "final.json", FINGERPRINT)


def flatten(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Dotted field name -> JSON-ready value (tuples become lists)."""
  out: dict[str, Any] = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, (ml_collections.ConfigDict, dict)):
        walk(value, f"{prefix}{key}.")
      else:
        out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  walk(config, "")
  return out


def fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``{'fields': {...}, 'sha256': hex}`` of the fields that define the run."""
  fields = {k: v for k, v in sorted(flatten(config).items())
            if k not in RESUMABLE and not (k in ADDED_LATER and v == ADDED_LATER[k])}
  text = json.dumps(fields, sort_keys=True, default=str)
  return {"fields": fields, "sha256": hashlib.sha256(text.encode()).hexdigest()}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """``field: old -> new`` for every fingerprinted field that differs."""
  keys = sorted(set(old) | set(new))
  missing = "(absent)"
  return [f"{k}: {old.get(k, missing)!r} -> {new.get(k, missing)!r}"
          for k in keys if old.get(k, missing) != new.get(k, missing)]


def check_path(workdir: str) -> str:
  """The absolute workdir; WorkdirError if it cannot be a workdir."""
  if not isinstance(workdir, str) or not workdir.strip():
    raise WorkdirError("--workdir must be a folder path, got an empty string")
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"--workdir {path} exists and is not a folder")
  probe = path
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.access(probe, os.W_OK | os.X_OK):
    raise WorkdirError(f"--workdir {path}: {probe} is not writable (permission denied)")
  return path


def _proc_start(pid: int) -> str | None:
  """The kernel's start time of process ``pid`` (None where /proc is absent)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(owner: dict[str, Any]) -> bool:
  if owner.get("host") != socket.gethostname():
    return True   # another machine's process: cannot tell, assume alive
  pid = int(owner.get("pid", -1))
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  start = owner.get("start")
  return start is None or _proc_start(pid) in (None, start)


class Lock:
  """An exclusive lock on a workdir, held by this process until :meth:`release`."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK)
    self.held = False

  def acquire(self) -> None:
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _proc_start(os.getpid()),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        owner = self._owner()
        if owner is not None and _alive(owner):
          raise WorkdirError(
              f"workdir {os.path.dirname(self.path)} is in use by process {owner.get('pid')} "
              f"on {owner.get('host')} (since {owner.get('since')}); wait for it, stop it, "
              f"or use another --workdir") from None
        print(f"taking over the stale lock of process "
              f"{owner.get('pid') if owner else '?'} in {os.path.dirname(self.path)}",
              file=sys.stderr, flush=True)
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      self.held = True
      return
    raise WorkdirError(f"could not take the lock {self.path}: another process keeps taking it")

  def _owner(self) -> dict[str, Any] | None:
    try:
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None   # unreadable or half-written: treated as stale

  def release(self) -> None:
    if self.held:
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
      self.held = False

  def __enter__(self) -> "Lock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def has_run(workdir: str) -> bool:
  return any(os.path.exists(os.path.join(workdir, f)) for f in _RUN_FILES)


def restart(workdir: str) -> str | None:
  """Moves the run in ``workdir`` (all but the lock) aside; returns where."""
  if not has_run(workdir):
    return None
  dest = f"{workdir}.old-{time.strftime('%Y%m%d-%H%M%S')}"
  n = 1
  while os.path.exists(dest):
    dest = f"{workdir}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    n += 1
  os.makedirs(dest)
  for name in os.listdir(workdir):
    if name != LOCK:
      os.rename(os.path.join(workdir, name), os.path.join(dest, name))
  return dest


def rounds_done(workdir: str) -> int:
  """The newest checkpointed round in ``workdir`` (0 if none), from the folder names."""
  folder = os.path.join(workdir, "checkpoints")
  steps = [int(n) for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []
  return max(steps, default=0)



def json_safe(obj: Any) -> Any:
  """``obj`` with every non-finite float as None, for strict JSON files
  (``final.json``: NaN means "not computed", e.g. the probe's test loss)."""
  if isinstance(obj, dict):
    return {k: json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def write_json(path: str, obj: Any, strict: bool = True) -> None:
  """Writes ``obj`` as JSON to ``path`` atomically (a kill mid-write leaves the
  previous file). ``strict``: non-finite floats as null (:func:`json_safe`);
  else NaN as JavaScript's ``NaN`` and numpy scalars as floats."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    if strict:
      json.dump(json_safe(obj), f, indent=2, allow_nan=False)
    else:
      json.dump(obj, f, indent=2, default=float)
  os.replace(tmp, path)


def write_final(workdir: str, final: dict[str, Any]) -> None:
  """``final.json`` of a finished run (strict JSON, atomically)."""
  write_json(os.path.join(workdir, "final.json"), final)


def check_fingerprint(workdir: str, config: ml_collections.ConfigDict) -> bool:
  """Whether ``workdir`` holds this run already (False: a new run).

  Raises:
    WorkdirError: the workdir holds another run (one line naming the
      differing fields), or a run without a fingerprint.
  """
  path = os.path.join(workdir, FINGERPRINT)
  if os.path.exists(path) and not rounds_done(workdir) and not os.path.exists(
      os.path.join(workdir, "metrics.csv")):
    return False   # claimed, but stopped before its first checkpoint: nothing to keep
  if not os.path.exists(path):
    if has_run(workdir):
      raise WorkdirError(f"workdir {workdir} holds a run without {FINGERPRINT} (an older "
                         "fedsel_jax, or a damaged run): use --restart or another --workdir")
    return False
  try:
    with open(path) as f:
      stored = json.load(f)["fields"]
  except (OSError, ValueError, KeyError) as e:
    raise WorkdirError(f"{path} is unreadable ({e}): use --restart or another --workdir") from e
  diff = differences(stored, fingerprint(config)["fields"])
  if diff:
    raise WorkdirError(f"workdir {workdir} holds another run; differing fields: "
                       f"{'; '.join(diff)}. Use --restart to move it aside and start over, "
                       "or another --workdir")
  return True


def write_run_files(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes fingerprint.json and config.json (atomically) for a new or resumed run."""
  for name, text in ((FINGERPRINT, json.dumps(fingerprint(config), indent=1, default=str)),
                     ("config.json", config.to_json_best_effort(indent=2))):
    tmp = os.path.join(workdir, name + ".tmp")
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, os.path.join(workdir, name))
