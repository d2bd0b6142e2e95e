"""DP-SGD wiring on a tiny PEFT BERT: weights move, base stays, fixed rows, empty batches, FFA, clip bound."""

import math

import pytest
import torch
from privacy_models import tiny_peft_bert, token_loader

from fedlora.adapters import is_lora_a, is_lora_b
from fedlora.privacy.dpsgd import (
    DPSetupError,
    FixedRows,
    adapter_state,
    check_adapter_moved,
    make_private_lora,
    physical_rows,
    unwrap,
)
from fedlora.privacy.randomness import SecureRandom
from fedlora.train import example_losses


def key(i):
    return SecureRandom(bytes([i]) * 32)  # a fixed key: reproducible streams in tests only


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def frozen_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def run_epoch(private, zero_loss=False):
    """One pass over the loader; Poisson batches carry a weight column (filler rows weigh 0)."""
    model, optimizer, loader = private
    sizes = []
    for batch in loader:
        weights = batch[3] if len(batch) > 3 else torch.ones(len(batch[0]))
        sizes.append(int(weights.sum()))
        losses = example_losses(model, batch, torch.device("cpu"), trim=False) * weights
        loss = losses.sum() * 0.0 if zero_loss else losses.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return sizes


def test_dp_training_moves_lora_and_head_not_base(peft_bert):
    before, base = adapter_state(peft_bert), frozen_state(peft_bert)
    opt = torch.optim.SGD(trainable(peft_bert), lr=0.5)
    private = make_private_lora(
        peft_bert,
        opt,
        token_loader(16, 4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        generator=key(1),
    )
    sizes = run_epoch(private)
    after = adapter_state(private.model)
    assert set(after) == set(before) and not any("_module." in k for k in after)
    changed = set(check_adapter_moved(before, after))
    assert {k for k in after if is_lora_b(k)} <= changed  # opacus#820 guard: B really moved
    assert "base_model.model.classifier.weight" in changed
    model = private.release()
    for name, p in model.named_parameters():
        if name in base:
            assert torch.equal(p, base[name]), f"frozen {name} changed"
    entry = private.ledger_entry(round=3)
    assert (entry.round, entry.steps, entry.sampling) == (3, len(sizes), "poisson")
    assert entry.sample_rate == pytest.approx(0.25) and entry.noise_multiplier == 1.0


def test_every_poisson_batch_has_the_same_rows_and_weights_count_the_sample():
    # The timing channel: a step's work must not depend on how many records the sample drew.
    model = tiny_peft_bert()
    opt = torch.optim.SGD(trainable(model), lr=0.1)
    private = make_private_lora(
        model, opt, token_loader(40, 4), noise_multiplier=1.0, max_grad_norm=1.0, generator=key(3)
    )
    rows = physical_rows(40, 0.1)
    assert private.rows == rows > 4
    shapes, drawn = set(), []
    for _ in range(5):
        for ids, mask, labels, weights in private.data_loader:
            shapes.add((tuple(ids.shape), tuple(mask.shape), tuple(labels.shape), tuple(weights.shape)))
            drawn.append(int(weights.sum()))
            assert set(weights.tolist()) <= {0.0, 1.0} and torch.all(weights[: drawn[-1]] == 1)
    assert shapes == {((rows, 8), (rows, 8), (rows,), (rows,))}
    assert len(set(drawn)) > 3  # the Poisson sample size varies; the rows processed do not
    assert private.collate.overflows == 0


def test_physical_rows_bound_the_binomial_tail():
    from scipy.stats import binom

    for n, q in [(3, 1 / 3), (500, 1 / 32), (10_000, 0.01)]:
        rows = physical_rows(n, q)
        assert binom.sf(rows, n, q) <= 1e-9 < binom.sf(rows - 2, n, q) or rows >= n


def test_an_empty_poisson_batch_releases_pure_noise():
    # Filler rows weigh 0: with σ = 0 a step on an empty batch leaves the adapter exactly as it was
    # (a random stand-in sample would move it, and raise the step's sensitivity).
    model = tiny_peft_bert()
    opt = torch.optim.SGD(trainable(model), lr=1.0)
    private = make_private_lora(
        model, opt, token_loader(3, 1), noise_multiplier=0.0, max_grad_norm=1.0, generator=key(2)
    )
    before = adapter_state(private.model)
    batch = private.collate([])
    assert private.collate.empty_batches == 1 and batch[0].shape == (private.rows, 8)
    assert float(batch[3].sum()) == 0.0
    losses = example_losses(private.model, batch, torch.device("cpu"), trim=False) * batch[3]
    losses.mean().backward()
    private.optimizer.step()
    after = adapter_state(private.model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_filler_rows_are_data_independent():
    ds = token_loader(5, 1).dataset
    rows = FixedRows(torch.utils.data.default_collate, ds[0], 4)
    other = FixedRows(torch.utils.data.default_collate, token_loader(5, 1, seed=9).dataset[0], 4)
    ids, mask, _, weights = rows([])
    assert torch.equal(ids, other([])[0]) and int(ids.abs().sum()) == 0 and bool(mask.all())
    assert weights.tolist() == [0.0] * 4
    big = rows([ds[i] for i in range(5)])  # an overflow is processed whole and counted
    assert big[0].shape[0] == 5 and rows.overflows == 1


def test_empty_poisson_batches_do_not_crash():
    model = tiny_peft_bert()
    opt = torch.optim.SGD(trainable(model), lr=0.1)
    # 3 records at q = 1/3: a batch is empty with probability (2/3)^3 ≈ 0.3.
    private = make_private_lora(
        model, opt, token_loader(3, 1, seed=1), noise_multiplier=1.0, max_grad_norm=1.0, generator=key(4)
    )
    for _ in range(6):
        run_epoch(private)
    assert private.collate.empty_batches > 0
    assert private.steps_taken() == 18  # every batch, empty or not, is a noisy step
    assert all(torch.isfinite(t).all() for t in adapter_state(private.model).values())


def test_ffa_freezing_leaves_a_unchanged():
    model = tiny_peft_bert()
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.requires_grad_(False)
    before = adapter_state(model)
    opt = torch.optim.SGD(trainable(model), lr=0.5)
    private = make_private_lora(model, opt, token_loader(16, 4), noise_multiplier=1.0, max_grad_norm=1.0)
    model, optimizer, loader = private
    batch = next(iter(loader))
    (example_losses(model, batch, torch.device("cpu"), trim=False) * batch[3]).mean().backward()
    sampled = {n for n, p in unwrap(model).named_parameters() if getattr(p, "grad_sample", None) is not None}
    assert sampled and not any("lora_A" in n for n in sampled)  # frozen A gets no per-sample grads
    optimizer.step()
    optimizer.zero_grad()
    run_epoch(private)
    after = adapter_state(private.model)
    for k in after:
        if is_lora_a(k):
            assert torch.equal(after[k], before[k]), f"{k} changed under FFA"
        else:
            assert not torch.equal(after[k], before[k]), f"{k} did not move"
    frozen_ids = {id(p) for n, p in private.release().named_parameters() if "lora_A" in n}
    assert not frozen_ids & {id(p) for p in private.optimizer.params}


@pytest.mark.parametrize(("seed", "clip"), [(0, 1e-3), (1, 1e-2), (2, 0.1)])
def test_per_sample_clip_bounds_the_step(seed, clip):
    # σ = 0, fixed batch = whole dataset: q = 1, the step is mean of clipped grads, so ||Δθ|| ≤ lr·C.
    model = tiny_peft_bert(seed)
    before = torch.cat([p.detach().flatten().clone() for p in trainable(model)])
    opt = torch.optim.SGD(trainable(model), lr=1.0)
    private = make_private_lora(
        model, opt, token_loader(6, 6, seed), noise_multiplier=0.0, max_grad_norm=clip, poisson_sampling=False
    )
    run_epoch(private)
    step = torch.cat([p.detach().flatten() for p in trainable(private.model)]) - before
    assert 0 < float(step.norm()) <= clip * (1 + 1e-4)
    assert private.ledger_entry(1).sampling == "fixed"


def test_single_large_gradient_is_clipped_to_c():
    model = tiny_peft_bert(3)
    before = torch.cat([p.detach().flatten().clone() for p in trainable(model)])
    opt = torch.optim.SGD(trainable(model), lr=1.0)
    private = make_private_lora(
        model, opt, token_loader(1, 1), noise_multiplier=0.0, max_grad_norm=1e-4, poisson_sampling=False
    )
    run_epoch(private)
    step = torch.cat([p.detach().flatten() for p in trainable(private.model)]) - before
    assert float(step.norm()) == pytest.approx(1e-4, rel=1e-3)


def test_noise_scale_matches_sigma_c_over_batch():
    # Zero loss: the update is pure noise N(0, (σC / expected_batch)^2) per trainable coordinate.
    model = tiny_peft_bert(4)
    before = torch.cat([p.detach().flatten().clone() for p in trainable(model)])
    opt = torch.optim.SGD(trainable(model), lr=1.0)
    sigma, clip, batch = 2.0, 0.5, 4
    private = make_private_lora(
        model,
        opt,
        token_loader(batch, batch),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        poisson_sampling=False,
        generator=key(0),
    )
    run_epoch(private, zero_loss=True)
    noise = torch.cat([p.detach().flatten() for p in trainable(private.model)]) - before
    assert noise.numel() > 1000
    assert float(noise.std()) == pytest.approx(sigma * clip / batch, rel=0.1)
    assert abs(float(noise.mean())) < 4 * sigma * clip / batch / math.sqrt(noise.numel())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dp_training_on_cuda_moves_adapter():
    model = tiny_peft_bert().to("cuda")  # move first, then build the optimizer (opacus#820)
    before = adapter_state(model)
    opt = torch.optim.SGD(trainable(model), lr=0.5)
    private = make_private_lora(
        model,
        opt,
        token_loader(16, 4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    net, optimizer, loader = private
    for batch in loader:
        losses = example_losses(net, batch, torch.device("cuda"), trim=False) * batch[3].cuda()
        losses.mean().backward()
        assert all(p.grad is None or p.grad.is_cuda for p in trainable(unwrap(net)))
        optimizer.step()
        optimizer.zero_grad()
    changed = check_adapter_moved(before, adapter_state(net))
    assert any(is_lora_b(k) for k in changed)


def test_release_allows_rewrapping_without_leftovers(peft_bert):
    opt = torch.optim.SGD(trainable(peft_bert), lr=0.1)
    private = make_private_lora(peft_bert, opt, token_loader(8, 4), noise_multiplier=1.0, max_grad_norm=1.0)
    run_epoch(private)
    with pytest.raises(DPSetupError, match="already wrapped"):
        make_private_lora(private.model, opt, token_loader(8, 4), noise_multiplier=1.0, max_grad_norm=1.0)
    model = private.release()
    assert unwrap(private.model) is model
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    again = make_private_lora(
        model,
        torch.optim.SGD(trainable(model), lr=0.1),
        token_loader(8, 4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    run_epoch(again)
    assert again.steps_taken() == 2


def test_setup_errors_name_the_fix(peft_bert):
    loader = token_loader(8, 4)
    foreign = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(DPSetupError, match="opacus#820"):
        make_private_lora(peft_bert, foreign, loader, noise_multiplier=1.0, max_grad_norm=1.0)
    opt = torch.optim.SGD(trainable(peft_bert), lr=0.1)
    with pytest.raises(DPSetupError, match="max_grad_norm=0"):
        make_private_lora(peft_bert, opt, loader, noise_multiplier=1.0, max_grad_norm=0)
    with pytest.raises(DPSetupError, match="noise_multiplier=-1"):
        make_private_lora(peft_bert, opt, loader, noise_multiplier=-1, max_grad_norm=1.0)
    for p in peft_bert.parameters():
        p.requires_grad_(False)
    with pytest.raises(DPSetupError, match="requires_grad"):
        make_private_lora(peft_bert, opt, loader, noise_multiplier=1.0, max_grad_norm=1.0)
    state = adapter_state(peft_bert)
    with pytest.raises(RuntimeError, match="opacus#820"):
        check_adapter_moved(state, state)
