"""Randomness for DP mechanisms: from OS entropy on the party that applies the mechanism.

A DP guarantee holds only against an adversary who cannot predict the noise or the sample.
A generator seeded from the run config (which every client receives) or whose state is
saved in a checkpoint lets anyone who sees those regenerate the noise and subtract it.
So every DP draw in fedlora comes from a generator seeded with 64 fresh bits of
``os.urandom`` at the moment it is built (fresh per process and per resume), and its state
is never written to any artifact or message. Seeds from the run config apply only with DP
off (reproducible runs).

What this does not give: the generators are torch's Mersenne Twister / Philox and
Python's ``SystemRandom`` (the OS CSPRNG, used directly); Opacus' ``secure_mode``
(torchcsprng plus its floating-point mitigations against e.g. the Mironov 2012 attack on
floating-point Laplace/Gaussian samplers) is not available with the pinned torch. See
``docs/privacy.md`` ("Threat model").
"""

from __future__ import annotations

import os
import random

import torch


def entropy_seed() -> int:
    """Return a fresh 63-bit seed from ``os.urandom`` (never logged, never stored)."""
    return int.from_bytes(os.urandom(8), "little") >> 1


def entropy_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """Return a ``torch.Generator`` on ``device`` seeded from OS entropy.

    Build one per mechanism and process; never checkpoint its state.
    """
    return torch.Generator(device=device).manual_seed(entropy_seed())


def system_random() -> random.SystemRandom:
    """Return Python's ``SystemRandom`` (OS CSPRNG) for sampling who takes part in a round."""
    return random.SystemRandom()
