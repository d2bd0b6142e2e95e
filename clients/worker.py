"""The node's warm worker: one long-lived process runs every ClientApp message of a SuperNode.

Flower 1.42 runs each message in a fresh ``flwr-clientapp`` process (its SuperExec starts one
per task), so on a real node every round re-imports flwr, torch and the app and reloads the
base model. ``flower-supernode --isolation process`` leaves running tasks to an external
SuperExec; :func:`serve` is that SuperExec for ClientApp tasks, and it runs them *here*:

1. it polls the SuperNode's Runtime API for a task (``AcquireTask``), signing the request with
   the node's SuperExec secret (Flower's HMAC ``--superexec-auth-secret-file``): only a
   process that can read that 0600 file can take the node's messages;
2. with the task's token it does what ``flwr-clientapp`` does, with Flower's own functions
   (pull message, context and app bundle; install the bundle; call the ``ClientApp``; push the
   reply and the context), but returns instead of exiting;
3. the ClientApp stays imported for the next task of the same app bundle (FAB), so
   :mod:`fedlora.models`' per-process cache keeps the base model loaded across rounds. A task
   of another bundle first drops the previous bundle's modules and imports the new one, so
   the node always runs the code the run shipped, as ``flwr-clientapp`` would.

A ClientApp exception becomes Flower's error reply, exactly as in ``flwr-clientapp``, and the
worker serves the next task. If the worker dies mid-task, Flower expires that task (the server
sees a failed reply); ``fedlora node`` starts a new worker. The privacy ledger is never only in
this process: it is in the node's ``state-dir`` and in Flower's ``context.state``.

:func:`round_metrics` adds ``clientapp-seconds`` (from the task's start to its reply) and, in a
worker, ``worker = 1`` and ``worker-rounds`` (train rounds this worker process has run) to a
reply. They are passed through environment variables because the bundle's modules are not this
module (the bundle's own ``clients.worker`` reads them).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import logging
import os
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from flwr.app import RecordDict

from fedlora.protocol import DP_MARKER

log = logging.getLogger(__name__)

TASK_START_ENV = "FEDLORA_TASK_START"  # set by the worker: time.time() when it took the task
ROUNDS_ENV = "FEDLORA_WORKER_ROUNDS"  # train rounds this worker process has run
ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"
POLL_S = 0.1  # pause between AcquireTask polls of the local Runtime API
PULL_FIRST_RETRY_S = 0.02  # first retry of a message object the SuperNode does not have yet
RETRY_S = 0.5  # pause after a failed poll (the SuperNode is starting or restarting)
# imported once at start, so even the first round does not pay for them
WARM_IMPORTS = ("torch", "transformers", "peft", "opacus")


# ---------------------------------------------------------------------- reply metrics (ClientApp side)


def round_metrics(reply: RecordDict) -> RecordDict:
    """Add ``clientapp-seconds`` (and, in a worker, ``worker``/``worker-rounds``) to a train reply's metrics.

    ``clientapp-seconds`` runs from the start of this ``flwr-clientapp`` process, or in a worker
    from the moment it took the task, to now: minus ``train-seconds`` it is what the round cost
    the node beyond training (process start, imports, model load, data).
    """
    start = os.environ.get(TASK_START_ENV)
    in_worker = start is not None
    if in_worker:
        os.environ[ROUNDS_ENV] = str(int(os.environ.get(ROUNDS_ENV, "0")) + 1)
    if "metrics" not in reply.metric_records:
        return reply
    metrics = reply.metric_records["metrics"]
    if DP_MARKER not in metrics:  # under record DP no timing leaves the node, declined rounds included
        metrics["clientapp-seconds"] = time.time() - (float(start) if in_worker else _process_start())
    if in_worker:
        metrics["worker"] = 1
        metrics["worker-rounds"] = int(os.environ.get(ROUNDS_ENV, "0"))
    return reply


def _process_start() -> float:
    """Return this process' start time (seconds since the epoch)."""
    import psutil

    return float(psutil.Process().create_time())


# ---------------------------------------------------------------------- app bundles


