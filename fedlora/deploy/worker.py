"""A node-local worker process that keeps the base model warm between rounds.

Flower 1.42 SuperNodes start a fresh ``flwr-clientapp`` process for every message, so
without help every round re-imports torch and reloads the base model. ``fedlora node``
therefore runs this worker next to the SuperNode: a long-lived process that serves
requests on a Unix socket, one at a time, with a request handler that caches the model
(``clients.worker:handle``). The ClientApp hands its round over and falls back to
training in-process when no worker answers.

Who may connect: the socket lives in a directory of mode 0700 owned by the node's user
(checked, not assumed), the socket itself is 0600, and every connection's peer uid
(``SO_PEERCRED``) must equal the worker's; anything else is refused before a byte is read.

Wire format (both directions): ``!I`` frame count, then per frame ``!Q`` length + bytes.
A reply's first frame is a JSON header ``{"ok": true}`` or ``{"ok": false, "type": ...,
"message": ...}``; a failed request leaves the worker serving (the next round is a new
request). This module is transport only; it knows nothing about Flower or torch.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import logging
import os
import socket
import stat
import struct
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

SOCKET_ENV = "FEDLORA_WORKER_SOCKET"
SOCKET_NAME = "worker.sock"
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux, 104 on macOS
MAX_FRAMES = 16
Handler = Callable[[list[bytes]], list[bytes]]


class WorkerUnavailable(ConnectionError):
    """No worker answered on the socket (none running, it died mid-request, or it refused us)."""


class WorkerError(RuntimeError):
    """The worker ran the request and it failed; ``kind`` is the exception type's name."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


# ---------------------------------------------------------------------- the socket's place


def socket_path_for(state_dir: Path) -> Path:
    """Return where a node with ``state_dir`` puts its worker socket.

    ``<state_dir>/worker/worker.sock`` when that path fits a Unix socket address;
    otherwise a directory under the system temp dir named after the state dir's hash.
    """
    state_dir = Path(state_dir).resolve()
    path = state_dir / "worker" / SOCKET_NAME
    if len(str(path)) <= MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"fedlora-worker-{os.getuid()}-{digest}" / SOCKET_NAME


def secure_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700, or check that an existing one is ours and private.

    Raises
    ------
    PermissionError
        If the directory is a symlink, belongs to another user, or others may open it.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise PermissionError(f"{path} is not a plain directory; remove it so the worker can create it.")
    if info.st_uid != os.getuid():
        raise PermissionError(
            f"{path} belongs to uid {info.st_uid}, not {os.getuid()}; use another state dir."
        )
    if info.st_mode & 0o077:
        raise PermissionError(
            f"{path} has mode {stat.S_IMODE(info.st_mode):o}; other users could reach the worker "
            f"socket. Run `chmod 700 {path}` or remove the directory."
        )
    return path


def peer_uid(conn: socket.socket) -> int:
    """Return the uid of the process at the other end of a Unix socket (Linux ``SO_PEERCRED``)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


# ---------------------------------------------------------------------- framing


def send_frames(conn: socket.socket, frames: Sequence[bytes]) -> None:
    """Send ``frames`` as one message."""
    conn.sendall(struct.pack("!I", len(frames)))
    for frame in frames:
        conn.sendall(struct.pack("!Q", len(frame)))
        conn.sendall(frame)


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError(f"connection closed with {left} of {size} bytes unread")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv_frames(conn: socket.socket) -> list[bytes]:
    """Receive one message sent by :func:`send_frames`."""
    (count,) = struct.unpack("!I", _recv_exact(conn, 4))
    if count > MAX_FRAMES:
        raise ConnectionError(f"a message of {count} frames (at most {MAX_FRAMES}): not a fedlora peer")
    return [_recv_exact(conn, struct.unpack("!Q", _recv_exact(conn, 8))[0]) for _ in range(count)]


# ---------------------------------------------------------------------- both ends


def call(path: Path | str, frames: Sequence[bytes]) -> list[bytes]:
    """Send a request to the worker at ``path`` and return its reply frames.

    Raises
    ------
    WorkerUnavailable
        If nobody listens there, or the worker died or refused before replying.
    WorkerError
        If the worker ran the request and it failed.
    """
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            conn.connect(str(path))
        except OSError as err:
            raise WorkerUnavailable(f"no worker on {path}: {err}") from err
        try:
            send_frames(conn, frames)
            reply = recv_frames(conn)
        except (OSError, struct.error) as err:
            raise WorkerUnavailable(f"the worker on {path} stopped before replying: {err}") from err
    finally:
        conn.close()
    header = json.loads(reply[0]) if reply else {}
    if not header.get("ok"):
        raise WorkerError(str(header.get("type", "Error")), str(header.get("message", header)))
    return reply[1:]


def serve(
    path: Path, handler: Handler, stop: threading.Event | None = None, ready: threading.Event | None = None
) -> None:
    """Serve requests on the Unix socket ``path`` until ``stop`` is set; set ``ready`` once listening.

    One request at a time (the model is shared); a handler exception becomes an error
    reply and the loop goes on. A stale socket file from a killed worker is replaced.
    """
    secure_dir(path.parent)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(path))
        os.chmod(path, 0o600)
        server.listen(8)
        server.settimeout(0.5)
        if ready is not None:
            ready.set()
        log.info("worker %d serving on %s", os.getpid(), path)
        while stop is None or not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                _serve_one(conn, handler)
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _serve_one(conn: socket.socket, handler: Handler) -> None:
    uid = peer_uid(conn)
    if uid != os.getuid():
        log.warning("refused a connection from uid %d (the worker runs as uid %d)", uid, os.getuid())
        return
    try:
        frames = recv_frames(conn)
    except (OSError, struct.error) as err:
        log.warning("dropped a malformed request: %s", err)
        return
    try:
        reply = [json.dumps({"ok": True}).encode(), *handler(frames)]
    except Exception as err:  # the worker outlives a failed round
        log.error("request failed:\n%s", traceback.format_exc())
        header = {"ok": False, "type": type(err).__name__, "message": str(err)}
        reply = [json.dumps(header).encode()]
    try:
        send_frames(conn, reply)
    except OSError as err:
        log.warning("could not send the reply (the ClientApp went away?): %s", err)


def load_handler(spec: str) -> Handler:
    """Import ``module:function``; call the module's ``warm()`` first if it has one."""
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    warm = getattr(module, "warm", None)
    if callable(warm):
        warm()
    return getattr(module, attr or "handle")


def worker_main(argv: list[str] | None = None) -> int:
    """Run ``python -m fedlora.deploy.worker --socket PATH [--handler MODULE:FUNC]``."""
    parser = argparse.ArgumentParser(prog="python -m fedlora.deploy.worker", description=__doc__)
    parser.add_argument("--socket", type=Path, required=True, help="Unix socket path (its dir becomes 0700)")
    parser.add_argument("--handler", default="clients.worker:handle", help="request handler, module:function")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    handler = load_handler(args.handler)
    serve(args.socket, handler)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
