import hashlib

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategy_testkit import PROPERTY

from fedlora.adapters import fingerprint
from strategies.base import ClientSpec, normalised_weights
from strategies.common import (
    StrategyError,
    check_number,
    pad_rank,
    require_uniform,
    slice_rank,
    weighted_sum,
)


def test_weighted_sum_hand_values():
    xs = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 0.0]])]
    w = torch.tensor([0.25, 0.75], dtype=torch.float64)
    assert torch.equal(weighted_sum(xs, w), torch.tensor([[2.5, 0.5]], dtype=torch.float64))


def test_weighted_sum_rejects_mismatches():
    with pytest.raises(StrategyError, match="different shapes"):
        weighted_sum([torch.zeros(2), torch.zeros(3)], torch.tensor([0.5, 0.5]))
    with pytest.raises(StrategyError, match="2 tensors but 1 weights"):
        weighted_sum([torch.zeros(2), torch.zeros(2)], torch.tensor([1.0]))


@PROPERTY
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=20).filter(lambda c: sum(c) > 0))
def test_normalised_weights_sum_to_one(counts):
    w = normalised_weights(counts)
    assert w.dtype == torch.float64
    assert abs(float(w.sum()) - 1.0) < 1e-12
    assert bool((w >= 0).all())


def test_pad_and_slice_hand_values():
    a = torch.tensor([[1.0, 2.0]])  # r=1, d_in=2
    b = torch.tensor([[3.0], [4.0], [5.0]])  # d_out=3
    a_pad, b_pad = pad_rank(a, b, 3)
    assert torch.equal(a_pad, torch.tensor([[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(b_pad, torch.tensor([[3.0, 0.0, 0.0], [4.0, 0.0, 0.0], [5.0, 0.0, 0.0]]))
    assert torch.equal(b_pad @ a_pad, b @ a)
    a1, b1 = slice_rank(a_pad, b_pad, 1)
    assert torch.equal(a1, a) and torch.equal(b1, b)
    with pytest.raises(StrategyError):
        pad_rank(a_pad, b_pad, 2)
    with pytest.raises(StrategyError):
        slice_rank(a, b, 2)


def test_fingerprint_is_stable_and_sensitive():
    s = {"m.lora_A.weight": torch.tensor([[1.0, 2.0]]), "x": torch.tensor([3.0])}
    fp = fingerprint(s)
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert fingerprint(dict(reversed(list(s.items())))) == fp  # order of insertion irrelevant
    assert fingerprint({k: v.double() for k, v in s.items()}) == fp  # hashed as float32
    assert fingerprint({**s, "x": torch.tensor([3.5])}) != fp
    assert fingerprint({"m.lora_A.weight": s["m.lora_A.weight"], "y": s["x"]}) != fp  # names count
    assert fingerprint({**s, "x": torch.tensor([[3.0]])}) != fp  # shapes count
    # The documented encoding, hashed independently: name, repr(shape), little-endian float32.
    h = hashlib.sha256()
    for name, shape, values in (("m.lora_A.weight", (1, 2), [1.0, 2.0]), ("x", (1,), [3.0])):
        h.update(name.encode() + repr(shape).encode() + np.asarray(values, dtype="<f4").tobytes())
    assert fp == h.hexdigest()
    assert fingerprint({}) == hashlib.sha256().hexdigest()


def test_require_uniform_messages():
    require_uniform([ClientSpec(0, 4, 8.0), ClientSpec(1, 4, 8.0)], "fedit")
    with pytest.raises(StrategyError, match=r"ranks \[2, 4\].*hetlora.*flexlora.*flora"):
        require_uniform([ClientSpec(0, 4, 8.0), ClientSpec(1, 2, 4.0)], "fedit")
    with pytest.raises(StrategyError, match="same alpha"):
        require_uniform([ClientSpec(0, 4, 8.0), ClientSpec(1, 4, 4.0)], "fedit")


def test_check_number():
    assert check_number("n", 3, minimum=0, integer=True) == 3
    for bad in (True, 1.0, "3", None):
        with pytest.raises(ValueError, match="'n' must be an integer"):
            check_number("n", bad, minimum=0, integer=True)
    with pytest.raises(ValueError, match="'x' must be > 0"):
        check_number("x", 0.0, minimum=0.0, strict=True)
