"""Ctrl-C during ``fedlora simulate``: stop within seconds, keep the last complete round, leave no Ray.

Flower runs the ServerApp in a non-daemon thread and the clients in Ray actors; Python delivers
SIGINT to the main thread only. Flower's simulation loop unwinds there (its ``finally`` kills
the actors and shuts Ray down), but the ServerApp thread kept waiting for replies that would
never come, and the process with it. So the first Ctrl-C also sets a stop event that the
ServerApp's grid checks at every poll (:class:`simulations.console.StopGrid` raises
:class:`RunStopped`): the ServerApp thread ends at its next call to the grid, after any
checkpoint it was writing (checkpoints are atomic, so the last complete round's stays valid
either way). A second Ctrl-C leaves at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from fedlora.cli import EXIT_INTERRUPTED

# Seconds the ServerApp thread, and then any other thread, gets to finish after Ctrl-C.
GRACE_SECONDS = 10.0
# Loggers that report the actors' deaths (tracebacks of the stop itself): silenced on Ctrl-C.
NOISY_LOGGERS = ("flwr", "ray")


class RunStopped(Exception):
    """Raised in the ServerApp thread by its grid once the run was interrupted."""


class Interrupted(KeyboardInterrupt):
    """The run was interrupted; ``run_dir`` holds the checkpoint of ``last_round`` (None: none yet)."""

    def __init__(self, run_dir: Path, last_round: int | None) -> None:
        super().__init__(str(run_dir))
        self.run_dir, self.last_round = run_dir, last_round

    def advice(self) -> str:
        """Return the line that says what was kept and how to continue."""
        if self.last_round is None:
            return (
                f"interrupted before the first round completed (start it over with: "
                f"fedlora simulate --out {self.run_dir} --resume)"
            )
        return (
            f"interrupted; round {self.last_round} is the last complete one, checkpointed in {self.run_dir} "
            f"(continue with: fedlora simulate --out {self.run_dir} --resume)"
        )


@contextlib.contextmanager
def interruptible(stop: threading.Event) -> Iterator[None]:
    """Turn SIGINT into: set ``stop``, silence :data:`NOISY_LOGGERS`, raise KeyboardInterrupt; twice: exit.

    Outside the main thread (a library caller's worker) signals cannot be handled: nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum: int, frame: object) -> None:
        if stop.is_set():  # the second Ctrl-C: the user does not want to wait
            print("fedlora simulate: stopped", file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)
        stop.set()
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def wind_down(stop: threading.Event, server_done: threading.Event) -> None:
    """After Ctrl-C: let the ServerApp thread end (up to :data:`GRACE_SECONDS`), then stop Ray."""
    stop.set()
    server_done.wait(GRACE_SECONDS)
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()  # what Flower's own cleanup does, unless Ctrl-C came while Ray was starting
    except Exception:  # Ray half-started or already gone: its processes end with this one
        pass


def last_checkpoint_round(run_dir: Path) -> int | None:
    """Return the round of the run's valid checkpoint (None when there is none)."""
    from fedlora.checkpoint import CheckpointError, read_checkpoint
    from server.resume import CHECKPOINT

    try:
        return int(read_checkpoint(run_dir / CHECKPOINT)["round"])
    except (CheckpointError, OSError, KeyError, TypeError, ValueError):
        return None


def exit_promptly(status: int, grace: float = GRACE_SECONDS) -> NoReturn:
    """End the process with ``status`` once the other threads ended (at most ``grace`` seconds).

    For a run that was interrupted or failed, after :func:`wind_down`: Python would wait for
    every non-daemon thread (a library thread still blocked on a cluster that was shut down
    kept an interrupted command alive for good) and then spend seconds finalising Ray's and
    torch's native state. Output and logs are flushed; Ray is already shut down.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, lambda signum, frame: os._exit(status))  # another Ctrl-C: leave now
    deadline = time.monotonic() + grace
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
