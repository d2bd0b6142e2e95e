"""``fedlora audit-dp``: an empirical lower bound on ε from ONE training run, next to the accounted ε.

One-run privacy auditing (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training
Run", NeurIPS 2023): put ``m`` canaries into one client's data, each included independently
with probability 1/2; train ONCE with record-level DP-SGD; score every canary; guess "included"
for the ``k`` highest scores and "excluded" for the ``k`` lowest. If the training is
(ε, δ)-DP, the number of correct guesses is (up to a δ term) dominated by
``Binomial(2k, e^ε / (1 + e^ε))`` (their Theorem 3.2), so observing ``v`` correct guesses
rules out every ε whose p-value is below ``1 - confidence``: the largest such ε is an
empirical LOWER bound that the accounted ε must not fall below.

What is audited: fedlora's DP-SGD wiring (:func:`fedlora.privacy.dpsgd.make_private_lora`:
Opacus per-sample clipping, Poisson sampling and Gaussian noise drawn from OS entropy) and the
ledger's accountant, in the white-box setting with Dirac gradient canaries: canary ``i`` is
the one-hot input ``e_i`` of a linear model under the loss ``-w·x``, so its clipped gradient
moves coordinate ``i`` alone and the score is the final ``w_i``. This is the strongest
auditor for the mechanism (every canary's contribution is isolated), not an audit of a whole
federated LoRA run (whose canaries would be far weaker). ``noise_off=True`` runs a deliberately
broken mechanism (no noise while the ledger still claims σ); the audit must flag it.
"""

from __future__ import annotations

import argparse
import hashlib
import math
from dataclasses import asdict, dataclass

import torch
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedlora.privacy.accounting import compute_epsilon
from fedlora.privacy.dpsgd import make_private_lora
from fedlora.privacy.randomness import SecureRandom


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Return P[≥ v of r guesses correct] under (ε, δ)-DP with m canaries (Steinke et al. 2023, Alg. 2)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v={v} <= r={r} <= m={m}")
    q = 1.0 / (1.0 + math.exp(-eps))  # accuracy of ε-DP randomised response
    beta = float(stats.binom.sf(v - 1, r, q))
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total += float(stats.binom.pmf(v - i, r, q))
        alpha = max(alpha, total / i)
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """Return the largest ε that ``v`` correct of ``r`` guesses rejects at ``confidence`` (0 if none)."""
    level = 1.0 - confidence
    lo, hi = 0.0, 1.0
    if p_value(m, r, v, lo, delta) >= level:
        return 0.0
    while p_value(m, r, v, hi, delta) < level:
        hi += 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) < level else (lo, mid)
    return lo


@dataclass(frozen=True)
class AuditResult:
    """One audit: the mechanism's parameters, the guesses and both ε values."""

    canaries: int
    guesses: int
    correct: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    noise_off: bool
    epsilon_accounted: float
    epsilon_lower_bound: float
    confidence: float
    ceiling: float
    noise_ratio: float
    noise_p_value: float

    @property
    def inconclusive(self) -> bool:
        """True when the accounted ε is at or above the most this audit could ever prove (its ceiling)."""
        return self.epsilon_accounted >= self.ceiling

    @property
    def noise_too_small(self) -> bool:
        """True when the excluded canaries' scores are significantly less noisy than σ claims (p < 1e-6)."""
        return self.noise_p_value < NOISE_P_VALUE

    @property
    def violation(self) -> bool:
        """True when the lower bound exceeds the accounted ε or the noise is below the claimed σ."""
        return self.epsilon_lower_bound > self.epsilon_accounted or self.noise_too_small


NOISE_P_VALUE = 1e-6
"""Significance of the white-box noise check (a false alarm on a sound mechanism once in a million)."""


