"""A Flower ``Grid`` that polls for replies every fraction of a second instead of every 3 s.

Flower 1.42's deployment grid implements ``send_and_receive`` as push, then pull every 3 s
until all replies are in (``flwr/superlink/grid/http_grid.py``): a round whose last reply
arrives just after a pull waits up to 3 s more, about 1.5 s on average, for nothing.
:class:`PollingGrid` wraps any grid and implements ``send_and_receive`` with the same
push-then-pull semantics at a short interval (default :data:`DEFAULT_POLL_SECONDS`). Every
other call goes to the wrapped grid unchanged. Subclasses observe the replies through
:meth:`PollingGrid.on_push`, :meth:`PollingGrid.on_reply` and :meth:`PollingGrid.on_done`
(the simulation console's progress line does). fedlora's ServerApp wraps every grid that
is not already a ``PollingGrid``, so a wrapper that overrides ``send_and_receive`` itself
(to meter or log it) must subclass ``PollingGrid``, or its override is bypassed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.run import Run

DEFAULT_POLL_SECONDS = 0.1


class PollingGrid(Grid):
    """A ``Grid`` whose ``send_and_receive`` pulls replies every ``poll`` seconds.

    Parameters
    ----------
    inner
        The grid Flower handed to the ServerApp.
    poll
        Seconds between two pulls while replies are missing; must be positive.
    """

    def __init__(self, inner: Grid, poll: float = DEFAULT_POLL_SECONDS) -> None:
        if not poll > 0:
            raise ValueError(f"grid poll interval must be positive seconds, got {poll!r}")
        self.inner, self.poll = inner, poll

    def set_run(self, run: Run) -> None:  # noqa: D102 - Grid API
        self.inner.set_run(run)

    @property
    def run(self) -> Run:  # noqa: D102 - Grid API
        return self.inner.run

    def create_message(self, *args: object, **kwargs: object) -> Message:  # noqa: D102 - Grid API
        return self.inner.create_message(*args, **kwargs)  # type: ignore[arg-type]

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102 - Grid API
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102 - Grid API
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102 - Grid API
        return self.inner.pull_messages(message_ids)

    def on_push(self, messages: list[Message]) -> None:
        """Observe the messages about to be pushed (not called when there are none)."""

    def on_reply(self, received: int) -> None:
        """Observe a pull that brought replies; ``received`` counts all replies so far."""

    def on_done(self, received: int) -> None:
        """Observe the end of ``send_and_receive`` (all replies in, or the timeout passed)."""

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``, then pull replies until all arrived or ``timeout`` seconds passed."""
        msgs = list(messages)
        if not msgs:
            return []
        self.on_push(msgs)
        pending = set(self.inner.push_messages(msgs))
        end = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while pending and (timeout is None or time.monotonic() < end):
            got = list(self.inner.pull_messages(pending))
            if got:
                replies.extend(got)
                pending.difference_update(m.metadata.reply_to_message_id for m in got)
                self.on_reply(len(replies))
            if pending:
                time.sleep(self.poll)
        self.on_done(len(replies))
        return replies
