"""What a run writes for people and tools: metrics.jsonl, TensorBoard events, progress, summary.

The records are defined here once: `Summary` (summary.json, what a run returns and a sweep's table
shows) and the event kinds of metrics.jsonl (`TRAIN`, `EVAL`, `DIAGNOSTICS`). Only process 0
writes; on the other processes every Reporter method is a no-op. TensorBoard event files are
written with tensorboardX, so no TensorFlow is needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import uuid
from typing import Any

import tqdm

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"

# The kinds of event in metrics.jsonl, its "event" field.
TRAIN = "train"  # Every log_every steps: step, epoch, loss, train_error, lr, img_per_s, ...
EVAL = "eval"  # test_loss, test_error of the running-average network.
DIAGNOSTICS = "diagnostics"  # Per-block grad_norm and activation_rms (diagnostics.py).
SHARPNESS = "sharpness"  # Top Hessian eigenvalues and the optimiser's stability threshold.
NOISE_SCALE = "noise_scale"  # The simple gradient noise scale B_simple and its two estimates.

# How a run ended, Summary.status. A sweep's table adds "started" (a workdir, no summary yet)
# and "pending" (not started).
COMPLETED = "completed"  # Trained config.num_steps steps.
DIVERGED = "diverged"  # The loss became NaN or Inf; running it again would diverge again.
PREEMPTED = "preempted"  # Stopped by SIGTERM or SIGINT, its last step checkpointed.
FAILED = "failed"  # Raised; the message says what.


@dataclasses.dataclass(frozen=True)
class Summary:
  """How a run ended: summary.json, what `train.train_and_evaluate` returns. Errors are fractions,
  losses per example; nan where not measured (a run that ended before its first log)."""
  status: str  # COMPLETED, DIVERGED, PREEMPTED or FAILED.
  message: str
  step: int  # Steps trained.
  train_loss: float  # Over the last log window.
  train_error: float
  test_error: float  # At the last evaluation.
  best_test_error: float  # Over every evaluation of the run.
  wall_time_s: float  # Over every segment of a resumed run.
  num_params: int

  @classmethod
  def failed(cls, message: str, **fields: Any) -> "Summary":
    """A FAILED summary with nothing measured (nan), except `fields`."""
    nan = float("nan")
    values = dict(status=FAILED, message=message, step=0, train_loss=nan, train_error=nan,
                  test_error=nan, best_test_error=nan, wall_time_s=0.0, num_params=0)
    return cls(**{**values, **fields})

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def write(self, workdir: str) -> None:
    write_json_atomic(os.path.join(workdir, SUMMARY_FILE), self.to_dict())

  @classmethod
  def read(cls, workdir: str) -> "Summary | None":
    """The workdir's summary.json, or None when it has none."""
    path = os.path.join(workdir, SUMMARY_FILE)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      stored = json.load(f)
    return cls(**{field.name: stored[field.name] for field in dataclasses.fields(cls)})


SUMMARY_COLUMNS = tuple(field.name for field in dataclasses.fields(Summary))


@contextlib.contextmanager
def open_atomic(path: str, mode: str = "w"):
  """Opens a temporary file of its own beside `path`, renamed onto `path` when the block ends
  without an error (and removed when it raises): readers never see half a file, and concurrent
  writers (sweep workers, job-array tasks) never share a temporary. The file gets the umask's
  permissions, like a plain open()."""
  tmp = f"{path}.{uuid.uuid4().hex}.tmp"
  try:
    with open(tmp, mode) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text_atomic(path: str, text: str) -> None:
  with open_atomic(path) as f:
    f.write(text)


def write_json_atomic(path: str, obj) -> None:
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def brief(error: BaseException) -> str:
  """`TypeName: the first line of its message`, at most 300 characters: an error on one line."""
  lines = str(error).strip().splitlines()
  text = f"{type(error).__name__}: {lines[0] if lines else ''}"
  return text if len(text) <= 300 else text[:297] + "..."