def bundle_top_names(app_dir: Path) -> set[str]:
    """Return the top-level module and package names an app bundle directory provides."""
    names = set()
    for entry in Path(app_dir).iterdir():
        if entry.is_dir() and (entry / "__init__.py").is_file():
            names.add(entry.name)
        elif entry.is_file() and entry.suffix == ".py":
            names.add(entry.stem)
    return names


def drop_modules(modules: MutableMapping[str, Any], top_names: set[str]) -> list[str]:
    """Remove every module under one of ``top_names`` from ``modules``; return the removed names.

    ``drop_modules(sys.modules, {"clients"})`` removes ``clients`` and ``clients.app``, not
    ``clientsx``.
    """
    gone = [name for name in modules if name.partition(".")[0] in top_names]
    for name in gone:
        del modules[name]
    return gone


class AppCache:
    """The ClientApp of the last app bundle this process ran, kept imported between tasks."""

    def __init__(self) -> None:
        self.fab_hash: str | None = None
        self.app_dir: Path | None = None
        self.app: Any = None

    def load(self, run: Any, fab: Any) -> Any:
        """Return the ClientApp of ``fab`` (installing and importing it unless it is the last one)."""
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.utils import get_load_client_app_fn
        from flwr.common.config import get_project_dir

        if fab.hash_str == self.fab_hash and self.app is not None:
            return self.app
        install_from_fab(fab.content, skip_prompt=True)
        app_dir = Path(get_project_dir(run.fab_id, run.fab_version, fab.hash_str)).absolute()
        # Forget the previous bundle (and any copy of these packages imported before the first
        # task), so that the new bundle's code is imported, not reused from sys.modules.
        tops = bundle_top_names(app_dir)
        if self.app_dir is not None:
            tops |= bundle_top_names(self.app_dir)
            while str(self.app_dir) in sys.path:
                sys.path.remove(str(self.app_dir))
        self.app = None
        dropped = drop_modules(sys.modules, tops)
        importlib.invalidate_caches()
        log.info(
            "loading app bundle %s (dropped %d modules of the previous one)", fab.hash_str[:12], len(dropped)
        )
        self.app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
            run.fab_id, run.fab_version, fab.hash_str
        )
        self.fab_hash, self.app_dir = fab.hash_str, app_dir
        return self.app


# ---------------------------------------------------------------------- one task


def retry_invoker(max_tries: int | None = None) -> Any:
    """Flower's HTTP retry policy for Runtime API calls, minus its exit on a refused call.

    Flower's own invoker (``make_simple_http_retry_invoker``) sends SIGINT to its process when
    the Runtime API answers 401, which ends a one-task ``flwr-clientapp`` process as intended;
    here it would end the worker and drop the warm model. Refusals (4xx) are raised to the
    caller instead; transport errors and 502/503/504 are retried with exponential back-off.
    """
    import httpx
    from flwr.common.constant import MAX_RETRY_DELAY
    from flwr.supercore.retry.retry_invoker import RetryInvoker, exponential

    def give_up(exc: Exception) -> bool:
        retryable = {httpx.codes.BAD_GATEWAY, httpx.codes.SERVICE_UNAVAILABLE, httpx.codes.GATEWAY_TIMEOUT}
        return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code not in retryable

    return RetryInvoker(
        wait_gen_factory=lambda: exponential(max_delay=MAX_RETRY_DELAY),
        recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
        max_tries=max_tries,
        max_time=None,
        should_giveup=give_up,
    )


