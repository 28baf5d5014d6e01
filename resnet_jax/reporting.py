"""What a run writes for people and tools: metrics.jsonl, TensorBoard events, progress, summary.

Only process 0 writes; on the other processes every method is a no-op. TensorBoard event files are
written with tensorboardX, so no TensorFlow is needed.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid

import tqdm

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file of its own and a rename: readers never see
  half a file, and concurrent writers (sweep workers, job-array tasks) never share a temporary."""
  tmp = f"{path}.{uuid.uuid4().hex}.tmp"  # Plain open(): the file gets the umask's permissions.
  try:
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


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
    """Records one event: {"event": "train"|"eval"|"diagnostics", "step": int, ...}."""
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
    if kind == "diagnostics":
      return
    shown = {k: v for k, v in event.items()
             if k in ("loss", "train_error", "test_error", "lr", "img_per_s")}
    text = " ".join(f"{k}={_fmt(v)}" for k, v in shown.items())
    if self._bar is not None:
      self._bar.update(step - self._step)
      self._step = step
      self._bar.set_postfix_str(text)
      if kind == "eval":
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
