"""The per-module aggregation loop shared by FlexLoRA, HetLoRA and LoRA-FAIR, batched by shape.

Methods that aggregate each LoRA module on its own (an SVD, norm weights, an optimiser) spend
most of their time in per-module Python and BLAS call overhead when a model has hundreds of
modules (Llama-7B: 32 layers x q,k,v,o). Here modules that share a shape (and client ranks) are
stacked along a leading axis and handed to the method's math as one batch, so LAPACK/BLAS run
batched calls and elementwise work is vectorised. Batches are capped in bytes, which bounds peak
memory. Every torch call of the loop runs on one thread; where the work is large, the threads
the caller had work on independent modules in parallel (:func:`map_chunks`). The choice depends
on the work alone, never on the machine's load.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from fedlora.adapters import AdapterState, LoraPair, join_state, split_state
from strategies.base import ClientResult
from strategies.common import StrategyError, average_rest, result_pairs

# Work (multiply-adds) of one BLAS/LAPACK call below which it runs on one thread: waking
# OpenMP threads costs more than such a call (measured ~1 ms per call on a busy 2-core machine).
SMALL_WORK = 1 << 24
# Upper bound on the bytes of stacked client factors aggregated at once; bounds peak memory
# (7B shape: 10 clients x 128 modules x 512 KiB = 640 MiB would otherwise be copied in one go).
MAX_BATCH_BYTES = 32 << 20

T = TypeVar("T")

# Inside aggregate_modules: the torch thread count the caller had, which module-parallel workers
# share out (the loop itself runs its calls on one thread each; see aggregate_modules).
_WORKERS: contextvars.ContextVar[int | None] = contextvars.ContextVar("fedlora_batched_workers", default=None)


def policy_threads(work: int, available: int | None = None) -> int:
    """Return the thread count for calls (or independent chunks) of ``work`` multiply-adds each.

    One thread for small work, where waking threads costs more than the work; ``available`` for
    large work. ``available`` defaults to the thread count torch had when the enclosing
    :func:`aggregate_modules` began (outside it, torch's current count). The choice depends on
    the work and that count only, never on the machine's load, so an input runs the same way on
    every call.
    """
    if available is None:
        available = _WORKERS.get() or torch.get_num_threads()
    return 1 if work < SMALL_WORK else available


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


def map_chunks(fn: Callable[[int, int], T], total: int, chunk: int, workers: int) -> list[T]:
    """Return ``[fn(lo, hi) for each chunk [lo, hi) of range(total)]``, in order, on ``workers`` threads.

    Modules are independent, so the parallelism that scales here is across them: chunks run on
    separate Python threads with one torch thread each (torch releases the GIL inside its
    kernels), and never wait on each other. OpenMP threads inside each call instead meet at a
    barrier after every call: for LoRA-FAIR's thousands of small elementwise passes that costs
    more than it saves, and on a busy machine a barrier waits for a descheduled thread. Pass
    ``workers =`` :func:`policy_threads` ``(work)``; with one worker the chunks run in a plain
    loop on one thread. Each chunk is computed the same way whatever ``workers`` is, so results
    do not depend on it.
    """
    bounds = [(lo, min(lo + chunk, total)) for lo in range(0, total, max(1, chunk))]
    workers = min(workers, len(bounds))
    if workers <= 1:
        with thread_policy(0):
            return [fn(lo, hi) for lo, hi in bounds]

    def run(lo: int, hi: int) -> T:
        torch.set_num_threads(1)  # this worker's own intra-op count (the caller's is restored below)
        return fn(lo, hi)

    before = torch.get_num_threads()
    try:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            return list(pool.map(run, *zip(*bounds, strict=True)))
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
    """``M`` modules of one shape, the clients' factors concatenated along the rank axis.

    ``b_cat @ a_cat`` is ``sum_k B_k A_k`` per module (no weights or scales applied): the form
    in which FlexLoRA and LoRA-FAIR use the factors, built with one copy of each client factor.
    ``B_cat`` is stored transposed (``bt_cat``, M x m x d_out), so that every client's block of
    either factor is one contiguous slab per module (BLAS reads ``b_cat`` transposed for free).

    Attributes
    ----------
    modules
        The ``M`` module names, in the order of the leading axis.
    a_cat, bt_cat
        M x m x d_in and M x m x d_out (compute dtype), ``m = sum_k r_k``: client ``k``'s ``A_k``
        and ``B_k^T`` are the rows ``r_0 + ... + r_{k-1}`` onwards (client order).
    ranks
        The clients' ranks ``r_k``.
    prev_a, prev_b
        The global factors, M x R x d_in and M x d_out x R (compute dtype).
    """

    modules: tuple[str, ...]
    a_cat: torch.Tensor
    bt_cat: torch.Tensor
    ranks: tuple[int, ...]
    prev_a: torch.Tensor
    prev_b: torch.Tensor

    @classmethod
    def from_clients(
        cls,
        modules: Sequence[str],
        a: Sequence[torch.Tensor],
        b: Sequence[torch.Tensor],
        prev_a: torch.Tensor,
        prev_b: torch.Tensor,
    ) -> ModuleBatch:
        """Build a batch from per-client stacks ``a[k]`` (M x r_k x d_in) and ``b[k]`` (M x d_out x r_k)."""
        return cls(
            modules=tuple(modules),
            a_cat=torch.cat(list(a), dim=-2),
            bt_cat=torch.cat([x.mT for x in b], dim=-2),
            ranks=tuple(int(x.shape[-2]) for x in a),
            prev_a=prev_a,
            prev_b=prev_b,
        )

    @property
    def b_cat(self) -> torch.Tensor:
        """``B_cat``: M x d_out x m (a transposed view of ``bt_cat``)."""
        return self.bt_cat.mT

    @property
    def rank(self) -> int:
        """The global rank ``R``."""
        return int(self.prev_a.shape[1])

    def _bounds(self) -> list[tuple[int, int]]:
        ends = [sum(self.ranks[: k + 1]) for k in range(len(self.ranks))]
        return [(e - r, e) for e, r in zip(ends, self.ranks, strict=True)]

    @property
    def a(self) -> tuple[torch.Tensor, ...]:
        """Per client ``k``: ``A_k`` batches, M x r_k x d_in (views of ``a_cat``)."""
        return tuple(self.a_cat[:, lo:hi] for lo, hi in self._bounds())

    @property
    def b(self) -> tuple[torch.Tensor, ...]:
        """Per client ``k``: ``B_k`` batches, M x d_out x r_k (transposed views of ``bt_cat``)."""
        return tuple(self.bt_cat[:, lo:hi].mT for lo, hi in self._bounds())


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

    Each client factor is copied once, straight into the batch's concatenated tensors, on one
    thread (copies are memory-bound: extra threads only contend).

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
        ranks = tuple(int(p.a.shape[0]) for p in first)
        (d_out, _), d_in = first[0].b.shape, first[0].a.shape[1]
        for i in range(0, len(modules), step):
            chunk = modules[i : i + step]
            with thread_policy(0):  # the copies only; the consumer picks its own threads
                a_cat = torch.empty(len(chunk), sum(ranks), d_in, dtype=dtype)
                bt_cat = torch.empty(len(chunk), sum(ranks), d_out, dtype=dtype)
                for j, m in enumerate(chunk):
                    torch.cat([cp[m].a.to(dtype) for cp in client_pairs], dim=0, out=a_cat[j])
                    torch.cat([cp[m].b.to(dtype).T for cp in client_pairs], dim=0, out=bt_cat[j])
                prev_a = torch.stack([global_pairs[m].a for m in chunk]).to(dtype)
                prev_b = torch.stack([global_pairs[m].b for m in chunk]).to(dtype)
            yield ModuleBatch(tuple(chunk), a_cat, bt_cat, ranks, prev_a, prev_b)


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
    new global ``(A, B)`` batches (M x R x d_in, M x d_out x R). Outputs keep ``state``'s names,
    order and dtypes; non-LoRA tensors are averaged with ``rest_weights``. Inputs are not modified.

    Threads: the loop runs every torch call on one thread, and the thread count the caller had
    goes to module-parallel workers (:func:`map_chunks` with ``workers =``
    :func:`policy_threads` ``(work)``), which never wait on each other. OpenMP threads inside one
    call meet at a barrier after it, and on a machine whose cores are busy with other work a
    barrier waits for a descheduled thread: on this project's shared 2-core machine (load average
    5-7) the float32 reference QR+SVD of ``benchmarks/aggregation.py`` took 18 s on 2 threads
    against 0.9 s on one, for 32 modules at Llama-7B shape.

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
    token = _WORKERS.set(_WORKERS.get() or torch.get_num_threads())
    try:
        with thread_policy(0):  # one thread per call; modules in parallel (map_chunks) where large
            for batch in module_batches(global_pairs, client_pairs, dtype, max_bytes):
                new_a, new_b = fn(batch)
                for i, module in enumerate(batch.modules):
                    g = global_pairs[module]
                    out[module] = LoraPair(
                        a=new_a[i].to(g.a.dtype, copy=True, memory_format=torch.contiguous_format),
                        b=new_b[i].to(g.b.dtype, copy=True, memory_format=torch.contiguous_format),
                    )
            new = join_state(out, average_rest([r.state for r in results], rest_weights, state))
    finally:
        _WORKERS.reset(token)
    return {k: new[k] for k in state}
