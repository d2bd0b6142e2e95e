"""No setup reply ends the run: a valid but inconsistent reply leaves its node out with a reason.

The attacker (node 14) answers the setup query with a well-formed reply that the run cannot
use: another in-range rank or alpha, a rank at the model's ceiling, or an honest node's
partition id. Before :mod:`server.admission`, the rank/alpha cases reached the strategy's
``require_uniform`` and stopped every FedIT, FFA-LoRA and LoRA-FAIR run.
"""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord

from fedlora.protocol import ALPHA, INFO, PARTITION_ID, RANK
from tests.adversary.fakegrid import grid_of

EVIL = 14
ONE_ROUND = {"federation.num_rounds": 1}


def claims(**fields: object):
    """Setup attacker: the honest setup reply with ``fields`` replaced (wire keys)."""

    def craft(msg, content):
        content[INFO] = ConfigRecord({**dict(content[INFO]), **fields})
        return content

    return craft


def _run(run_fed, strategy: str, craft, **over):
    grid = grid_of(4)
    grid.setup_crafted[EVIL] = craft
    return run_fed(grid, **{"federation.strategy": strategy}, **ONE_ROUND, **over)


@pytest.mark.parametrize("strategy", ["fedit", "ffa", "fair"])
@pytest.mark.parametrize(
    ("fields", "reason"),
    [({RANK: 3, ALPHA: 6.0}, "rank 3 is not one the run configures"), ({ALPHA: 5.0}, "alpha 5 differs")],
)
def test_an_inconsistent_rank_or_alpha_leaves_the_node_out(run_fed, strategy, fields, reason):
    run = _run(run_fed, strategy, claims(**fields))  # the run is rank 2, alpha 4.0
    assert reason in run.rejected(0)[EVIL]
    assert run.glob(1)["clients_ok"] == 3 and run.finite()
    assert EVIL not in run.rejected(1)  # not even asked to train


@pytest.mark.parametrize("strategy", ["hetlora", "flora"])
def test_a_rank_at_the_ceiling_is_left_out(run_fed, strategy):
    run = _run(run_fed, strategy, claims(**{RANK: 384, ALPHA: 768.0}), **{"lora.ranks": "2,4"})
    assert "rank 384 is not one the run configures ([2, 4]" in run.rejected(0)[EVIL]
    assert run.glob(1)["clients_ok"] == 3
    ranks = {int(v.shape[0]) for k, v in run.state.items() if ".lora_A." in k}
    assert ranks == {4}, "the global state stays at the largest configured rank"


def test_a_second_claim_on_a_partition_id_leaves_both_claimants_out(run_fed):
    run = _run(run_fed, "fedit", claims(**{PARTITION_ID: 0}))  # node 11 owns partition 0
    rejected = run.rejected(0)
    assert set(rejected) == {11, EVIL} and "partition-id 0 is claimed by 2 nodes" in rejected[EVIL]
    assert run.glob(1)["clients_ok"] == 2 and run.finite()
