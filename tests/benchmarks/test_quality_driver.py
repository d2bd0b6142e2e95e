"""The FedIT cross-term error the quality benchmark reports, on hand-computed 2 x 2 examples."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.quality_driver import cross_term_error
from fedlora.adapters import a_name, b_name
from strategies.base import ClientResult, ClientSpec

M = "base_model.model.layer.query"


def _result(
    node: int, a: list[list[float]], b: list[list[float]], n: int = 10, rank: int = 1
) -> ClientResult:
    state = {a_name(M): torch.tensor(a), b_name(M): torch.tensor(b), "classifier.weight": torch.ones(1)}
    return ClientResult(ClientSpec(node, rank, 2.0 * rank), n, state)


def test_orthogonal_rank_one_clients() -> None:
    # B1 A1 = diag(1, 0), B2 A2 = diag(0, 1); p = 1/2 each: exact = I/2, FedIT = (1/4) * ones.
    # ||exact - FedIT|| = ||[[1/4, -1/4], [-1/4, 1/4]]|| = 1/2 and ||exact|| = 1/sqrt(2).
    results = [_result(1, [[1.0, 0.0]], [[1.0], [0.0]]), _result(2, [[0.0, 1.0]], [[0.0], [1.0]])]
    assert cross_term_error(results) == pytest.approx(0.5 / math.sqrt(0.5))


def test_example_weights_enter() -> None:
    # p = (3/4, 1/4): exact = diag(3/4, 1/4); FedIT = [3/4, 1/4]^T [3/4, 1/4].
    results = [_result(1, [[1.0, 0.0]], [[1.0], [0.0]], n=30), _result(2, [[0.0, 1.0]], [[0.0], [1.0]], n=10)]
    exact = torch.diag(torch.tensor([0.75, 0.25], dtype=torch.float64))
    v = torch.tensor([0.75, 0.25], dtype=torch.float64)
    want = float(torch.linalg.matrix_norm(exact - torch.outer(v, v)) / torch.linalg.matrix_norm(exact))
    assert cross_term_error(results) == pytest.approx(want)


def test_shared_a_has_no_cross_term() -> None:
    # FFA-LoRA's situation: every client holds the same A, so B_bar A = sum p_k B_k A exactly.
    results = [_result(1, [[1.0, 2.0]], [[1.0], [0.0]]), _result(2, [[1.0, 2.0]], [[3.0], [-1.0]])]
    assert cross_term_error(results) == pytest.approx(0.0, abs=1e-12)


def test_unequal_ranks_are_refused() -> None:
    r2 = _result(2, [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]], rank=2)
    with pytest.raises(ValueError, match="equal client ranks"):
        cross_term_error([_result(1, [[1.0, 0.0]], [[1.0], [0.0]]), r2])