def run_task(runtime_api_address: str, token: str, apps: AppCache) -> str:
    """Run one ClientApp task in this process, as ``flwr-clientapp`` would; return its sub-status."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    os.environ[TASK_START_ENV] = str(time.time())
    invoker = retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,
        root_certificates=None,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ],
        retry_invoker=invoker,
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message = reply = context = None
    sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    marks = [("start", time.perf_counter())]
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        marks.append(("pull", time.perf_counter()))
        app = apps.load(run, fab)
        marks.append(("load", time.perf_counter()))
        reply = app(message=message, context=context)
        marks.append(("run", time.perf_counter()))
        sub_status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # as flwr-clientapp: the error goes back to the server as the reply
        code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        details = f"{type(ex)}:<'{ex}'>"
        if isinstance(ex, LoadClientAppError):
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
            details = "An exception was raised when attempting to load `ClientApp`"
            apps.fab_hash = None  # import it afresh next time
        log.exception("ClientApp raised an exception")
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception:
            log.exception("failed to push the reply message")
        invoker.max_tries = 1  # as flwr-clientapp: do not hang on the final status
        push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        marks.append(("push", time.perf_counter()))
        log.info("task phases (s): %s", phase_seconds(marks))
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
        os.environ.pop(TASK_START_ENV, None)
    return str(sub_status)


def pull_task_input(client: Any) -> tuple[Any, Any, Any, Any]:
    """Pull the task's message, context, run and app bundle: Flower's ``pull_task_input``, polling faster.

    The SuperNode offers a task as soon as the message's metadata arrives and pulls its
    content from the SuperLink afterwards. ``flwr-clientapp`` needs seconds to start, so by
    then the content is there; a warm worker asks at once, and Flower's first retry would come
    only after 1 s (``PULL_INITIAL_BACKOFF``). Here retries start after 20 ms and double up to
    1 s, for at most Flower's ``PULL_MAX_TIME``.
    """
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
    from flwr.supercore.constant import PULL_MAX_TIME
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    run = run_from_proto(res.run)
    fab = fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        max_time=PULL_MAX_TIME,
        max_tries_per_object=PULL_MAX_TIME * 50,  # bounded by max_time, not by a count
        initial_backoff=PULL_FIRST_RETRY_S,
        backoff_cap=1.0,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower does: not in the content
    return message, context, run, fab


def phase_seconds(marks: list[tuple[str, float]]) -> str:
    """Format ``[(name, time), ...]`` as the seconds between consecutive marks.

    ``phase_seconds([("start", 0.0), ("pull", 0.25), ("run", 1.0)])`` is ``"pull 0.250 run 0.750"``.
    """
    return " ".join(f"{name} {t - prev:.3f}" for (_, prev), (name, t) in itertools.pairwise(marks))


# ---------------------------------------------------------------------- the loop


def serve(runtime_api_address: str, secret: bytes, max_tasks: int | None = None) -> int:
    """Acquire ClientApp tasks from the SuperNode's Runtime API and run them here, forever.

    Returns the number of tasks run (only when ``max_tasks`` is reached; used by tests).
    """
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,
        root_certificates=None,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="SuperExec"),
            SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE_METHOD}),
        ],
        retry_invoker=retry_invoker(max_tries=1),  # the loop below retries
    )
    apps, done = AppCache(), 0
    log.info("worker %d serving ClientApp tasks of the SuperNode at %s", os.getpid(), runtime_api_address)
    while max_tasks is None or done < max_tasks:
        try:
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        except Exception as err:  # the SuperNode is not up yet, restarting, or refuses our secret
            refused = getattr(getattr(err, "response", None), "status_code", 0) in (401, 403)
            (log.error if refused else log.debug)("AcquireTask failed: %s", err)
            time.sleep(RETRY_S)
            continue
        if res.HasField("task") and res.token:
            log.info("task %d (run %d) acquired", res.task.task_id, res.task.run_id)
            status = run_task(runtime_api_address, res.token, apps)
            done += 1
            log.info("task %d (run %d): %s", res.task.task_id, res.task.run_id, status)
        else:
            time.sleep(POLL_S)
    client.close()
    return done


def warm_imports(names: tuple[str, ...] = WARM_IMPORTS) -> None:
    """Import the heavy third-party libraries the ClientApp needs (those that are installed)."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            log.warning("could not pre-import %s; the first task will import what it needs", name)


def worker_main(argv: list[str] | None = None) -> int:
    """``python -m clients.worker --runtime-api-address HOST:PORT --superexec-auth-secret-file F``."""
    parser = argparse.ArgumentParser(prog="python -m clients.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runtime-api-address", required=True, help="the SuperNode's Runtime API (host:port)"
    )
    parser.add_argument(
        "--superexec-auth-secret-file", type=Path, required=True, help="the node's SuperExec secret"
    )
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process exits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per poll
    secret = args.superexec_auth_secret_file.read_bytes()
    if not secret:
        parser.error(f"{args.superexec_auth_secret_file} is empty; fedlora node writes a random secret there")
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)
    warm_imports()
    serve(args.runtime_api_address, secret)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
