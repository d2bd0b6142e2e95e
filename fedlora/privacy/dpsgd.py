"""Record-level DP-SGD for LoRA-only training of a PEFT model, wired with Opacus.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy"): each step samples
every record with probability ``q`` (Poisson), clips every per-sample gradient of the
trainable parameters to L2 norm ``C`` (one flat norm over all of them), sums, adds Gaussian
noise of standard deviation ``sigma * C`` per coordinate (discrete Gaussian on a fine grid,
:mod:`fedlora.privacy.noise`) and divides by the expected batch size ``q * N``.

Only parameters with ``requires_grad=True`` get per-sample gradients, noise and updates:
the frozen base, and LoRA ``A`` under FFA-LoRA, are untouched. Facts this module relies
on (Opacus 1.6, see ``docs/privacy.md``):

* ``grad_sample_mode="hooks"`` is the fast mode for LoRA-only training; the model must be
  in train mode before wrapping.
* Every random value (Poisson masks, Gaussian noise) comes from fedlora's own secure
  generator (:mod:`fedlora.privacy.randomness`, a 256-bit-key ChaCha20 stream) and the noise
  is discrete Gaussian on a fine grid (:mod:`fedlora.privacy.noise`): Opacus' own sampler and
  noise draw from torch generators (the CPU one keeps 32 bits of its seed) in floating point.
* A step's work must not depend on the data: every Poisson batch is padded to a fixed number
  of rows (:func:`physical_rows`) with zero-weight filler rows, which also makes an empty
  batch release pure noise; training does not trim padding columns under DP (``fedlora.train``).
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

import numpy as np
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from peft import get_peft_model_state_dict
from scipy.stats import binom
from torch import nn
from torch.utils.data import DataLoader, Sampler

from fedlora.adapters import AdapterState
from fedlora.privacy.ledger import LedgerEntry, Sampling
from fedlora.privacy.noise import DiscreteGaussianMechanism, poisson_mask
from fedlora.privacy.randomness import SecureRandom


class DPSetupError(ValueError):
    """The model, optimizer or loader cannot be trained under DP as given."""


class SecurePoissonBatches(Sampler[list[int]]):
    """Poisson batches drawn from a :class:`SecureRandom`: each record independently with rate ``q``.

    Replaces Opacus' ``UniformWithReplacementSampler``, which draws its masks from a torch
    generator (``torch.rand(..., generator=...) < q``); here every mask is an exact 64-bit
    Bernoulli trial on a 256-bit-key ChaCha20 stream. A batch may be empty.
    """

    def __init__(
        self, num_samples: int, sample_rate: float, num_batches: int, generator: SecureRandom
    ) -> None:
        if num_samples < 1 or num_batches < 1 or not (0.0 < sample_rate <= 1.0):
            raise DPSetupError(
                f"Poisson sampling needs records, batches and a rate in (0, 1]; got {num_samples}, "
                f"{num_batches}, {sample_rate}"
            )
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.num_batches = num_batches
        self.generator = generator

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.num_batches):
            yield np.flatnonzero(poisson_mask(self.generator, self.num_samples, self.sample_rate)).tolist()


OVERFLOW_PROBABILITY = 1e-9
"""Per-step probability that a Poisson batch holds more records than the fixed physical batch."""


def physical_rows(num_samples: int, sample_rate: float, overflow: float = OVERFLOW_PROBABILITY) -> int:
    """Return the fixed number of rows every DP step processes: ``P(Binomial(N, q) > rows) <= overflow``.

    A step's cost then does not depend on how many records the Poisson sample drew (which,
    under add/remove, is itself a count of the data); it depends only on ``N`` and ``q``, which
    the reply discloses anyway (the example count, the ledger's ``q``).
    """
    return max(1, int(binom.isf(overflow, num_samples, sample_rate)) + 1)


class FixedRows:
    """Collate a Poisson batch into exactly ``rows`` rows, with a weight column (1 real, 0 filler).

    Filler rows are one public, data-independent item (zero token ids, a full attention mask,
    label 0) built from the dataset's shapes; their weight 0 makes their per-sample gradient
    exactly zero, so an empty Poisson batch releases pure noise (a random stand-in would add a
    gradient of its own and raise the step's sensitivity). A batch larger than ``rows`` (an
    overflow, probability ``OVERFLOW_PROBABILITY`` per step) is processed whole and counted.
    """

    def __init__(self, collate_fn: Any, sample: tuple[torch.Tensor, ...], rows: int) -> None:
        if not isinstance(sample, tuple | list) or not all(torch.is_tensor(t) for t in sample):
            raise DPSetupError(
                "DP training needs a dataset of tensor tuples, e.g. (input ids, attention mask, labels)"
            )
        filler = [torch.zeros_like(t) for t in sample]
        if len(sample) == 3:  # (ids, mask, labels): a full mask keeps every attention row finite
            filler[1] = torch.ones_like(sample[1])
        self.filler = tuple(filler)
        self.collate_fn = collate_fn
        self.rows = rows
        self.overflows = 0
        self.empty_batches = 0

    def __call__(self, batch: list[Any]) -> tuple[torch.Tensor, ...]:
        """Return the collated tensors plus a weight column, with at least ``rows`` rows."""
        real = len(batch)
        self.overflows += real > self.rows
        self.empty_batches += real == 0
        items = list(batch) + [self.filler] * max(0, self.rows - real)
        weights = torch.zeros(len(items))
        weights[:real] = 1.0
        return (*self.collate_fn(items), weights)


def install_secure_noise(optimizer: DPOptimizer, mechanism: DiscreteGaussianMechanism) -> None:
    """Make ``optimizer`` add ``mechanism``'s discrete Gaussian noise instead of Opacus' torch normals.

    Opacus' ``DPOptimizer.add_noise`` draws ``torch.normal(0, σ C)`` from a torch generator
    (the CPU one keeps 32 bits of its seed) and adds it in floating point; this replaces it,
    per parameter, by ``mechanism.noisy(summed_grad)`` (:mod:`fedlora.privacy.noise`).
    """

    def add_noise() -> None:
        for p in optimizer.params:
            _check_processed_flag(p.summed_grad)
            p.grad = mechanism.noisy(p.summed_grad).view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = add_noise  # type: ignore[method-assign]


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
    rows
        The fixed number of rows every step processes (:func:`physical_rows`; 0 with
        fixed-size batches); ``collate`` counts overflows and empty batches.
    mechanism
        The discrete Gaussian noise of every step.
    """

    model: GradSampleModule
    optimizer: DPOptimizer
    data_loader: DataLoader
    engine: PrivacyEngine
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    sampling: Sampling
    mechanism: DiscreteGaussianMechanism
    rows: int = 0
    collate: FixedRows | None = None

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
    generator: SecureRandom | None = None,
) -> PrivateTraining:
    """Wrap a PEFT model, its optimizer and loader for DP-SGD on the trainable (LoRA) parameters.

    Parameters
    ----------
    model
        A PEFT model on its final device; frozen parameters stay frozen and get no noise.
    optimizer
        Built AFTER the model was moved, over (a subset of) the model's parameters.
    data_loader
        A map-style loader of ``(ids, mask, labels)`` tensors; its ``batch_size / len(dataset)``
        sets the sample rate ``q = 1 / len(data_loader)``. Its ``generator`` is NOT used for
        Poisson sampling: that seed is known to whoever built the loader's seed (the server
        sends it).
    noise_multiplier
        σ ≥ 0 (noise std / C); calibrate it with :mod:`fedlora.privacy.calibrate`.
    max_grad_norm
        C > 0, the per-sample L2 clipping norm over all trainable parameters.
    poisson_sampling
        True (default) for Poisson batches (amplification applies), each padded to the fixed
        :func:`physical_rows` with zero-weight filler rows, so a step's work does not depend
        on how many records were drawn; the loader then yields ``(ids, mask, labels,
        weights)``. False keeps the loader's fixed-size batches and the ledger accounts q = 1.
    generator
        The secure generator of this round's Poisson masks and noise. None (the default, and
        the only sound choice in a federation) builds one from 256 bits of OS entropy
        (:class:`fedlora.privacy.randomness.SecureRandom`), so neither the server nor anyone
        who knows the run's seed can rebuild the batches or subtract the noise. Pass a keyed
        one only in tests of the mechanism itself.

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
    if not (noise_multiplier >= 0.0 and np.isfinite(noise_multiplier)):
        raise DPSetupError(f"noise_multiplier={noise_multiplier!r} must be a finite number >= 0")
    if not (max_grad_norm > 0.0 and np.isfinite(max_grad_norm)):
        raise DPSetupError(f"max_grad_norm={max_grad_norm!r} must be a finite number > 0")
    if isinstance(model, GradSampleModule):
        raise DPSetupError("the model is already wrapped by Opacus; call PrivateTraining.release() first")
    _check_optimizer(model, optimizer)
    gen = generator if generator is not None else SecureRandom()
    dim = sum(p.numel() for group in optimizer.param_groups for p in group["params"] if p.requires_grad)
    mechanism = DiscreteGaussianMechanism(noise_multiplier, max_grad_norm, dim, gen)
    n = len(data_loader.dataset)  # type: ignore[arg-type]
    batches = len(data_loader)
    sample_rate = 1.0 / batches
    collate: FixedRows | None = None
    rows = 0
    if poisson_sampling:
        rows = physical_rows(n, sample_rate)
        collate = FixedRows(data_loader.collate_fn, data_loader.dataset[0], rows)
        data_loader = DataLoader(
            data_loader.dataset,
            batch_sampler=SecurePoissonBatches(n, sample_rate, batches, gen),
            collate_fn=collate,
            num_workers=0,
        )
    model.train()  # Opacus hooks capture activations only in train mode
    with warnings.catch_warnings():
        # Opacus' secure_mode needs torchcsprng; fedlora's own generator and discrete noise replace it.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    gs_model, dp_optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm),
        poisson_sampling=False,  # the loader above already samples (securely)
        grad_sample_mode="hooks",
    )
    # Opacus derives q and the expected batch size from len(loader): the same q = 1 / batches.
    install_secure_noise(dp_optimizer, mechanism)
    return PrivateTraining(
        model=gs_model,
        optimizer=dp_optimizer,
        data_loader=loader,
        engine=engine,
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm),
        sample_rate=sample_rate,
        sampling="poisson" if poisson_sampling else "fixed",
        mechanism=mechanism,
        rows=rows,
        collate=collate,
    )