def audit_dpsgd(
    *,
    canaries: int = 1000,
    guesses: int = 100,
    noise_multiplier: float = 4.0,
    steps: int = 4,
    sample_rate: float = 1.0,
    delta: float = 1e-5,
    confidence: float = 0.95,
    accountant: str = "prv",
    noise_off: bool = False,
    seed: int | None = None,
    noise_scale: float = 1.0,
) -> AuditResult:
    """Audit DP-SGD as fedlora wires it with ``canaries`` Dirac canaries in one run (module docstring).

    ``guesses`` canaries are guessed "in" (highest scores) and as many "out" (lowest).
    ``seed`` fixes the canary draw, sampling and noise (tests); None draws all of them from OS
    entropy, as a real client does. ``noise_scale`` < 1 runs a deliberately broken mechanism whose
    noise is that fraction of the σ the ledger claims (``noise_off`` is ``noise_scale = 0``).
    """
    if not (0.0 <= noise_scale <= 1.0):
        raise ValueError(f"noise_scale={noise_scale!r} must lie in [0, 1]")
    if noise_off:
        noise_scale = 0.0
    if not (0 < 2 * guesses <= canaries):
        raise ValueError(f"guesses={guesses} must satisfy 0 < 2 * guesses <= canaries={canaries}")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    included = torch.rand(canaries, generator=gen) < 0.5  # S_i: each canary in with probability 1/2
    # The client's data: the included canaries plus data-independent filler (x = 0, zero gradient)
    # so that the dataset size, and so q, does not depend on which canaries are in.
    n = canaries
    x = torch.zeros(n, canaries)
    x[torch.arange(canaries)[included], torch.arange(canaries)[included]] = 1.0
    model = nn.Linear(canaries, 1, bias=False)
    nn.init.zeros_(model.weight)
    batch = max(1, round(sample_rate * n))
    loader = DataLoader(TensorDataset(x), batch_size=batch)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    private = make_private_lora(
        model,
        opt,
        loader,
        noise_multiplier=noise_multiplier * noise_scale,
        max_grad_norm=1.0,
        generator=None if seed is None else SecureRandom(hashlib.sha256(f"audit-{seed}".encode()).digest()),
    )
    net, dp_opt, dp_loader = private
    done = 0
    while done < steps:
        for xb, weights in dp_loader:
            dp_opt.zero_grad()
            # per-sample loss -w·x (gradient -x); filler rows of the fixed-size batch weigh 0
            (-net(xb).sum(dim=1) * weights).mean().backward()
            dp_opt.step()
            done += 1
            if done == steps:
                break
    expected_batch = float(dp_opt.expected_batch_size)
    private.release()
    scores = model.weight.detach()[0].double()
    order = torch.argsort(scores)
    guess_in, guess_out = order[-guesses:], order[:guesses]
    correct = int(included[guess_in].sum()) + int((~included[guess_out]).sum())
    q = private.sample_rate
    eps = compute_epsilon([(noise_multiplier, q, steps)], delta, accountant)  # what the ledger claims
    lower = epsilon_lower_bound(canaries, 2 * guesses, correct, delta, confidence)
    ratio, p_low = noise_check(
        scores[~included], noise_multiplier * expected_std_per_unit(steps, expected_batch)
    )
    ceiling = epsilon_lower_bound(canaries, 2 * guesses, 2 * guesses, delta, confidence)
    return AuditResult(
        canaries,
        2 * guesses,
        correct,
        noise_multiplier,
        q,
        steps,
        delta,
        noise_scale < 1.0,
        eps,
        lower,
        confidence,
        ceiling,
        ratio,
        p_low,
    )


def expected_std_per_unit(steps: int, expected_batch: float) -> float:
    """Return the std of an excluded canary's final score per unit of σ (C = 1, learning rate 1).

    Each step adds ``-noise / expected_batch`` to every coordinate, noise of std ``σ C``; over
    ``steps`` independent steps the std is ``σ C √steps / expected_batch``.
    """
    return math.sqrt(steps) / expected_batch


def noise_check(excluded_scores: torch.Tensor, claimed_std: float) -> tuple[float, float]:
    """Return (measured / claimed noise std, p-value of a noise this small) for the excluded canaries.

    An excluded canary's coordinate receives no gradient: its score is the noise alone, with mean
    0. ``Σ x² / s²`` is then χ² with ``n`` degrees of freedom; the p-value is its lower tail.
    """
    n = int(excluded_scores.numel())
    if n == 0 or claimed_std <= 0:
        return float("nan"), 1.0
    ss = float((excluded_scores.double() ** 2).sum())
    ratio = math.sqrt(ss / n) / claimed_std
    return ratio, float(stats.chi2.cdf(ss / claimed_std**2, n))