def warn(message: str) -> None:
  """One line `warning: ...` on stderr: what a user must know, whatever the log verbosity."""
  print(f"warning: {message}", file=sys.stderr, flush=True)


def read_metrics(workdir: str) -> list[dict]:
  """All events of a run's metrics.jsonl, in order ([] when there is none).

  A last line cut short (the process was killed mid-write) is dropped with a warning; a bad line
  before the last raises ValueError naming the file and line.
  """
  return _read_events(os.path.join(workdir, METRICS_FILE))[0]


def _read_events(path: str) -> tuple[list[dict], bool]:
  """(events, whether a torn last line was dropped)."""
  if not os.path.exists(path):
    return [], False
  with open(path) as f:
    lines = f.read().split("\n")
  events = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      events.append(json.loads(line))
    except json.JSONDecodeError as e:
      if number == len(lines):  # Only the last line can be torn: every write ends with "\n".
        warn(f"{path}: dropped its last line, cut short ({len(line)} characters): {e.msg}")
        return events, True
      raise ValueError(f"{path} line {number} is not JSON ({e.msg}): {line[:80]!r}") from None
  return events, False


def truncate_metrics(workdir: str, last_step: int) -> None:
  """Drops events after `last_step` (a resumed run logs those steps again) and a torn last line."""
  path = os.path.join(workdir, METRICS_FILE)
  events, torn = _read_events(path)
  kept = [e for e in events if e["step"] <= last_step]
  if len(kept) == len(events) and not torn:
    return
  write_text_atomic(path, "".join(json.dumps(e) + "\n" for e in kept))


class Reporter:
  """Appends events to metrics.jsonl and TensorBoard, and shows progress.

  A progress bar (step, loss, img/s, ETA) when stdout is a terminal, plain log lines otherwise.
  """

  def __init__(self, workdir: str, *, num_steps: int, first_step: int, enabled: bool,
               progress_bar: bool, wall_time_s: float = 0.0):
    """wall_time_s: the run's wall time before this segment (a resumed run continues it)."""
    self.enabled = enabled
    self._start = time.time() - wall_time_s
    if not enabled:
      return
    from tensorboardX import SummaryWriter  # Imported late: only process 0 needs it.
    self._metrics = open(os.path.join(workdir, METRICS_FILE), "a")
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self._bar = None
    if progress_bar and sys.stdout.isatty():
      self._bar = tqdm.tqdm(total=num_steps, initial=first_step, unit="step", dynamic_ncols=True)
    self._step = first_step

  def wall_time(self) -> float:
    """Seconds of the run so far, over all its segments."""
    return time.time() - self._start

  def write(self, event: dict) -> None:
    """Records one event: {"event": TRAIN | EVAL | DIAGNOSTICS, "step": int, ...}."""
    if not self.enabled:
      return
    self._metrics.write(json.dumps(event) + "\n")
    self._metrics.flush()
    kind, step = event["event"], event["step"]
    for key, value in event.items():
      if isinstance(value, dict):
        for name, v in value.items():
          self._tb.add_scalar(f"{kind}/{key}/{name}", v, step)
      elif key not in ("event", "step") and isinstance(value, (int, float)):
        self._tb.add_scalar(f"{kind}/{key}", value, step)
    if kind == DIAGNOSTICS:
      return
    shown = {k: v for k, v in event.items()
             if k in ("loss", "train_error", "test_error", "lr", "img_per_s")}
    text = " ".join(f"{k}={_fmt(v)}" for k, v in shown.items())
    if self._bar is not None:
      self._bar.update(step - self._step)
      self._step = step
      self._bar.set_postfix_str(text)
      if kind == EVAL:
        self._bar.write(f"step {step}: {text}")
    else:
      print(f"[{kind}] step {step} epoch {event.get('epoch', 0):.2f} {text}", flush=True)

  def close(self) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.close()
    self._metrics.close()
    self._tb.close()


def _fmt(value) -> str:
  if isinstance(value, float) and math.isfinite(value) and abs(value) >= 100:
    return f"{value:.0f}"
  return f"{value:.4g}" if isinstance(value, float) else str(value)
