"""Tests of the embedded default task: determinism, balance, disjoint splits, order-only labels."""

from __future__ import annotations

import random
from collections import Counter, defaultdict

import pytest

from fedlora.data.embedded import EMBEDDED_LABELS, embedded_splits, generate_embedded


def test_labels_are_human_readable_and_at_least_four() -> None:
    assert len(EMBEDDED_LABELS) >= 4
    assert len(set(EMBEDDED_LABELS)) == len(EMBEDDED_LABELS)
    assert all(name.isalpha() for name in EMBEDDED_LABELS)


def test_records_have_text_and_valid_label() -> None:
    for record in generate_embedded(200, seed=3):
        assert set(record) == {"text", "label"}
        assert isinstance(record["text"], str) and record["text"]
        assert isinstance(record["label"], int) and 0 <= record["label"] < len(EMBEDDED_LABELS)


def test_same_seed_gives_same_records() -> None:
    assert generate_embedded(300, seed=7) == generate_embedded(300, seed=7)
    assert embedded_splits(100, 50, seed=7) == embedded_splits(100, 50, seed=7)


def test_different_seeds_give_different_records() -> None:
    assert generate_embedded(100, seed=1) != generate_embedded(100, seed=2)


def test_global_random_state_is_untouched() -> None:
    random.seed(123)
    expected = random.random()
    random.seed(123)
    generate_embedded(50, seed=0)
    embedded_splits(50, 20, seed=0)
    assert random.random() == expected


def test_zero_examples_and_negative_sizes() -> None:
    assert generate_embedded(0, seed=0) == []
    with pytest.raises(ValueError, match="num_examples"):
        generate_embedded(-1, seed=0)
    with pytest.raises(ValueError, match="num_test"):
        embedded_splits(10, -1, seed=0)


@pytest.mark.parametrize("n", [4, 101, 1000])
def test_all_labels_present_and_balanced(n: int) -> None:
    counts = Counter(r["label"] for r in generate_embedded(n, seed=5))
    assert set(counts) == set(range(len(EMBEDDED_LABELS)))
    assert max(counts.values()) - min(counts.values()) <= 1


def test_texts_are_varied() -> None:
    records = generate_embedded(2000, seed=0)
    assert len({r["text"] for r in records}) > 0.95 * len(records)


def test_texts_are_short() -> None:
    # Short texts keep a CPU training step cheap; whitespace words bound word pieces loosely.
    assert max(len(str(r["text"]).split()) for r in generate_embedded(2000, seed=0)) <= 20


def test_test_split_is_disjoint_balanced_and_independent_of_train_size() -> None:
    train, test = embedded_splits(2000, 500, seed=0)
    assert len(train) == 2000 and len(test) == 500
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    assert len({r["text"] for r in test}) == len(test)
    counts = Counter(r["label"] for r in test)
    assert max(counts.values()) - min(counts.values()) <= 1
    # The test stream is separate from the training one: its texts do not depend on how
    # many training records were drawn (up to the rare duplicates that are rejected).
    _, other_test = embedded_splits(10, 500, seed=0)
    shared = {r["text"] for r in test} & {r["text"] for r in other_test}
    assert len(shared) > 0.9 * len(test)


def test_labels_differ_by_word_order_alone() -> None:
    # The task's premise: a bag of words does not determine the label. Sentences with the
    # same multiset of words must occur with different labels.
    labels_by_bag: dict[tuple[str, ...], set[int]] = defaultdict(set)
    for record in generate_embedded(20000, seed=0):
        labels_by_bag[tuple(sorted(str(record["text"]).split()))].add(int(record["label"]))
    ambiguous = [bag for bag, labels in labels_by_bag.items() if len(labels) > 1]
    assert ambiguous
