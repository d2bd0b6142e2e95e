"""The adapter naming contract: LoRA tensors are told apart by name, never by shape.

Every adapter that crosses a process boundary is an :data:`AdapterState`: a flat
``dict[str, torch.Tensor]`` keyed exactly as PEFT's ``get_peft_model_state_dict``
names tensors, e.g.::

    base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight   # A: r x d_in
    base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight   # B: d_out x r
    base_model.model.classifier.weight                                          # task head

This module is the only place that parses those names. Everything else (strategies,
privacy, export) asks it which tensors are A, which are B, and which module they belong
to. The low-rank update of one module is ``delta_W = (alpha / r) * B @ A``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

AdapterState = dict[str, torch.Tensor]

LORA_A = ".lora_A.weight"
LORA_B = ".lora_B.weight"


class AdapterError(ValueError):
    """An adapter state does not follow the naming or shape contract."""


def is_lora_a(name: str) -> bool:
    """Return True when ``name`` is a LoRA down-projection ``A`` (shape r x d_in)."""
    return name.endswith(LORA_A)


def is_lora_b(name: str) -> bool:
    """Return True when ``name`` is a LoRA up-projection ``B`` (shape d_out x r)."""
    return name.endswith(LORA_B)


def is_lora(name: str) -> bool:
    """Return True for either LoRA factor."""
    return is_lora_a(name) or is_lora_b(name)


def module_of(name: str) -> str:
    """Return the module prefix of a LoRA tensor name (the part before ``.lora_A``/``.lora_B``).

    Raises
    ------
    AdapterError
        If ``name`` is not a LoRA factor.
    """
    for suffix in (LORA_A, LORA_B):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    raise AdapterError(f"{name!r} is not a LoRA factor name (expected a '{LORA_A}' or '{LORA_B}' suffix)")


def a_name(module: str) -> str:
    """Return the tensor name of module ``module``'s A factor."""
    return module + LORA_A


def b_name(module: str) -> str:
    """Return the tensor name of module ``module``'s B factor."""
    return module + LORA_B


@dataclass(frozen=True)
class LoraPair:
    """The two factors of one adapted module: ``A`` is r x d_in, ``B`` is d_out x r."""

    a: torch.Tensor
    b: torch.Tensor

    @property
    def rank(self) -> int:
        """The LoRA rank r (rows of A, checked equal to columns of B)."""
        return int(self.a.shape[0])


def lora_modules(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Return the sorted module prefixes that have LoRA factors in ``state``."""
    return sorted({module_of(k) for k in state if is_lora(k)})


def split_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, LoraPair], AdapterState]:
    """Split an adapter state into per-module LoRA pairs and the remaining tensors (task head).

    Raises
    ------
    AdapterError
        If a module has only one of its two factors, or the factors' ranks disagree.
    """
    pairs: dict[str, LoraPair] = {}
    for module in lora_modules(state):
        a, b = state.get(a_name(module)), state.get(b_name(module))
        if a is None or b is None:
            missing = a_name(module) if a is None else b_name(module)
            raise AdapterError(f"adapter state has one LoRA factor of {module!r} but lacks {missing!r}")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"LoRA factors of {module!r} disagree: A is {tuple(a.shape)}, B is {tuple(b.shape)}; "
                "expected A: r x d_in and B: d_out x r"
            )
        pairs[module] = LoraPair(a=a, b=b)
    rest = {k: v for k, v in state.items() if not is_lora(k)}
    return pairs, rest


def join_state(pairs: Mapping[str, LoraPair], rest: Mapping[str, torch.Tensor] | None = None) -> AdapterState:
    """Inverse of :func:`split_state`."""
    out: AdapterState = {}
    for module, pair in pairs.items():
        out[a_name(module)] = pair.a
        out[b_name(module)] = pair.b
    out.update(rest or {})
    return out


def state_rank(state: Mapping[str, torch.Tensor]) -> int:
    """Return the common LoRA rank of ``state`` (0 when it has no LoRA factors).

    Raises
    ------
    AdapterError
        If modules have different ranks.
    """
    pairs, _ = split_state(state)
    ranks = {p.rank for p in pairs.values()}
    if len(ranks) > 1:
        raise AdapterError(
            f"adapter modules have different ranks {sorted(ranks)}; expected one rank per client"
        )
    return ranks.pop() if ranks else 0


def delta(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor]) -> AdapterState:
    """Return ``new - old`` for every tensor in ``new`` (an update as clients send it)."""
    missing = sorted(set(new) - set(old))
    if missing:
        raise AdapterError(f"cannot form an update: {missing[:3]} not in the reference state")
    return {k: new[k] - old[k] for k in new}


def apply_delta(base: Mapping[str, torch.Tensor], upd: Mapping[str, torch.Tensor]) -> AdapterState:
    """Return ``base + upd`` for every tensor of ``upd``; tensors only in ``base`` are copied."""
    out = {k: v.clone() for k, v in base.items()}
    for k, v in upd.items():
        if k not in out:
            raise AdapterError(f"update names {k!r}, which the reference state does not have")
        if out[k].shape != v.shape:
            raise AdapterError(
                f"update {k!r} has shape {tuple(v.shape)}, reference has {tuple(out[k].shape)}"
            )
        out[k] = out[k] + v
    return out


def num_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Return the payload size of ``state`` in bytes (element count times element size)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """Return a stable SHA-256 hex digest of ``state``.

    Tensors are hashed in sorted-name order as name, shape and little-endian float32 bytes,
    so the same values give the same digest on any machine, device or input dtype.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(repr(tuple(t.shape)).encode())
        h.update(np.ascontiguousarray(t.numpy(), dtype="<f4").tobytes())
    return h.hexdigest()
