"""What ``fedlora simulate`` refuses before anything loads, in about the time Python takes to start.

A Ray address nobody answers at, a model that cannot be found, LoRA target modules the model
does not have, an unknown strategy: each is checked by opening one socket or reading one small
file (a model's ``config.json``, the header of its safetensors files), never by importing
transformers or peft or loading data, so a refused command ends within seconds and leaves
nothing behind (the run directory is created only once every check passed).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

from fedlora.config import ConfigError, RunConfig
from fedlora.modelstore import ModelError, resolve_model_path

# Seconds a refusal may wait for a host that does not answer.
CONNECT_TIMEOUT = 3.0
# Ray's default ports: the GCS of `ray start --head`, and the Ray Client server (ray://).
RAY_GCS_PORT = 6379
RAY_CLIENT_PORT = 10001


class ClusterError(ConfigError):
    """``--ray-address`` names no Ray cluster that answers; the message says what to do."""


def check_runnable(cfg: RunConfig, ray_address: str | None = None) -> None:
    """Refuse what cannot run before any data loads or Ray starts.

    Raises
    ------
    ValueError
        :class:`ClusterError` for ``ray_address``, ``ModelError`` for the model or its
        target modules, ``RegistryError`` for the strategy (listing the valid names).
    """
    if ray_address:
        check_ray_address(ray_address)
    path = check_model(cfg.model.name)
    if cfg.lora.target_modules:
        check_target_modules(cfg.model.name, path, cfg.lora.target_modules)
    from strategies.registry import create  # imports torch: last, after the checks that need nothing

    create(cfg.federation.strategy, **dict(cfg.federation.strategy_params))


# --------------------------------------------------------------------------- Ray


def check_ray_address(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Refuse ``address`` (``host:port``, ``ray://host:port`` or ``auto``) when nothing answers there.

    Raises
    ------
    ClusterError
        When no cluster is found (``auto``) or the address does not accept a connection.
    """
    target = _auto_address() if address == "auto" else address
    host, port = _host_port(target)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
        reason = "" if target.startswith("ray://") else _gcs_refusal(f"{host}:{port}", timeout)
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
    if reason:
        raise ClusterError(
            f"--ray-address {address}: no Ray cluster answers at {host}:{port} ({reason}); start one there "
            f"with `ray start --head --port={port}`, or leave out --ray-address to run Ray on this machine"
        )


def _gcs_refusal(address: str, timeout: float) -> str:
    """Return why the Ray GCS at ``address`` does not answer ("" when it does, or cannot be asked).

    Something that accepts connections (a proxy, another service) is not yet a Ray cluster:
    ``ray.init`` would retry it for minutes. Ray's own client asks for the cluster id once,
    with its C++ warnings kept off the console.
    """
    try:
        from ray._raylet import InnerGcsClient
    except ImportError:
        return ""
    with _stderr_silenced():
        try:
            InnerGcsClient.standalone(address, None, int(timeout * 1000))
        except (AttributeError, TypeError):  # another Ray version: ray.init reports it
            return ""
        except Exception as err:
            return f"not a Ray cluster: {str(err).splitlines()[0][:120]}"
    return ""


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for the block (native libraries write there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _auto_address() -> str:
    """Return the address ``ray.init(address="auto")`` joins: ``RAY_ADDRESS``, else the last ``ray start``."""
    env = os.environ.get("RAY_ADDRESS", "")
    if env and env != "auto":
        return env
    try:
        from ray._private.services import canonicalize_bootstrap_address

        found = canonicalize_bootstrap_address("auto")
    except Exception:  # ray's own search failed: no cluster on this machine
        found = None
    if not found:
        raise ClusterError(
            "--ray-address auto: no Ray cluster was started on this machine; start one with "
            "`ray start --head`, or leave out --ray-address to run Ray on this machine"
        )
    return found


def _host_port(address: str) -> tuple[str, int]:
    """Split ``[ray://]host[:port]`` (IPv6 hosts in brackets) into host and port."""
    client = address.startswith("ray://")
    rest = address.removeprefix("ray://").rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or host.endswith(":") or (rest.startswith("[") and not host.endswith("]")):
        host, port = rest, ""
    host = host.strip("[]")
    if not host:
        raise ClusterError(f"--ray-address {address!r}: expected HOST:PORT, e.g. 10.0.0.5:6379, or 'auto'")
    if not port:
        return host, RAY_CLIENT_PORT if client else RAY_GCS_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterError(f"--ray-address {address!r}: port {port!r} is not a port number (1..65535)")
    return host, int(port)


# --------------------------------------------------------------------------- model


def check_model(name: str) -> str:
    """Return the model's directory (or hub id) once it is known to exist; refuse it otherwise.

    A local directory needs a ``config.json`` naming its ``model_type``; a hub id needs to be in
    the Hugging Face cache or the hub to be reachable.

    Raises
    ------
    ModelError
        Saying what a model name may be.
    """
    path = resolve_model_path(name)
    local = Path(path).expanduser()
    if local.is_dir():
        try:
            config = json.loads((local / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ModelError(f"model directory {path!r} cannot be loaded: config.json: {err}") from err
        if not isinstance(config, dict) or not config.get("model_type"):
            raise ModelError(
                f"model directory {path!r} cannot be loaded: its config.json names no model_type; "
                "pass a Hugging Face model directory"
            )
        return path
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(path, "config.json"), str):
        return path
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false") or not _hub_reachable():
        raise ModelError(
            f"model {name!r} is neither 'minilm' (the packaged model), a local model "
            "directory, nor a hub id in the Hugging Face cache, and huggingface.co cannot be reached; "
            "pass --model minilm or a local Hugging Face model directory"
        )
    return path


def _hub_reachable(timeout: float = CONNECT_TIMEOUT) -> bool:
    """Return whether huggingface.co resolves and accepts a connection (hub downloads would work)."""
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def check_target_modules(name: str, path: str, targets: tuple[str, ...] | list[str]) -> None:
    """Refuse LoRA target modules that name no layer of the model (PEFT's suffix match).

    The layer names come from the headers of the model's safetensors files; a model without
    them (a hub id not yet downloaded, ``pytorch_model.bin`` only) is checked when it loads.

    Raises
    ------
    ModelError
        Naming the targets that match nothing and the layers the model has.
    """
    modules = weight_modules(Path(path))
    if not modules:
        return
    missing = [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]
    if not missing:
        return
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    raise ModelError(
        f"lora.target_modules {', '.join(map(repr, missing))} name no layer of model {name!r}; its layers "
        f"are named {', '.join(leaves[:16])}{' ...' if len(leaves) > 16 else ''}: set e.g. "
        f"--set lora.target_modules=... to some of them, or leave it empty to detect them"
    )


def weight_modules(model_dir: Path) -> set[str]:
    """Return the names of the modules holding the weights in ``model_dir``'s safetensors files.

    Reads only each file's JSON header (8-byte length, then the tensor table).
    """
    files = sorted(model_dir.glob("*.safetensors")) if model_dir.is_dir() else []
    modules: set[str] = set()
    for file in files:
        try:
            with file.open("rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
        except (OSError, ValueError, struct.error):
            return set()
        modules.update(k.rsplit(".", 1)[0] for k in header if k != "__metadata__" and "." in k)
    return modules
