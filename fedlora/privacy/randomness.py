"""Randomness for DP mechanisms: a ChaCha20 keystream keyed with 256 bits of OS entropy.

A DP guarantee holds only against an adversary who cannot predict the noise or the sample.
A generator seeded from the run config (which every client receives), or whose state is
saved in a checkpoint, lets anyone who sees those regenerate the noise and subtract it. A
generator with a small key does the same after a brute-force search: torch's CPU generator
(mt19937) keeps only the low 32 bits of ``manual_seed``, so ``manual_seed(s)`` and
``manual_seed(s ^ (k << 32))`` give one stream, and 2^32 candidates are an afternoon on a GPU.

So every DP random value in fedlora (DP-SGD noise, Poisson sampling masks, client-level DP
noise) comes from :class:`SecureRandom`: the ChaCha20 stream cipher (RFC 8439, through the
``cryptography`` package's OpenSSL binding) run as a keystream generator, keyed with 256 fresh
bits of ``os.urandom`` when it is built (fresh per process, per round and per resume). Every
key bit reaches the stream; the key is never logged, stored, sent or checkpointed. Client
sampling uses Python's ``SystemRandom`` (the OS CSPRNG directly). Seeds from the run config
apply only with DP off (reproducible runs).

Everything this module returns is built from exact integer operations on the keystream
(uniform 64-bit words, rejection sampling for uniform integers below a bound, Bernoulli trials
by comparing a word with ``floor(p * 2^64)``), so no floating-point sampler stands between the
key and the DP mechanism; :mod:`fedlora.privacy.noise` turns these into discrete Gaussian noise.
"""

from __future__ import annotations

import os
import random

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

KEY_BYTES = 32
"""256-bit ChaCha20 key: the security level of every DP draw (at least 128 bits are required)."""

_TWO64 = 1 << 64


class SecureRandom:
    """A cryptographically secure generator: the ChaCha20 keystream under a 256-bit key.

    Parameters
    ----------
    key
        ``None`` (the default, and the only sound choice for a DP mechanism) draws 32 bytes
        from ``os.urandom``. Tests of the samplers may pass a fixed 32-byte key to get a
        reproducible stream; nothing in fedlora passes one outside tests.

    Notes
    -----
    Not thread-safe (one instance per mechanism and process). The key is kept only inside the
    cipher context and is not an attribute of this object.
    """

    def __init__(self, key: bytes | None = None) -> None:
        if key is None:
            key = os.urandom(KEY_BYTES)
        if not isinstance(key, bytes | bytearray) or len(key) != KEY_BYTES:
            raise ValueError(f"SecureRandom needs a {KEY_BYTES}-byte key (or None for fresh OS entropy)")
        # 16-byte nonce = 4-byte block counter + 12-byte nonce (RFC 7539 layout); one key, one stream.
        self._stream = Cipher(algorithms.ChaCha20(bytes(key), b"\x00" * 16), mode=None).encryptor()
        self.bytes_drawn = 0

    def random_bytes(self, n: int) -> bytes:
        """Return the next ``n`` bytes of the keystream."""
        if n < 0:
            raise ValueError(f"n={n!r} must be >= 0")
        self.bytes_drawn += n
        return self._stream.update(bytes(n))

    def words(self, n: int) -> np.ndarray:
        """Return ``n`` independent uniform 64-bit words (``uint64``)."""
        return np.frombuffer(self.random_bytes(8 * n), dtype="<u8").astype(np.uint64, copy=False)

    def bits(self, n: int) -> np.ndarray:
        """Return ``n`` independent fair bits (``bool``)."""
        raw = np.frombuffer(self.random_bytes((n + 7) // 8), dtype=np.uint8)
        return np.unpackbits(raw, count=n).astype(bool)

    def integers_below(self, n: int, bound: int) -> np.ndarray:
        """Return ``n`` integers drawn exactly uniformly from ``[0, bound)`` (``int64``).

        Rejection sampling on 64-bit words: a word is kept only below the largest multiple of
        ``bound`` that fits in 64 bits, so every value has probability exactly ``1 / bound``.
        """
        if not (1 <= bound < (1 << 62)):
            raise ValueError(f"bound={bound!r} must lie in [1, 2^62)")
        limit = np.uint64((_TWO64 // bound) * bound - 1)  # keep words <= limit
        out = np.empty(0, dtype=np.int64)
        while len(out) < n:
            w = self.words(int((n - len(out)) * 1.05) + 8)
            w = w[w <= limit]
            out = np.concatenate([out, (w % np.uint64(bound)).astype(np.int64)])
        return out[:n]

    def bernoulli(self, p: float, n: int) -> np.ndarray:
        """Return ``n`` Bernoulli(``p``) trials (``bool``), each exact to within ``2^-64``.

        ``True`` when a word is below ``floor(p * 2^64)``; ``p`` is a float, whose binary value
        times ``2^64`` is computed exactly.
        """
        if not (0.0 <= p <= 1.0):
            raise ValueError(f"p={p!r} must lie in [0, 1]")
        threshold = int(p * _TWO64)  # exact: p is a binary fraction, the product a power-of-two scaling
        if threshold >= _TWO64:
            return np.ones(n, dtype=bool)
        return self.words(n) < np.uint64(threshold)

    def bernoulli_exp(self, x: np.ndarray) -> np.ndarray:
        """Return one Bernoulli(``exp(-x)``) trial per element of ``x >= 0`` (``bool``).

        The probability is rounded once, to the float64 ``exp(-x)`` (relative error below
        ``2^-52``), then compared exactly with a 64-bit word; the relative error of each
        trial's probability stays below ``2^-51`` wherever ``exp(-x) >= 2^-11``.
        """
        x = np.asarray(x, dtype=np.float64)
        if np.any(~(x >= 0)):
            raise ValueError("bernoulli_exp needs finite x >= 0")
        scaled = np.ldexp(np.exp(-x), 64)
        # Largest float below 2^64 maps to a valid uint64; exp(-0) = 1 means "always".
        always = scaled >= float(_TWO64)
        threshold = np.where(always, 0.0, np.floor(scaled)).astype(np.uint64)
        return always | (self.words(x.size).reshape(x.shape) < threshold)


def system_random() -> random.SystemRandom:
    """Return Python's ``SystemRandom`` (OS CSPRNG) for sampling who takes part in a round."""
    return random.SystemRandom()
