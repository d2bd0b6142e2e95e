"""Client-level DP as the server runs a round: adding one client moves the release by at most C.

The attack: the robust norm bound (3x the round's median norm, on by default) ran before the
DP clip. Adding one client moved the median, which rescaled the other clients' updates, so
with 5 small and 5 clipped updates one added client moved the released sum by 5.85 C, and a
run calibrated for ε = 8 spent ε ≈ 103. Here the real server path (``robust_results`` with
the privacy mechanism's permission, then ``ClientLevelDP``) runs on many compositions.
"""

import pytest
import torch

from fedlora.config import RunConfig, with_overrides
from fedlora.privacy.client_dp import ClientDPError
from server.privacy import ServerPrivacy
from server.round import RoundOutcome, robust_results
from strategies import create
from strategies.base import ClientResult, ClientSpec

A, B = "m.lora_A.weight", "m.lora_B.weight"
CLIP = 1.0
NUM_CLIENTS = 12


def cfg(**over) -> RunConfig:
    base = {
        "privacy.mode": "client",
        "privacy.noise_multiplier": 1e-12,  # (almost) no noise: the clipped sum itself is compared
        "privacy.clip_norm": CLIP,
        "privacy.client_sampling": "fixed",
        "federation.num_clients": NUM_CLIENTS,
        "federation.strategy": "fedit",
    }
    return with_overrides(RunConfig(), {**base, **over})


def state0() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {A: torch.randn(2, 6, generator=g), B: torch.randn(6, 2, generator=g) * 0.1}


def result(node: int, scale: float, seed: int) -> tuple[ClientSpec, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + seed)
    s = state0()
    upd = {k: s[k] + scale * torch.randn(*v.shape, generator=g) for k, v in s.items()}
    return ClientSpec(node, 2, 4.0), upd


def release(tmp_path, clients, relative: bool | None = None) -> torch.Tensor:
    """Run the server's round path on ``clients`` = [(scale, seed)]; return m x the released change."""
    privacy = ServerPrivacy(cfg(), tmp_path)
    strategy = privacy.wrap(create("fedit"))
    specs = [ClientSpec(i, 2, 4.0) for i in range(len(clients))]
    state = strategy.init_state(state0(), specs)
    sent = {spec.node_id: strategy.payload(state, spec) for spec in specs}
    out = RoundOutcome()
    for i, (scale, seed) in enumerate(clients):
        spec, upd = result(i, scale, seed)
        out.results.append(ClientResult(spec=spec, num_examples=10 + i, state=upd))
        out.train_losses.append((10 + i, 0.0))
    allowed = privacy.allows_cross_client_bounds if relative is None else relative
    out = robust_results(out, sent, RunConfig().robust, relative=allowed)
    new = strategy.aggregate(state, out.results)
    m = float(NUM_CLIENTS)  # fixed sampling of every client: the denominator is K
    return torch.cat([(new[k] - state[k]).double().flatten() * m for k in (A, B)])


@pytest.mark.parametrize(
    "others",
    [
        [(0.01, i) for i in range(5)] + [(5.0, 10 + i) for i in range(5)],  # the reported case
        [(0.001, i) for i in range(9)],
        [(5.0, i) for i in range(9)],
        [(0.3, i) for i in range(3)] + [(0.0, 20)],
    ],
)
@pytest.mark.parametrize("added", [(0.001, 50), (0.05, 51), (50.0, 52), (0.0, 53)])
def test_adding_one_client_moves_the_release_by_at_most_c(tmp_path, others, added):
    without = release(tmp_path / "a", others)
    with_one = release(tmp_path / "b", [*others, added])
    assert float((with_one - without).norm()) <= CLIP * (1 + 1e-5)


def test_the_same_path_with_the_median_bound_breaks_the_sensitivity(tmp_path):
    # What the server did before: the relative bound before the DP clip. An added client whose
    # norm lands between the small and the large ones raises the median, and with it the bound
    # every large update was shrunk to: the release moves by more than C. This shows the check
    # above can fail.
    others = [(0.01, i) for i in range(5)] + [(5.0, 10 + i) for i in range(5)]
    before = release(tmp_path / "a", others, relative=True)
    moved = max(
        float((release(tmp_path / f"b{i}", [*others, (scale, 60)], relative=True) - before).norm())
        for i, scale in enumerate([0.05, 0.1, 0.2, 0.4, 0.8])
    )
    assert moved > 1.2 * CLIP  # more than the C the accountant assumes


def test_a_robust_centre_under_client_dp_is_refused_with_the_fix(tmp_path):
    for aggregator in ("median", "trimmed-mean"):
        with pytest.raises(ClientDPError, match=r"robust\.aggregator = 'mean'"):
            ServerPrivacy(cfg(**{"robust.aggregator": aggregator}), tmp_path)


def test_under_client_dp_an_added_node_cannot_push_another_out(tmp_path, task_identity, monkeypatch):
    # Before: with more nodes connected than federation.num_clients the server kept the first ids, and
    # a node sharing a partition id got every claimant left out. Either way one added node removed an
    # honest one, so neighbouring federations differed in two clients (a sensitivity of 2C).
    import json

    import server.loop
    from server.loop import ServerRun
    from tests.adversary.fakegrid import FakeGrid, HonestNode, small_config

    monkeypatch.setattr(server.loop, "plot_metrics", lambda *a, **k: None)
    honest = [HonestNode(11 + i, i) for i in range(4)]
    added = HonestNode(5, 0)  # a lower id than every honest node, and partition 0 again
    out = tmp_path / "run"
    cfg = small_config(
        out,
        **{
            "federation.num_rounds": 1,
            "privacy.mode": "client",
            "privacy.noise_multiplier": 1.0,
            "privacy.client_sampling": "fixed",
            "output.eval_initial": False,
        },
    )
    ServerRun(FakeGrid([*honest, added]), cfg, out).run()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = {r["node"] for r in rows if r.get("kind") == "client" and r["round"] == 1}
    assert trained == {5, 11, 12, 13, 14}
