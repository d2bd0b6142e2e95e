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
        ckpt = load_checkpoint(out / "checkpoint.pt") if (out / "checkpoint.pt").exists() else {}
        self.state: dict[str, torch.Tensor] = ckpt.get("state", {})
        self.merge: dict[str, torch.Tensor] = dict(ckpt.get("strategy", {}).get("merge", {}))

    def glob(self, rnd: int) -> dict[str, Any]:
        return next(r for r in self.rows if r["kind"] == "global" and r["round"] == rnd)

    def rejected(self, rnd: int = 1) -> dict[int, str]:
        return {r["node"]: r["reason"] for r in self.glob(rnd)["rejected"]}

    def finite(self) -> bool:
        return all(bool(torch.isfinite(v).all()) for v in [*self.state.values(), *self.merge.values()])

    def effective(self, scale: float = 2.0) -> dict[str, torch.Tensor]:
        """The global model's change as dense weights: ``s B A`` per module (or FLoRA's merged
        ``B A``) plus the head tensors (float64; fine for MiniLM's 384 x 384 modules)."""
        from fedlora.adapters import is_lora, split_state

        if self.merge:
            pairs, _ = split_state(self.merge)
            out = {m: p.b.double() @ p.a.double() for m, p in pairs.items()}
        else:
            pairs, _ = split_state(self.state)
            out = {m: scale * p.b.double() @ p.a.double() for m, p in pairs.items()}
        out.update({k: v.double() for k, v in self.state.items() if not is_lora(k)})
        return out


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


def distance(a: Run, b: Run) -> float:
    """Frobenius distance between two runs' global models (:meth:`Run.effective`)."""
    ea, eb = a.effective(), b.effective()
    return float(sum(((ea[k] - eb[k]) ** 2).sum() for k in sorted(set(ea) | set(eb))) ** 0.5)
