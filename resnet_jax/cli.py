"""What every resnet_jax command has in common: quiet logs, one-line errors, exit codes.

- A run prints its own lines only. absl raises the log verbosity to INFO unless `--verbosity` is
  given, which lets Orbax, TFDS and JAX log every step of their work (100-900 lines a run) and
  Orbax log a traceback for every error it then raises; here only fatal log lines show, and
  `--verbosity=0` brings the libraries' logs back (-1: warnings, -2: errors).
- A write the filesystem refuses mid-run (a full disk, a quota, a read-only mount, a permission
  taken away) is one line `error: disk full: ...` (or `read-only file system: ...`, ...) and exit
  code 1; summary.json says `failed` with the cause, and the same command resumes once the
  filesystem takes writes again.
- Bad input (an unknown flag, a config file that is missing or broken, a config `validate`
  rejects, an unprepared dataset, a workdir in use or unusable, a checkpoint of another run, a
  damaged record nothing can rebuild) ends in one line `error: ...` on stderr and exit code 2,
  before anything is written.
- Exit codes, for people and schedulers: see EXIT_* below.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import sys
from collections.abc import Callable

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from resnet_jax import config as config_lib
from resnet_jax import preemption, reporting

EXIT_OK = 0
EXIT_FAILED = 1  # The run failed or diverged; summary.json says why.
EXIT_USAGE = 2  # Bad input; nothing was done.
EXIT_PREEMPTED = preemption.EXIT_CODE  # 75: stopped by SIGTERM/SIGINT, checkpointed (or before
# the loop, with nothing to checkpoint); requeue it.
EXIT_INTERRUPTED = 130  # A second Ctrl-C: stopped at once; the last checkpoint stands.

# The errors that refuse a command before it starts (exit code 2, one line), by module: each
# module says what its error means, and its message what is allowed. A module not yet imported
# raised none of its errors, so none is imported here for its errors alone.
REFUSALS = {
    "resnet_jax.config": ("ConfigError",),  # A config validate() rejects.
    "resnet_jax.lock": ("WorkdirError",),  # A workdir in use, a file, or not writable.
    "resnet_jax.reporting": ("RecordError",),  # A damaged record nothing can rebuild.
    "resnet_jax.data": ("DatasetNotPreparedError", "DatasetDamagedError"),
    "resnet_jax.checkpoints": ("CheckpointMismatchError", "NoUsableCheckpointError",
                               "MissingCheckpointError", "DamagedCheckpointError"),
    "resnet_jax.landscape": ("NotARunError",),
}


def refusal_types() -> tuple[type[BaseException], ...]:
  """The REFUSALS of the modules imported so far."""
  return tuple(getattr(sys.modules[module], name) for module, names in REFUSALS.items()
               if module in sys.modules for name in names)


def run(main: Callable[[list[str]], int]) -> None:
  """absl's app.run(main) with this module's conventions."""
  sys.unraisablehook = _without_late_loop_callbacks(sys.unraisablehook)
  app.run(lambda argv: _call(main, argv), flags_parser=_parse_flags)


def _without_late_loop_callbacks(unraisablehook):
  """`unraisablehook`, silent for one error only: TensorStore completing a write of an Orbax save
  cut short (a refused write, below) after Orbax closed the save's event loop. TensorStore's
  thread calls `loop.call_soon_threadsafe` from C++ and reports what it raises as unraisable
  (PyErr_WriteUnraisable, with no object), a traceback per pending write before the one line the
  user should read. Such a traceback starts in call_soon_threadsafe itself: no Python code called
  it."""
  def hook(unraisable):
    traceback = unraisable.exc_traceback
    if not (unraisable.exc_type is RuntimeError and unraisable.object is None
            and str(unraisable.exc_value) == "Event loop is closed" and traceback
            and traceback.tb_frame.f_code.co_name == "call_soon_threadsafe"):
      unraisablehook(unraisable)
  return hook


def fail(message: str, code: int = EXIT_USAGE) -> None:
  """Prints `error: <message on one line>` and exits."""
  print(f"error: {_one_line(message)}", file=sys.stderr, flush=True)
  sys.exit(code)


def _one_line(text: str) -> str:
  """A multi-line message as one line: `head: a; b` for `head:` followed by lines a and b."""
  lines = [line.strip() for line in str(text).splitlines() if line.strip()]
  if len(lines) > 1 and lines[0].endswith(":"):
    return f"{lines[0]} {'; '.join(lines[1:])}"
  return "; ".join(lines)


def define_config_file(name: str, default: str | None, help_string: str) -> flags.FlagHolder:
  """config_flags.DEFINE_config_file, locked; a bad `--<name>.<field>=value` is bad input.

  Called at import time: config_flags reads the overrides from sys.argv as it defines the flag.
  """
  try:
    return config_flags.DEFINE_config_file(name, default, help_string, lock_config=True)
  except Exception as e:  # pylint: disable=broad-except
    root = _root(e)
    if isinstance(root, (KeyError, AttributeError)):
      field = str(root).strip("'\"")
      given = [arg.split("=")[0] for arg in sys.argv[1:] if arg.startswith(f"--{name}.")
               and arg.split("=")[0].rsplit(".", 1)[-1] == field]
      fail(f"unknown config field {' '.join(given) or field}: the fields and their meaning are "
           "in resnet_jax/config.py")
    fail(f"--{name} overrides: {type(root).__name__}: {root}")
  return None  # Not reached.


def load_config(holder: flags.FlagHolder):
  """The value of a config-file flag, loading the file now; a broken file is bad input."""
  try:
    config = holder.value
    config.keys()  # A file that failed to load gives a stand-in that raises on any attribute.
  except Exception as e:  # pylint: disable=broad-except  # A config file can raise anything.
    fail(_config_file_error(holder.name, e))
  if not isinstance(config, ml_collections.ConfigDict):  # The code reads fields as attributes.
    fail(f"--{holder.name}={config_flags.get_config_filename(flags.FLAGS[holder.name])}: its "
         f"get_config() must return an ml_collections.ConfigDict; it returned a "
         f"{type(config).__name__}")
  return config


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(_flag_error(e))
  except Exception as e:  # pylint: disable=broad-except  # From loading a config file.
    fail(_config_file_error("config", e))
  return []  # Not reached: fail() exits.


def _call(main: Callable[[list[str]], int], argv: list[str]) -> int:
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.FATAL)
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}; every setting is a flag "
         "(--config.<field>=value)")
  _check_text_flags()
  try:
    return main(argv)
  except KeyboardInterrupt:
    print("interrupted: the last checkpoint stands; run the same command to resume",
          file=sys.stderr)
    return EXIT_INTERRUPTED
  except preemption.Preempted:
    # SIGTERM before the loop (preemption.exit_on_sigterm), unwound and the lock released. The
    # interpreter's teardown is skipped: it can crash inside XLA while programs of the set-up
    # are still compiling or running.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_PREEMPTED)
  except Exception as e:  # pylint: disable=broad-except
    if isinstance(e, refusal_types()):
      fail(str(e))
    if (refused := _refused_write(e)) is None:
      raise  # A bug: its traceback is what helps.
    code, cause = refused
    remedy = "free some space" if code in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
    print(f"error: {_REFUSED_WRITES[code]}: {reporting.brief(cause)}; {remedy} and run the same "
          "command to resume", file=sys.stderr, flush=True)
    # The summary is written and the lock released. Orbax's threads of a save cut short can wait
    # forever for its signals, which would keep the interpreter's teardown from ending.
    sys.stdout.flush()
    os._exit(EXIT_FAILED)
  return EXIT_FAILED  # Not reached.


def _check_text_flags() -> None:
  """Bytes that are not UTF-8 (a path written in another encoding) reach Python as surrogates,
  which JAX, Orbax and JSON cannot take: refused here, naming the flag."""
  for name in flags.FLAGS:
    value = flags.FLAGS[name].value
    for text in value if isinstance(value, list) else [value]:
      if isinstance(text, str):
        try:
          text.encode("utf-8")
        except UnicodeEncodeError:
          raw = text.encode("utf-8", "surrogateescape")
          fail(f"--{name} must be UTF-8 text; got {raw!r}")


# Errors of a write the filesystem refused, as cli names them.
_REFUSED_WRITES = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
                   errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                   errno.EPERM: "permission denied"}


def _refused_write(error: BaseException) -> tuple[int, BaseException] | None:
  """(errno, the error) of a write the filesystem refused, anywhere in `error`'s chain, or None:
  from Python, or from TensorStore inside Orbax (a ValueError whose message names it)."""
  while error is not None:
    if getattr(error, "errno", None) in _REFUSED_WRITES:
      return error.errno, error
    for code in _REFUSED_WRITES:
      if os.strerror(code) in str(error):
        return code, error
    error = error.__cause__ or error.__context__
  return None


def _root(error: BaseException) -> BaseException:
  """The innermost exception of a chain: what actually went wrong."""
  while (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__
  return error


def _flag_error(error: flags.Error) -> str:
  text = str(error)
  if text.startswith("flag --config="):
    return _config_file_error("config", error)
  return text


def _config_file_error(name: str, error: BaseException) -> str:
  """What went wrong loading the config file of flag --<name>, naming the file."""
  path = _flag_argument(name).partition(":")[0] or flags.FLAGS[name].default_as_str
  root = _root(error)
  if isinstance(root, FileNotFoundError) or "No such file" in str(root):
    return f"config file {path} not found"
  if isinstance(root, SyntaxError):
    return f"config file {path} line {root.lineno}: {root.msg}"
  if isinstance(root, AttributeError) and "get_config" in str(root):
    return f"config file {path} has no get_config() function"
  if isinstance(root, config_lib.ConfigError):
    return f"config file {path}: {root}"
  returned = _get_config_type(path, _flag_argument(name).partition(":")[2] or None)
  if isinstance(root, (KeyError, AttributeError)) and returned not in (None, "ConfigDict"):
    # An override met a dict: the file's result, not the override, is what is wrong.
    return (f"--{name}={path}: its get_config() must return an ml_collections.ConfigDict; it "
            f"returned a {returned}")
  return f"config file {path}: {type(root).__name__}: {root}"


def _get_config_type(path: str, arg: str | None) -> str | None:
  """The type name of what the config file's get_config returns (None if that fails too)."""
  try:
    spec = importlib.util.spec_from_file_location("_config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return type(module.get_config(arg) if arg is not None else module.get_config()).__name__
  except Exception:  # pylint: disable=broad-except  # The first error is the one reported.
    return None


def _flag_argument(name: str) -> str:
  """The text given to --<name> on the command line ("" if none)."""
  args = sys.argv[1:]
  for i, arg in enumerate(args):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(args):
      return args[i + 1]
  return ""
