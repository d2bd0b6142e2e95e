"""Fixtures for the adversary tests: run a real ServerRun on a FakeGrid and read what it left."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from fedlora.checkpoint import load_checkpoint
from server.loop import ServerRun
from tests.adversary.fakegrid import FakeGrid, grid_of, small_config


class Run:
    """What a finished (or aborted) run left in its directory."""

    def __init__(self, out: Path, error: Exception | None = None) -> None:
        self.out, self.error = out, error
        self.rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        ckpt = out / "checkpoint.pt"
        self.state: dict[str, torch.Tensor] = load_checkpoint(ckpt)["state"] if ckpt.exists() else {}

    def glob(self, rnd: int) -> dict[str, Any]:
        return next(r for r in self.rows if r["kind"] == "global" and r["round"] == rnd)

    def rejected(self, rnd: int = 1) -> dict[int, str]:
        return {r["node"]: r["reason"] for r in self.glob(rnd)["rejected"]}

    def finite(self) -> bool:
        return all(bool(torch.isfinite(v).all()) for v in self.state.values())


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: these runs evaluate 8 examples, where thread wake-ups cost more than math."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def run_fed(tmp_path: Path, task_identity, monkeypatch) -> Callable[..., Run]:
    """Return ``run(grid=None, **config overrides) -> Run`` driving the real ServerRun.

    The learning-curve PNG is not drawn (matplotlib costs a second per run and is not under test).
    """
    import server.loop

    monkeypatch.setattr(server.loop, "plot_metrics", lambda *a, **k: None)
    counter = iter(range(1000))

    def run(grid: FakeGrid | None = None, *, expect_error: bool = False, **over: object) -> Run:
        out = tmp_path / f"run{next(counter)}"
        cfg = small_config(out, **over)
        error: Exception | None = None
        try:
            ServerRun(grid or grid_of(4), cfg, out).run()
        except Exception as err:
            if not expect_error:
                raise
            error = err
        return Run(out, error)

    return run


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Frobenius distance between two adapter states over their common tensors (float64)."""
    return float(
        sum(((a[k].double() - b[k].double()) ** 2).sum() for k in sorted(set(a) & set(b))) ** 0.5
    )
