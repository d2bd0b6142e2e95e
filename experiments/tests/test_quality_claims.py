"""The quality benchmark's measurements: aggregation error, zero-padding baseline, summaries, cells."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.quality_driver import (
    AggregationProbe,
    ZeroPadding,
    aggregation_error,
    cross_term_error,
    effective_weights,
)
from experiments.quality import (
    CENTRAL,
    cell_config,
    check_settings,
    claim_rows,
    fmt,
    largest_drop,
    mean_std,
)
from fedlora.adapters import a_name, b_name
from fedlora.config import RunConfig, with_overrides
from strategies import create
from strategies.base import ClientResult, ClientSpec

M = "base_model.model.layer.query"
HEAD = "classifier.weight"


def _state(a: list[list[float]], b: list[list[float]], head: float = 0.0) -> dict[str, torch.Tensor]:
    return {a_name(M): torch.tensor(a), b_name(M): torch.tensor(b), HEAD: torch.full((1, 2), head)}


def _random_results(
    generator: torch.Generator, ranks: tuple[int, ...], alpha: float = 4.0
) -> list[ClientResult]:
    out = []
    for node, (r, n) in enumerate(zip(ranks, (10, 30, 20), strict=False)):
        state = {
            a_name(M): torch.randn(r, 5, generator=generator),
            b_name(M): torch.randn(3, r, generator=generator),
            HEAD: torch.randn(1, 2, generator=generator),
        }
        out.append(ClientResult(ClientSpec(node, r, alpha), n, state))
    return out


def test_effective_weights_by_hand() -> None:
    # s B A with s = 2, B = [1, 2]^T, A = [3, 4]: [[6, 8], [12, 16]]; a merge of [[1, 0], [0, 1]] adds I.
    state = _state([[3.0, 4.0]], [[1.0], [2.0]])
    merge = _state([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]])
    got = effective_weights(state, 2.0, None)[M]
    assert torch.equal(got, torch.tensor([[6.0, 8.0], [12.0, 16.0]], dtype=torch.float64))
    with_merge = effective_weights(state, 2.0, merge)[M]
    assert torch.equal(with_merge, torch.tensor([[7.0, 8.0], [12.0, 17.0]], dtype=torch.float64))


def test_aggregation_error_by_hand() -> None:
    # Clients W_1 = diag(1, 0), W_2 = diag(0, 1), p = 1/2 each: exact = I / 2. A global of zeros is
    # 100% off; the exact average 0% off; I / 2 + E_12 / 2 is off by 1/2 over ||I / 2|| = 1/sqrt(2).
    w1 = {M: torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))}
    w2 = {M: torch.diag(torch.tensor([0.0, 1.0], dtype=torch.float64))}
    half = torch.eye(2, dtype=torch.float64) / 2
    assert aggregation_error([w1, w2], [0.5, 0.5], {M: torch.zeros(2, 2, dtype=torch.float64)}) == 1.0
    assert aggregation_error([w1, w2], [0.5, 0.5], {M: half}) == 0.0
    off = half + torch.tensor([[0.0, 0.5], [0.0, 0.0]], dtype=torch.float64)
    assert aggregation_error([w1, w2], [0.5, 0.5], {M: off}) == pytest.approx(0.5 / math.sqrt(0.5))
    assert math.isnan(aggregation_error([{M: 0 * half}], [1.0], {M: half}))


def test_probe_on_fedit_measures_its_cross_term_error() -> None:
    results = _random_results(torch.Generator().manual_seed(0), (2, 2, 2))
    fedit = AggregationProbe(create("fedit"))
    template = {k: torch.zeros_like(v) for k, v in results[0].state.items()}
    state = fedit.init_state(template, [r.spec for r in results])
    fedit.aggregate(state, results)
    assert len(fedit.errors) == 1
    assert fedit.errors[0] == pytest.approx(cross_term_error(results), rel=1e-5)
    assert fedit.errors[0] > 0.1  # independent random factors: large cross terms


def test_probe_on_flora_measures_exact_aggregation() -> None:
    # FLoRA's clients train a fresh adapter on top of the merge: after one round the merge is the
    # exact average, and after a second round it has grown by the exact average of the new factors.
    gen = torch.Generator().manual_seed(1)
    flora = AggregationProbe(create("flora"))
    first = _random_results(gen, (2, 2, 2))
    template = {k: torch.zeros_like(v) for k, v in first[0].state.items()}
    state = flora.init_state(template, [r.spec for r in first])
    state = flora.aggregate(state, first)
    flora.aggregate(state, _random_results(gen, (2, 2, 2)))
    assert len(flora.errors) == 2
    assert max(flora.errors) < 1e-6


def test_probe_on_unequal_ranks() -> None:
    # Zero-padding keeps FedIT's cross terms: clearly off. FlexLoRA's truncated SVD at the global
    # rank 2 of three rank-1/2/2 updates (sum of ranks 5 > 2) loses only the tail: less off.
    gen = torch.Generator().manual_seed(2)
    errors = {}
    for name, strategy in (("zeropad", ZeroPadding()), ("flexlora", create("flexlora"))):
        results = _random_results(torch.Generator().manual_seed(3), (1, 2, 2), alpha=2.0)
        probe = AggregationProbe(strategy)
        template = {a_name(M): torch.randn(2, 5, generator=gen), b_name(M): torch.zeros(3, 2)}
        template[HEAD] = torch.zeros(1, 2)
        state = probe.init_state(template, [r.spec for r in results])
        probe.aggregate(state, results)
        (errors[name],) = probe.errors
    assert errors["zeropad"] > 0.1
    assert errors["flexlora"] < errors["zeropad"]


def test_zero_padding_by_hand() -> None:
    # Ranks 1 and 2, alpha 2 (scales 2 and 1; the global scale is the rank-2 client's, 1), counts
    # 10 and 30 (p = 1/4, 3/4). A_g = 1/4 pad(A_1) + 3/4 A_2; B_g = 1/4 * (2 / 1) pad(B_1) + 3/4 B_2.
    r1 = ClientResult(ClientSpec(1, 1, 2.0), 10, _state([[4.0, 8.0]], [[2.0], [4.0]], head=4.0))
    r2 = ClientResult(
        ClientSpec(2, 2, 2.0), 30, _state([[0.0, 4.0], [8.0, 0.0]], [[4.0, 0.0], [0.0, 4.0]], head=8.0)
    )
    strategy = ZeroPadding()
    template = _state([[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]])
    state = strategy.init_state(template, [r1.spec, r2.spec])
    new = strategy.aggregate(state, [r1, r2])
    assert torch.allclose(new[a_name(M)], torch.tensor([[1.0, 5.0], [6.0, 0.0]]))
    assert torch.allclose(new[b_name(M)], torch.tensor([[4.0, 0.0], [2.0, 3.0]]))
    assert torch.allclose(new[HEAD], torch.full((1, 2), 7.0))
    assert torch.equal(r1.state[a_name(M)], torch.tensor([[4.0, 8.0]]))  # inputs untouched


def test_summaries_by_hand() -> None:
    assert largest_drop([0.1, 0.4, 0.3, 0.5, 0.2]) == pytest.approx(0.3)
    assert largest_drop([0.1, 0.2, 0.3]) == 0.0
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([0.5]) == (0.5, 0.0)
    assert fmt([1.0, 2.0, 3.0]) == "2.000 ± 1.000 (3)"
    assert fmt([0.25]) == "0.250 (1 seed)"


def test_claim_rows_pair_seeds() -> None:
    def run(cell: str, seed: int, final: float) -> dict:
        return {"cell": cell, "seed": seed, "accuracy": [0.1, final], "loss": [2.5, 2.0 - final]}

    runs = [
        run("fair/dirichlet/none/r8", 0, 0.5),
        run("fair/dirichlet/none/r8", 1, 0.7),
        run("fair/dirichlet/none/r8", 2, 0.9),  # no FedIT run of seed 2: left out of the pairing
        run("fedit/dirichlet/none/r8", 0, 0.4),
        run("fedit/dirichlet/none/r8", 1, 0.8),
    ]
    rows, data = claim_rows(runs)
    (claim,) = data
    assert claim.startswith("LoRA-FAIR") and data[claim]["seeds"] == [0, 1]
    assert data[claim]["diffs"] == pytest.approx([0.1, -0.1])
    assert rows[0][3].endswith("per seed +0.100, -0.100")
    assert data[claim]["loss_diffs"] == pytest.approx([-0.1, 0.1])


def test_cell_configs() -> None:
    cfg = with_overrides(RunConfig(), {"federation.num_clients": 3, "train.local_steps": 10, "lora.rank": 8})
    central = cell_config(cfg, CENTRAL, 1)
    assert (central.federation.num_clients, central.train.local_steps) == (1, 30)
    assert central.federation.strategy == "fedit" and central.data.seed == 1
    pad = cell_config(cfg, ("zeropad", "iid", "none", "r4-8-16"), 0)
    assert pad.federation.strategy == "hetlora"  # the client contract; the driver swaps the server side
    dp = {
        "privacy.delta": 1e-5,
        "privacy.max_grad_norm": 1.0,
        "privacy.accountant": "prv",
        "lora_scale": 16.0,
    }
    private = cell_config(cfg, ("ffa", "iid", "record-eps8", "r8"), 2, {**dp, "train.lr": 0.005})
    assert private.privacy.mode == "record" and private.privacy.epsilon == 8.0
    assert private.lora.alpha == 128 and private.train.lr == 0.005
    with pytest.raises(ValueError, match="record DP"):
        cell_config(cfg, ("ffa", "iid", "record-eps8", "r8"), 0)


def test_runs_of_other_settings_are_refused(tmp_path) -> None:
    path = tmp_path / "runs.jsonl"
    runs = [{"cell": "fedit/iid/none/r8", "seed": 0, "accuracy": [0.1, 0.2, 0.3, 0.4]}]
    check_settings(runs, 3, 0.1, path)  # 4 accuracies: round 0 and 3 rounds; no alpha recorded: 0.1
    check_settings([{"cell": "linear-probe", "seed": 0, "test_accuracy": 0.4}], 12, 0.5, path)
    with pytest.raises(ValueError, match=r"holds runs of \[3\] rounds, not 12; pass --rounds 3"):
        check_settings(runs, 12, 0.1, path)
    with pytest.raises(ValueError, match=r"at Dirichlet alpha \[0.1\], not 0.5; pass --dirichlet-alpha 0.1"):
        check_settings(runs, 3, 0.5, path)
    check_settings([{**runs[0], "dirichlet_alpha": 0.5}], 3, 0.5, path)
