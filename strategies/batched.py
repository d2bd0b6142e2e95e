"""The per-module aggregation loop shared by FlexLoRA, HetLoRA and LoRA-FAIR, batched by shape.

Methods that aggregate each LoRA module on its own (an SVD, norm weights, an optimiser) spend
most of their time in per-module Python and BLAS call overhead when a model has hundreds of
modules (Llama-7B: 32 layers x q,k,v,o). Here modules that share a shape (and client ranks) are
stacked along a leading axis and handed to the method's math as one batch, so LAPACK/BLAS run
batched calls and elementwise work is vectorised. Batches are capped in bytes, which bounds peak
memory, and each runs under a thread policy chosen by matrix size (one thread for small
matrices, where waking threads costs more than the work; every thread for large ones).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedlora.adapters import AdapterState, LoraPair, join_state, split_state
from strategies.base import ClientResult
from strategies.common import StrategyError, average_rest, result_pairs

# Work (multiply-adds) of one BLAS/LAPACK call below which it runs on one thread: waking
# OpenMP threads costs more than such a call (measured ~1 ms per call on a busy 2-core machine).
SMALL_WORK = 1 << 24
# Upper bound on the bytes of stacked client factors aggregated at once; bounds peak memory
# (7B shape: 10 clients x 128 modules x 512 KiB = 640 MiB would otherwise be copied in one go).
MAX_BATCH_BYTES = 64 << 20


def policy_threads(work: int, available: int | None = None) -> int:
    """Return the torch thread count for calls of ``work`` multiply-adds each.

    One thread for small calls. Large calls get every thread torch was given (``available``,
    default the current count) while the machine has idle cores; when the 1-minute load average
    already fills every core, extra OpenMP threads only wait on each other (measured on 2 busy
    cores: a batched 4096 x 160 QR ran 5x slower on 2 threads than on 1), so they get one.
    """
    available = available or torch.get_num_threads()
    if work < SMALL_WORK or available == 1:
        return 1
    cores = os.cpu_count() or 1
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return available if busy < cores else 1


@contextlib.contextmanager
def thread_policy(work: int) -> Iterator[int]:
    """Run the block with :func:`policy_threads` ``(work)`` torch threads; restore the count after.

    Yields the thread count in effect.
    """
    before = torch.get_num_threads()
    n = policy_threads(work, before)
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Return float64 if any of ``tensors`` is float64, else float32 (half types compute in float32).

    Real adapters are float32, and float32 LAPACK/BLAS is twice as fast; tests that pass float64
    factors keep float64 precision end to end.
    """
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@dataclass(frozen=True)
class ModuleBatch:
    """``M`` modules of one shape, each client's factors stacked along a leading module axis.

    Attributes
    ----------
    modules
        The ``M`` module names, in the order of the leading axis.
    a, b
        Per client ``k``: ``a[k]`` is M x r_k x d_in, ``b[k]`` is M x d_out x r_k (compute dtype).
    prev_a, prev_b
        The global factors, M x R x d_in and M x d_out x R (compute dtype).
    """

    modules: tuple[str, ...]
    a: tuple[torch.Tensor, ...]
    b: tuple[torch.Tensor, ...]
    prev_a: torch.Tensor
    prev_b: torch.Tensor

    @property
    def rank(self) -> int:
        """The global rank ``R``."""
        return int(self.prev_a.shape[1])


BatchFn = Callable[[ModuleBatch], tuple[torch.Tensor, torch.Tensor]]


def _shape_key(pairs: Sequence[LoraPair], g: LoraPair) -> tuple:
    return (tuple(g.a.shape), tuple(g.b.shape), *((tuple(p.a.shape), tuple(p.b.shape)) for p in pairs))


def module_batches(
    global_pairs: Mapping[str, LoraPair],
    client_pairs: Sequence[Mapping[str, LoraPair]],
    dtype: torch.dtype,
    max_bytes: int = MAX_BATCH_BYTES,
) -> Iterator[ModuleBatch]:
    """Yield the modules grouped by shape (client ranks included) in batches of at most ``max_bytes``.

    Raises
    ------
    StrategyError
        If a client result lacks a module of the global state.
    """
    groups: dict[tuple, list[str]] = {}
    for module, g in global_pairs.items():
        missing = [i for i, cp in enumerate(client_pairs) if module not in cp]
        if missing:
            raise StrategyError(f"client results {missing} lack the LoRA factors of module {module!r}")
        groups.setdefault(_shape_key([cp[module] for cp in client_pairs], g), []).append(module)
    for modules in groups.values():
        first = [cp[modules[0]] for cp in client_pairs]
        per_module = sum(p.a.numel() + p.b.numel() for p in first) * torch.finfo(dtype).bits // 8
        step = max(1, max_bytes // max(1, per_module))
        for i in range(0, len(modules), step):
            chunk = modules[i : i + step]
            yield ModuleBatch(
                modules=tuple(chunk),
                a=tuple(torch.stack([cp[m].a for m in chunk]).to(dtype) for cp in client_pairs),
                b=tuple(torch.stack([cp[m].b for m in chunk]).to(dtype) for cp in client_pairs),
                prev_a=torch.stack([global_pairs[m].a for m in chunk]).to(dtype),
                prev_b=torch.stack([global_pairs[m].b for m in chunk]).to(dtype),
            )


def aggregate_modules(
    state: AdapterState,
    results: Sequence[ClientResult],
    fn: BatchFn,
    rest_weights: torch.Tensor,
    dtype: torch.dtype | None = None,
    max_bytes: int = MAX_BATCH_BYTES,
) -> AdapterState:
    """Return the next global state: ``fn`` on every batch of same-shape modules, head FedAvg'd.

    The loop shared by FlexLoRA, HetLoRA and LoRA-FAIR. ``fn`` maps a :class:`ModuleBatch` to the
    new global ``(A, B)`` batches (M x R x d_in, M x d_out x R) and picks its threads with
    :func:`thread_policy` by the size of its calls. Outputs keep ``state``'s names, order and
    dtypes; non-LoRA tensors are averaged with ``rest_weights``. Inputs are not modified.

    Parameters
    ----------
    dtype
        Compute dtype; default :func:`compute_dtype` of the global and client factors.
    max_bytes
        Cap on the stacked client factors of one batch (see :func:`module_batches`).
    """
    client_pairs = result_pairs(results)
    global_pairs, _ = split_state(state)
    if dtype is None:
        dtype = compute_dtype(
            *(t for g in global_pairs.values() for t in (g.a, g.b)),
            *(t for cp in client_pairs for p in cp.values() for t in (p.a, p.b)),
        )
    out: dict[str, LoraPair] = {}
    for batch in module_batches(global_pairs, client_pairs, dtype, max_bytes):
        new_a, new_b = fn(batch)
        for i, module in enumerate(batch.modules):
            g = global_pairs[module]
            out[module] = LoraPair(a=new_a[i].to(g.a.dtype, copy=True), b=new_b[i].to(g.b.dtype, copy=True))
    new = join_state(out, average_rest([r.state for r in results], rest_weights, state))
    return {k: new[k] for k in state}