def build_parser() -> argparse.ArgumentParser:
    """Return the ``fedlora audit-dp`` argument parser."""
    p = argparse.ArgumentParser(
        prog="fedlora audit-dp",
        description="Empirical ε lower bound of fedlora's DP-SGD from one run with canaries "
        "(Steinke, Nasr & Jagielski 2023), next to the accounted ε.",
    )
    p.add_argument("--canaries", type=int, default=1000, help="number of canaries m (default 1000)")
    p.add_argument("--guesses", type=int, default=100, help="guesses 'in' and as many 'out' (default 100)")
    p.add_argument("--noise-multiplier", type=float, default=4.0, help="σ (default 4)")
    p.add_argument("--steps", type=int, default=4, help="DP-SGD steps (default 4)")
    p.add_argument("--sample-rate", type=float, default=1.0, help="Poisson rate q (default 1)")
    p.add_argument("--delta", type=float, default=1e-5, help="δ (default 1e-5)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence of the bound (default 0.95)")
    p.add_argument("--accountant", choices=["rdp", "prv"], default="prv", help="accountant (default prv)")
    p.add_argument("--noise-off", action="store_true", help="audit a deliberately broken mechanism")
    p.add_argument(
        "--noise-scale",
        type=float,
        default=1.0,
        help="apply this fraction of the claimed σ (a deliberately broken mechanism below 1; default 1)",
    )
    p.add_argument("--seed", type=int, default=None, help="fix canaries, sampling and noise (tests)")
    p.add_argument(
        "--client-round",
        action="store_true",
        help="instead, run one client round through the client's DP path on a PEFT model (--model) and "
        "measure the noise it added against the σ its ledger records",
    )
    p.add_argument("--model", default="minilm", help="model of --client-round (default minilm)")
    p.add_argument("--target-epsilon", type=float, default=4.0, help="ε target of --client-round (default 4)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``fedlora audit-dp``; exit 0 when the bound is consistent, 3 when it exposes a violation."""
    args = build_parser().parse_args(argv)
    if args.client_round:
        return _client_round_main(args)
    res = audit_dpsgd(
        canaries=args.canaries,
        guesses=args.guesses,
        noise_multiplier=args.noise_multiplier,
        steps=args.steps,
        sample_rate=args.sample_rate,
        delta=args.delta,
        confidence=args.confidence,
        accountant=args.accountant,
        noise_off=args.noise_off,
        seed=args.seed,
        noise_scale=args.noise_scale,
    )
    print_fields(res)
    if res.noise_too_small:
        print(
            f"VIOLATION: the excluded canaries' noise is {res.noise_ratio:.3f} of what σ = "
            f"{res.noise_multiplier:g} claims (p = {res.noise_p_value:.2g}); the mechanism adds less noise "
            "than the ledger accounts"
        )
        return 3
    if res.epsilon_lower_bound > res.epsilon_accounted:
        print(
            f"VIOLATION: the empirical lower bound {res.epsilon_lower_bound:.3f} exceeds the accounted "
            f"ε {res.epsilon_accounted:.3f}; the mechanism does not deliver the privacy the ledger claims"
        )
        return 3
    if res.inconclusive:
        print(
            f"inconclusive: with {res.canaries} canaries and {res.guesses} guesses this audit cannot prove "
            f"more than ε = {res.ceiling:.3f}, below the accounted ε {res.epsilon_accounted:.3f}; the lower "
            f"bound {res.epsilon_lower_bound:.3f} says nothing about the claim (add --canaries/--guesses). "
            f"The noise check passed (measured/claimed noise {res.noise_ratio:.3f})"
        )
        return 0
    print(
        f"consistent: empirical lower bound {res.epsilon_lower_bound:.3f} <= accounted ε "
        f"{res.epsilon_accounted:.3f} (ceiling {res.ceiling:.3f}, {res.confidence:.0%} confidence); "
        f"measured/claimed noise {res.noise_ratio:.3f}"
    )
    return 0


def print_fields(result: AuditResult | RoundNoiseAudit) -> None:
    """Print every field of an audit result, one per line."""
    for key, value in asdict(result).items():
        print(f"{key:>20}: {value:.6g}" if isinstance(value, float) else f"{key:>20}: {value}")


def _client_round_main(args: argparse.Namespace) -> int:
    res = audit_client_round(
        model=args.model,
        target_epsilon=args.target_epsilon,
        delta=args.delta,
        noise_scale=args.noise_scale,
        seed=args.seed or 0,
    )
    print_fields(res)
    if res.violation:
        print(
            f"VIOLATION: the client round added {res.noise_ratio:.3f} of the noise its ledger records "
            f"(σ = {res.noise_multiplier:.4g}, p = {res.noise_p_value:.2g})"
        )
        return 3
    print(
        f"consistent: the client round added {res.noise_ratio:.4f} x the noise its ledger records "
        f"(σ = {res.noise_multiplier:.4g} for ε = {res.target_epsilon:g}; {res.coordinates} draws, "
        f"p = {res.noise_p_value:.2g})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# -- the client's own DP path -----------------------------------------------------------------------


@dataclass(frozen=True)
class RoundNoiseAudit:
    """The noise a real client round added, measured around the optimiser, against what its ledger claims."""

    model: str
    target_epsilon: float
    noise_multiplier: float  # calibrated σ: what the ledger records
    max_grad_norm: float
    steps: int
    coordinates: int  # noise draws measured (trainable coordinates x noisy steps)
    noise_ratio: float  # measured noise std / (σ C)
    noise_p_value: float  # lower tail of the χ² test: a noise this small under the claimed σ

    @property
    def violation(self) -> bool:
        """True when the round added significantly less noise than its ledger accounts."""
        return self.noise_p_value < NOISE_P_VALUE


def audit_client_round(
    *,
    model: str = "minilm",
    target_epsilon: float = 4.0,
    delta: float = 1e-5,
    records: int = 48,
    batch_size: int = 8,
    steps: int = 4,
    max_length: int = 16,
    noise_scale: float = 1.0,
    seed: int = 0,
) -> RoundNoiseAudit:
    """Run one client round through the client's DP path and measure the noise it really added.

    The path a record-DP client runs (``clients.privacy``): σ calibrated for ``target_epsilon``
    over the round's steps at ``q = 1 / ⌈N / batch⌉``, the PEFT model of
    :func:`fedlora.models.get_lora_model` with a fresh adapter, the embedded task encoded by its
    tokenizer, :func:`fedlora.train.train_local` (AdamW, fixed rows, no trim) wrapped by
    :func:`fedlora.privacy.dpsgd.make_private_lora`. Around the DP optimiser's noise step the
    clipped sum and the noised gradient of every trainable tensor are compared: their difference
    is the noise the round added, whose std must be ``σ C`` (χ² test, as in :func:`noise_check`).
    ``noise_scale`` < 1 applies that fraction of σ while the ledger claims all of it.
    """
    from fedlora.config import TrainConfig
    from fedlora.data.embedded import embedded_labels, generate_embedded
    from fedlora.data.encode import encode
    from fedlora.models import (
        adapter_state,
        get_lora_model,
        init_adapter_state,
        load_adapter_state,
        set_trainable,
    )
    from fedlora.privacy.calibrate import calibrate_noise_multiplier
    from fedlora.train import train_local

    labels = embedded_labels()
    rank, clip = 4, 1.0
    loaded = get_lora_model(model, "classification", len(labels), rank, 2.0 * rank)
    load_adapter_state(loaded, rank, init_adapter_state(adapter_state(loaded, rank), seed))
    set_trainable(loaded, rank, train_a=True)
    data = encode(generate_embedded(records, seed), loaded.tokenizer, max_length, "classification")
    q = 1.0 / max(1, -(-len(data) // batch_size))
    sigma = calibrate_noise_multiplier(target_epsilon, delta, q, steps, accountant="rdp")
    ss, count, held = 0.0, 0, []

    def wrap(m, o, loader):  # noqa: ANN001, ANN202 - train_local's callback
        private = make_private_lora(m, o, loader, noise_multiplier=sigma * noise_scale, max_grad_norm=clip)
        held.append(private)
        optimizer, add_noise = private.optimizer, private.optimizer.add_noise

        def measured() -> None:  # around the real noise step: what it added, per coordinate
            nonlocal ss, count
            before = [p.summed_grad.detach().double().clone() for p in optimizer.params]
            add_noise()
            for p, s in zip(optimizer.params, before, strict=True):
                noise = p.grad.detach().double().reshape(s.shape) - s
                ss += float((noise**2).sum())
                count += noise.numel()

        optimizer.add_noise = measured  # type: ignore[method-assign]
        return tuple(private)

    cfg = TrainConfig(lr=1e-3, batch_size=batch_size, local_steps=steps, warmup_steps=0)
    try:
        train_local(loaded.peft, data, cfg, torch.device("cpu"), seed=seed, wrap=wrap, steps=steps)
    finally:
        for private in held:  # the base model is cached per process: detach Opacus' hooks
            private.release()
    claimed = sigma * clip
    ratio = math.sqrt(ss / count) / claimed if count else float("nan")
    p_low = float(stats.chi2.cdf(ss / claimed**2, count)) if count else 1.0
    return RoundNoiseAudit(model, target_epsilon, sigma, clip, steps, count, ratio, p_low)
