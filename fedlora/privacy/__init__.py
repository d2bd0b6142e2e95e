"""Differential privacy for fedlora: plain functions and data, no Flower.

Modules (import them directly; this package imports nothing heavy on its own):

``accounting``
    ε(δ) of a history of ``(sigma, q, steps)`` blocks with Opacus' RDP or PRV accountant.
``ledger``
    :class:`~fedlora.privacy.ledger.PrivacyLedger`: per-party DP history, JSON, atomic save.
``calibrate``
    σ for a target (ε, δ) over a whole planned run; ``would_exceed`` budget check.
``dpsgd``
    Record-level DP-SGD wiring (Opacus) for LoRA-only training of a PEFT model.
``client_dp``
    Client-level DP-FedAvg math: clipping, noisy mean, client sampling, strategy support.
``randomness``
    OS-entropy generators for DP noise and sampling (never a seed another party knows).
``runfile``
    ``<run_dir>/privacy/ledger.json``: all ledgers plus run facts.
``report`` / ``report_render``
    ``privacy_report.{md,html,json}`` from a run directory.

See ``docs/privacy.md`` for the guarantees and how to choose the parameters.
"""
