"""What a run writes for people and tools: metrics.jsonl, TensorBoard events, progress, summary.

The records are defined here once: `Summary` (summary.json, what a run returns and a sweep's table
shows) and the event kinds of metrics.jsonl (`TRAIN`, `EVAL`, `DIAGNOSTICS`). Only process 0
writes; on the other processes every Reporter method is a no-op. TensorBoard event files are
written with tensorboardX, so no TensorFlow is needed.

Every JSON file resnet_jax reads back goes through `read_json`, which checks its shape and raises
`RecordError` naming the file and what is wrong. What a damaged record then means is decided
where it is read: a summary counts as absent (the run rebuilds it), damaged lines of
metrics.jsonl are set aside in metrics.jsonl.damaged, files nothing can rebuild are refused.
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
DAMAGED_SUFFIX = ".damaged"  # metrics.jsonl.damaged: lines of metrics.jsonl set aside.
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

  @classmethod
  def failed_from_records(cls, workdir: str, message: str) -> "Summary":
    """A FAILED summary of a run that died without writing one (killed, say): as far as its
    metrics.jsonl says it got."""
    events = read_metrics(workdir)
    trains = [e for e in events if e["event"] == TRAIN]
    evals = [e for e in events if e["event"] == EVAL]
    fields: dict[str, Any] = {}
    if trains:
      fields.update(step=trains[-1]["step"], train_loss=trains[-1].get("loss", math.nan),
                    train_error=trains[-1].get("train_error", math.nan))
    if evals:
      fields.update(test_error=evals[-1]["test_error"], best_test_error=best_test_error(events))
    if times := [e["wall_time_s"] for e in events if isinstance(e.get("wall_time_s"), (int, float))]:
      fields["wall_time_s"] = times[-1]
    return cls.failed(message, **fields)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def write(self, workdir: str) -> None:
    write_json_atomic(os.path.join(workdir, SUMMARY_FILE), self.to_dict())

  @classmethod
  def read(cls, workdir: str) -> "Summary | None":
    """The workdir's summary.json, or None when it has none.

    A damaged one (not JSON, a field missing or of the wrong type) also counts as none, with a
    warning: a summary is rebuilt from the run's checkpoint and metrics.jsonl when the run runs
    again, so its run (or sweep point) counts as not finished.
    """
    path = os.path.join(workdir, SUMMARY_FILE)
    try:
      stored = read_json(path, dict, keys=SUMMARY_COLUMNS)
      for field in dataclasses.fields(cls):
        value = stored[field.name]
        kinds, wanted = {"str": (str, "a string"), "int": (int, "an integer")}.get(
            field.type, ((int, float), "a number"))
        if not isinstance(value, kinds) or isinstance(value, bool):
          raise RecordError(f"{path} is damaged: field {field.name} is {value!r}, not {wanted}")
    except FileNotFoundError:
      return None
    except RecordError as e:
      warn(f"{e}; counted as no summary: running the run again rebuilds it")
      return None
    return cls(**{field.name: stored[field.name] for field in dataclasses.fields(cls)})


SUMMARY_COLUMNS = tuple(field.name for field in dataclasses.fields(Summary))


class RecordError(ValueError):
  """A file resnet_jax wrote and reads back is damaged; the message names it and what is wrong."""


def read_json(path: str, kind: type = dict, keys: tuple[str, ...] = ()) -> Any:
  """The JSON value of the file at `path`, checked to be a `kind` (dict: with every one of
  `keys`).

  Raises:
    FileNotFoundError: there is no file at `path`.
    RecordError: it is not UTF-8, empty, not JSON, or not of that shape.
  """
  try:
    with open(path, "rb") as f:
      text = f.read().decode("utf-8")
  except UnicodeDecodeError:
    raise RecordError(f"{path} is damaged: it is not UTF-8 text") from None
  except IsADirectoryError:
    raise RecordError(f"{path} is a directory, not a file") from None
  if not text.strip():
    raise RecordError(f"{path} is damaged: it is empty")
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise RecordError(f"{path} is damaged: not JSON ({e.msg}, line {e.lineno})") from None
  if not isinstance(value, kind):
    raise RecordError(f"{path} is damaged: it holds {_json_type(value)}, not "
                      f"{_json_type(kind())}")
  if missing := [k for k in keys if k not in value]:
    raise RecordError(f"{path} is damaged: it has no field {', '.join(missing)}")
  return value


def _json_type(value) -> str:
  return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
          float: "a number"}.get(type(value), "null")


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


def best_test_error(events: list[dict]) -> float:
  """The best test error among logged evaluations (inf if none)."""
  return min((e["test_error"] for e in events if e["event"] == EVAL), default=float("inf"))


def read_metrics(workdir: str) -> list[dict]:
  """All events of a run's metrics.jsonl, in order ([] when there is none).

  A last line cut short (the process was killed mid-write) is dropped with a warning; damaged
  lines before it (not JSON, or not an event) are skipped with one warning naming the first.
  A run that resumes sets them aside for good (`truncate_metrics`).
  """
  path = os.path.join(workdir, METRICS_FILE)
  events, damaged = _read_events(path)
  if damaged:
    warn(f"{path}: skipped {_damaged_lines(damaged)}")
  return events


def _read_events(path: str) -> tuple[list[dict], list[tuple[int, str, str]]]:
  """(the valid events, the damaged lines as (number, text, what is wrong)). A torn last line
  is dropped with a warning, not counted damaged: a kill mid-write leaves one, and its record
  is lost with the step it logged, which the resumed run logs again."""
  if not os.path.exists(path):
    return [], []
  with open(path, "rb") as f:
    lines = f.read().decode("utf-8", errors="replace").split("\n")
  events, damaged = [], []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      event = json.loads(line)
    except json.JSONDecodeError as e:
      if number == len(lines):  # Only the last line can be torn: every write ends with "\n".
        warn(f"{path}: dropped its last line, cut short ({len(line)} characters): {e.msg}")
        continue
      damaged.append((number, line, f"not JSON ({e.msg})"))
      continue
    if problem := _event_problem(event):
      damaged.append((number, line, problem))
    else:
      events.append(event)
  return events, damaged


def _event_problem(event) -> str | None:
  """What makes a JSON value not an event of metrics.jsonl (the fields readers rely on)."""
  if not isinstance(event, dict):
    return "not a JSON object"
  needed = {"event": str, "step": int}
  needed.update({TRAIN: {"loss": (int, float), "train_error": (int, float)},
                 EVAL: {"test_error": (int, float)}}.get(event.get("event"), {}))
  for key, kind in needed.items():
    if not isinstance(event.get(key), kind) or isinstance(event.get(key), bool):
      return f"field {key} is {event.get(key, '<absent>')!r}"
  return None


def _damaged_lines(damaged: list[tuple[int, str, str]]) -> str:
  number, line, problem = damaged[0]
  more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
  return f"{len(damaged)} damaged line(s): line {number}, {problem}: {line[:60]!r}{more}"


def truncate_metrics(workdir: str, last_step: int) -> None:
  """Drops events after `last_step` (a resumed run logs those steps again) and a torn last line;
  moves damaged lines to metrics.jsonl.damaged (appended: never lost), with one warning."""
  path = os.path.join(workdir, METRICS_FILE)
  events, damaged = _read_events(path)
  kept = [e for e in events if e["step"] <= last_step]
  if damaged:
    with open(path + DAMAGED_SUFFIX, "a") as f:
      f.write("".join(line + "\n" for _, line, _ in damaged))
    warn(f"{path}: set {_damaged_lines(damaged)} aside in {path + DAMAGED_SUFFIX}")
  text = "".join(json.dumps(e) + "\n" for e in kept)
  if os.path.exists(path) and _read_text(path) != text:
    write_text_atomic(path, text)


def _read_text(path: str) -> str:
  with open(path, "rb") as f:
    return f.read().decode("utf-8", errors="replace")


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
    self._metrics_path = os.path.join(workdir, METRICS_FILE)
    # Readable too: if the file is removed under the run, what it held is still here to rewrite.
    self._metrics = open(self._metrics_path, "a+")
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
    self._reattach_metrics()
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

  def _reattach_metrics(self) -> None:
    """If metrics.jsonl was removed or replaced since the run opened it, writes what the run's
    open file holds back to its path (a replacement is set aside in metrics.jsonl.damaged first)
    and goes on there, with one warning: no record is lost without a word."""
    how = "removed"
    with contextlib.suppress(FileNotFoundError):
      if os.path.samestat(os.fstat(self._metrics.fileno()), os.stat(self._metrics_path)):
        return
      with open(self._metrics_path + DAMAGED_SUFFIX, "a") as aside:
        aside.write(_read_text(self._metrics_path))
      how = f"replaced (the replacement set aside in {self._metrics_path}{DAMAGED_SUFFIX})"
    self._metrics.seek(0)
    held = self._metrics.read()
    write_text_atomic(self._metrics_path, held)
    self._metrics.close()
    self._metrics = open(self._metrics_path, "a+")
    warn(f"{self._metrics_path} was {how} while this run wrote it: rewritten from the run's "
         f"open copy ({held.count(chr(10))} events)")

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
