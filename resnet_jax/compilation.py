"""Compilation: where compiled programs are kept between processes (one persistent cache per
workdir or sweep), and how long compiling took (CompileClock).

Compiling a ResNet's train step takes seconds to tens of seconds. JAX's persistent
compilation cache keys a compiled program by its HLO, the compiler's flags and the device, so a
resumed run, a re-run, or the next point of a sweep whose programs are the same (points that
differ only in the step's inputs: learning rate, momentum, weight decay, seed) loads the program
instead of compiling it. A run keeps its cache in `workdir/xla_cache`; a sweep in its own
workdir's, which its points (in this process or in worker processes) share.

A cache already chosen wins: JAX_COMPILATION_CACHE_DIR in the environment, or an earlier
`use_cache` in this process (JAX reads the setting when it first compiles, so a process keeps
its first cache).
"""

from __future__ import annotations

import os
import threading

import jax

CACHE_DIR = "xla_cache"  # In a run's or a sweep's workdir.
ENV = "JAX_COMPILATION_CACHE_DIR"
# Programs that compiled faster than this are not worth a file; the train and eval steps are.
MIN_COMPILE_TIME_S = 0.5
# JAX's records of the work a jitted call does before it runs: tracing, lowering, and XLA's
# compilation (or reading it from the persistent cache).
_COMPILE_EVENTS = frozenset({"/jax/core/compile/jaxpr_trace_duration",
                             "/jax/core/compile/jaxpr_to_mlir_module_duration",
                             "/jax/core/compile/backend_compile_duration"})


def use_cache(workdir: str) -> str:
  """Points this process's persistent compilation cache at `workdir`/xla_cache unless a cache is
  chosen already; returns the directory in use."""
  chosen = jax.config.jax_compilation_cache_dir
  if chosen:
    return chosen
  # Not created here: JAX creates it at the first compilation, so a run refused before that
  # (a checkpoint of another run, say) leaves nothing in its workdir.
  directory = os.path.join(os.path.abspath(workdir), CACHE_DIR)
  jax.config.update("jax_compilation_cache_dir", directory)
  if os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS") is None:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
  return directory


def environment(workdir: str) -> dict[str, str]:
  """The environment variables that give a worker process the cache of `workdir` (a sweep's),
  or the one chosen already."""
  return {ENV: jax.config.jax_compilation_cache_dir
               or os.path.join(os.path.abspath(workdir), CACHE_DIR)}


class CompileClock:
  """Adds up the seconds this thread spends compiling while open (`with CompileClock() as c:`,
  then `c.seconds`): a jitted program compiles on its first call, and that call's time is
  compile time, not training time. A call whose program is compiled already adds nothing."""

  def __init__(self):
    self.seconds = 0.0
    self._thread = threading.get_ident()

  def _record(self, event: str, duration: float, **kwargs) -> None:
    del kwargs
    if event in _COMPILE_EVENTS and threading.get_ident() == self._thread:
      self.seconds += duration

  def __enter__(self) -> CompileClock:
    self._thread = threading.get_ident()
    jax.monitoring.register_event_duration_secs_listener(self._record)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_duration_listener(self._record)
