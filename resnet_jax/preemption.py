"""Stopping cleanly when asked: SIGTERM or SIGINT ends a run at a step boundary, checkpointed.

Clusters and cloud GPUs/TPUs send SIGTERM some seconds before they take a machine away. While a
run trains, the first SIGTERM or SIGINT (Ctrl-C) only sets a flag: the loop finishes the step in
flight, checkpoints it, lets the save complete, writes `summary.json` with status `preempted`, and
the command exits with `EXIT_CODE`, which schedulers can requeue on; the next start resumes
exactly. A second Ctrl-C stops at once, as Python does by default (the last checkpoint stays).

Several processes must stop at the same step, since a checkpoint is written by all of them
together. There JAX's preemption service does the work: it catches SIGTERM on any process and
agrees on one step at which every process stops (`multihost_utils.
reached_preemption_sync_point`, asked once per step). Ctrl-C is turned into SIGTERM to take the
same path.

Outside the loop (while a command imports, validates, locks, builds and restores, or after the
run) there is no step to stop at: `exit_on_sigterm`, the first thing a command does, makes
SIGTERM end it there at once, with one line and `EXIT_CODE`, unwinding so that the workdir's
lock is released.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from collections.abc import Callable

# sysexits.h's EX_TEMPFAIL: "a temporary failure; the user is invited to retry".
EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(SystemExit):
  """SIGTERM outside the loop: exits with EXIT_CODE, unwinding (see exit_on_sigterm)."""


def exit_on_sigterm() -> None:
  """Makes SIGTERM raise Preempted (a SystemExit with EXIT_CODE) after one line on stderr, until
  a StopRequest takes the signal over (and again once it gives it back). For a command's entry
  point, before its heavy imports: the default action would kill the process with 143, which
  schedulers do not requeue, without releasing what `finally` blocks release (the workdir's
  lock). In a multi-process run JAX's preemption notifier takes SIGTERM over once
  jax.distributed starts."""
  signal.signal(signal.SIGTERM, _exit_preempted)
  signal.signal(signal.SIGALRM, _exit_preempted)  # The retry below.
  previous_hook = sys.unraisablehook

  def retry_if_swallowed(unraisable) -> None:
    # A handler runs wherever the main thread is, and an exception raised in a garbage
    # collector callback or a __del__ is printed and dropped there: an alarm raises it again
    # just after, in ordinary code (it fires once this hook has returned).
    if issubclass(unraisable.exc_type, Preempted):
      signal.setitimer(signal.ITIMER_REAL, 0.01)
    else:
      previous_hook(unraisable)

  sys.unraisablehook = retry_if_swallowed
  _forward_to_the_main_thread()


# Set once the handler below runs: the main thread has the signal in hand.
_RECEIVED = threading.Event()


def _forward_to_the_main_thread() -> None:
  """Makes SIGTERM reach the main thread even where another thread took it.

  Python runs handlers in the main thread only, once it is back in Python code. A signal
  taken by another thread (Linux may choose any; native libraries install handlers of their
  own) leaves a main thread blocked in a system call there, its handler never run: seen as a
  run that ignored SIGTERM while it read a file, after XLA's first compilations. CPython's C
  handler, on any thread, writes the signal's number to the wakeup fd; a watcher sends the
  signal on to the main thread if its handler has not run within a second, which interrupts
  the call.
  """
  if threading.current_thread() is not threading.main_thread():
    return
  receiver, sender = socket.socketpair()
  sender.setblocking(False)
  signal.set_wakeup_fd(sender.fileno(), warn_on_full_buffer=False)
  main = threading.main_thread().ident

  # The thread holds `_sender`: collected, it would close the fd the handler writes to.
  def watch(receiver: socket.socket, _sender: socket.socket) -> None:
    while numbers := receiver.recv(64):
      if (signal.SIGTERM in numbers and signal.getsignal(signal.SIGTERM) is _exit_preempted
          and not _RECEIVED.wait(1.0)):
        signal.pthread_kill(main, signal.SIGTERM)

  threading.Thread(target=watch, args=(receiver, sender), name="resnet_jax-sigterm",
                   daemon=True).start()


def _exit_preempted(signum, frame) -> None:
  del frame
  _RECEIVED.set()
  if signum == signal.SIGTERM:  # Its line once, though a retry raises again.
    print("preempted: SIGTERM arrived while no step was in flight (before training began "
          "or after it ended); run the same command again", file=sys.stderr, flush=True)
  raise Preempted(EXIT_CODE)


class StopRequest:
  """Whether a stop was asked for; a context manager that installs the signal handlers.

  synced: several processes stop together (JAX's preemption service; jax.distributed must be
    initialised): requested() must then be called at every step, on every process.
  on_request: called once, in the main thread, when the first signal arrives.
  Handlers can only be installed from the main thread; elsewhere (a notebook's worker thread)
  signals keep their usual effect and only request() asks for a stop.
  """

  def __init__(self, *, synced: bool = False, on_request: Callable[[], None] | None = None):
    self.signal_name: str | None = None
    self._synced = synced
    self._on_request = on_request
    self._previous: dict[int, object] = {}

  def __enter__(self) -> StopRequest:
    if threading.current_thread() is not threading.main_thread():
      return self
    # Synced, SIGTERM belongs to JAX's preemption notifier; only Ctrl-C is handled here.
    for signum in (signal.SIGINT,) if self._synced else SIGNALS:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def request(self, reason: str) -> None:
    """Asks for a stop; `reason` (a signal's name, say) goes into messages."""
    if self.signal_name is None:
      self.signal_name = reason
      if self._on_request is not None:
        self._on_request()

  def requested(self, step: int) -> bool:
    """True once the run should stop after `step` (synced: on every process at the same step)."""
    if not self._synced:
      return self.signal_name is not None
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    try:
      stop = multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # The preemption service is off (jax_enable_preemption_service).
      return False
    if stop:
      self.request(self.signal_name or "SIGTERM")
    return stop

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if signum == signal.SIGINT and self.signal_name == "SIGINT":
      raise KeyboardInterrupt  # Ctrl-C twice: stop now.
    if self._synced:
      self.signal_name = self.signal_name or name
      os.kill(os.getpid(), signal.SIGTERM)  # To JAX's notifier, which tells every process.
      return
    self.request(name)
