"""Record-level DP-SGD for LoRA-only training of a PEFT model, wired with Opacus.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy"): each step samples
every record with probability ``q`` (Poisson), clips every per-sample gradient of the
trainable parameters to L2 norm ``C`` (one flat norm over all of them), sums, adds
``N(0, (sigma * C)^2)`` per coordinate and divides by the expected batch size ``q * N``.

Only parameters with ``requires_grad=True`` get per-sample gradients, noise and updates:
the frozen base, and LoRA ``A`` under FFA-LoRA, are untouched. Facts this module relies
on (Opacus 1.6, see ``docs/privacy.md``):

* ``grad_sample_mode="hooks"`` is the fast mode for LoRA-only training; the model must be
  in train mode before wrapping.
* Poisson sampling yields empty batches on small clients and BERT cannot run a batch of
  size 0. Opacus' ``DPDataLoader(rand_on_empty=True)`` substitutes a data-independent
  random sample, but only after it has seen one non-empty batch; :class:`EmptyBatchGuard`
  covers the first batch too by building the dummy from the dataset's public shapes.
* After wrapping, parameter names gain ``_module.``: read adapter tensors through
  :func:`adapter_state`, which unwraps first.
* opacus#820: PEFT + Opacus can silently leave LoRA weights unchanged when parameters
  moved device after the optimizer was built. :func:`make_private_lora` refuses an
  optimizer whose parameters are not the model's trainable ones, and
  :func:`check_adapter_moved` lets a training loop assert that weights really moved.

Our :class:`~fedlora.privacy.ledger.PrivacyLedger` is the source of truth for ε; the
engine's own accountant is only read for the number of steps actually taken.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.optimizers import DPOptimizer
from peft import get_peft_model_state_dict
from torch import nn
from torch.utils.data import DataLoader

from fedlora.adapters import AdapterState
from fedlora.privacy.ledger import LedgerEntry, Sampling
from fedlora.privacy.randomness import entropy_generator


class DPSetupError(ValueError):
    """The model, optimizer or loader cannot be trained under DP as given."""


class EmptyBatchGuard:
    """Collate wrapper that turns an empty Poisson batch into one data-independent dummy sample.

    The dummy has the structure, shapes and dtypes of one collated dataset item (public
    facts such as the padded sequence length) and values drawn uniformly from {0, 1}, as
    Opacus' ``rand_on_empty`` does; its clipped gradient is independent of the data, so the
    privacy guarantee is unchanged. ``empty_batches`` counts substitutions (in-process
    loading only).
    """

    def __init__(self, collate_fn: Any, template: Any) -> None:
        self.collate_fn = collate_fn
        self.template = template
        self.empty_batches = 0

    def __call__(self, batch: list[Any]) -> Any:
        """Collate ``batch``, or return a random dummy of one sample when it is empty."""
        if len(batch) > 0:
            return self.collate_fn(batch)
        self.empty_batches += 1
        return _random_like(self.template)


def _random_like(sample: Any) -> Any:
    if torch.is_tensor(sample):
        return torch.randint(0, 2, tuple(sample.shape), dtype=sample.dtype, device=sample.device)
    if isinstance(sample, Mapping):
        return {k: _random_like(v) for k, v in sample.items()}
    if isinstance(sample, list | tuple):
        return type(sample)(_random_like(v) for v in sample)
    raise DPSetupError(
        f"batches of type {type(sample).__name__} cannot be replaced by a dummy on an empty Poisson batch; "
        "make the dataset yield tensors, or dicts/tuples of tensors"
    )


@dataclass
class PrivateTraining:
    """The DP-wrapped training objects of one client round.

    Unpacks as ``model, optimizer, data_loader = make_private_lora(...)``.

    Attributes
    ----------
    model
        The ``GradSampleModule`` to call in the training loop.
    optimizer
        The ``DPOptimizer`` (clips, noises, steps).
    data_loader
        The Poisson ``DPDataLoader`` (or the original loader with fixed-size sampling).
    engine
        The Opacus ``PrivacyEngine``; its accountant counts steps, our ledger computes ε.
    noise_multiplier, max_grad_norm, sample_rate, sampling
        The mechanism's parameters, as the ledger records them.
    """

    model: GradSampleModule
    optimizer: DPOptimizer
    data_loader: DataLoader
    engine: PrivacyEngine
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    sampling: Sampling

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.optimizer, self.data_loader))

    def steps_taken(self) -> int:
        """Return the noisy optimizer steps taken so far (from the engine's step hook)."""
        return sum(int(steps) for _, _, steps in self.engine.accountant.history)

    def ledger_entry(self, round: int) -> LedgerEntry:
        """Return the ledger entry for this round: σ, q, sampling and the steps actually taken."""
        return LedgerEntry(round, self.noise_multiplier, self.sample_rate, self.steps_taken(), self.sampling)

    def release(self) -> nn.Module:
        """Remove Opacus' hooks and per-sample attributes; return the plain (PEFT) model.

        Call it at the end of every round when the base model is cached across rounds, or
        hooks pile up on the next wrap.
        """
        return self.model.to_standard_module()


def unwrap(model: nn.Module) -> nn.Module:
    """Return the module inside a ``GradSampleModule`` (or ``model`` itself)."""
    while isinstance(model, GradSampleModule):
        model = model._module
    return model


def adapter_state(model: nn.Module) -> AdapterState:
    """Return the adapter tensors (LoRA factors + modules_to_save) named by the PEFT contract.

    Works on a wrapped or unwrapped PEFT model; returns detached CPU copies keyed as in
    :mod:`fedlora.adapters` (no ``_module.`` prefix, no adapter name).
    """
    state = get_peft_model_state_dict(unwrap(model))
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def check_adapter_moved(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> list[str]:
    """Return the names whose tensors changed; raise if none did (the opacus#820 silent no-update).

    Raises
    ------
    RuntimeError
        If no tensor differs between ``before`` and ``after``.
    """
    changed = [k for k in after if k in before and not torch.equal(before[k].cpu(), after[k].cpu())]
    if not changed:
        raise RuntimeError(
            "DP training left every adapter tensor unchanged (opacus#820 symptom); move the model to "
            "its device before building the optimizer, and build the optimizer from the model's "
            "trainable parameters"
        )
    return changed


def _check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise DPSetupError(
            "the model has no parameter with requires_grad=True; inject LoRA before DP wrapping"
        )
    ids = {id(p) for p in model.parameters()}
    devices = {p.device for p in trainable}
    if len(devices) > 1:
        raise DPSetupError(
            f"trainable parameters live on several devices {sorted(map(str, devices))}; use one"
        )
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in ids:
                raise DPSetupError(
                    "the optimizer holds a tensor that is not a parameter of the model (opacus#820: was the "
                    "model moved to its device after the optimizer was built?); build the optimizer last"
                )


def make_private_lora(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    poisson_sampling: bool = True,
    noise_generator: torch.Generator | None = None,
    sampling_generator: torch.Generator | None = None,
) -> PrivateTraining:
    """Wrap a PEFT model, its optimizer and loader for DP-SGD on the trainable (LoRA) parameters.

    Parameters
    ----------
    model
        A PEFT model on its final device; frozen parameters stay frozen and get no noise.
    optimizer
        Built AFTER the model was moved, over (a subset of) the model's parameters.
    data_loader
        A map-style loader; its ``batch_size / len(dataset)`` sets the sample rate
        ``q = 1 / len(data_loader)``. Its ``generator`` is NOT used for Poisson sampling:
        that seed is known to whoever built the loader's seed (the server sends it).
    noise_multiplier
        σ ≥ 0 (noise std / C); calibrate it with :mod:`fedlora.privacy.calibrate`.
    max_grad_norm
        C > 0, the per-sample L2 clipping norm over all trainable parameters.
    poisson_sampling
        True (default) for Poisson batches (amplification applies); False keeps the loader's
        fixed-size batches and the ledger then accounts with q = 1.
    noise_generator, sampling_generator
        Generators for the Gaussian noise and the Poisson sampler. None (the default, and
        the only sound choice in a federation) draws each from fresh OS entropy
        (:func:`fedlora.privacy.randomness.entropy_generator`), so neither the server nor
        anyone who knows the run's seed can rebuild the batches or subtract the noise.
        Pass seeded generators only in tests of the mechanism itself.

    Returns
    -------
    PrivateTraining
        Unpacks as ``(model, optimizer, data_loader)``; see its methods for the ledger entry.

    Raises
    ------
    DPSetupError
        If σ or C is out of range, the model has nothing to train, or the optimizer holds
        tensors that are not the model's parameters.
    """
    if not (noise_multiplier >= 0.0):
        raise DPSetupError(f"noise_multiplier={noise_multiplier!r} must be >= 0")
    if not (max_grad_norm > 0.0):
        raise DPSetupError(f"max_grad_norm={max_grad_norm!r} must be > 0")
    if isinstance(model, GradSampleModule):
        raise DPSetupError("the model is already wrapped by Opacus; call PrivateTraining.release() first")
    _check_optimizer(model, optimizer)
    template = data_loader.collate_fn([data_loader.dataset[0]])  # shapes/dtypes only
    device = next(p.device for p in model.parameters() if p.requires_grad)
    if noise_generator is None:
        noise_generator = entropy_generator(device)
    if sampling_generator is None:
        sampling_generator = entropy_generator("cpu")  # the sampler draws on the CPU
    model.train()  # Opacus hooks capture activations only in train mode
    with warnings.catch_warnings():
        # secure_mode needs torchcsprng, which cannot be installed; reports state this instead.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    # Opacus builds the Poisson DPDataLoader with ``generator=engine.secure_rng`` and falls back
    # to the loader's own (seeded) generator when that is None; give it the OS-entropy one.
    engine.secure_rng = sampling_generator
    gs_model, dp_optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm),
        poisson_sampling=poisson_sampling,
        grad_sample_mode="hooks",
        noise_generator=noise_generator,
        rand_on_empty=True,
    )
    if poisson_sampling:
        loader.collate_fn = EmptyBatchGuard(loader.collate_fn, template)
    return PrivateTraining(
        model=gs_model,
        optimizer=dp_optimizer,
        data_loader=loader,
        engine=engine,
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm),
        sample_rate=1.0 / len(data_loader),
        sampling="poisson" if poisson_sampling else "fixed",
    )
