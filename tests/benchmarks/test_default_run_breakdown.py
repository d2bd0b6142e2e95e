"""The default-run benchmark splits the wall clock by what each metrics row measured."""

from benchmarks.default_run import breakdown


def test_breakdown_of_a_hand_made_run():
    records = [
        {"kind": "global", "round": 0, "seconds": 3.0, "eval_seconds": 3.0, "test_accuracy": 0.25},
        {"kind": "client", "round": 1, "client": {"train_seconds": 2.0, "val_seconds": 0.5}},
        {"kind": "client", "round": 1, "client": {"train_seconds": 4.0, "val_seconds": 0.5}},
        {"kind": "global", "round": 1, "seconds": 10.0, "eval_seconds": 2.0, "test_accuracy": 0.5},
        {"kind": "global", "round": 2, "seconds": 1.0, "eval_seconds": 0.0, "test_accuracy": None},
    ]
    got = breakdown(records, wall=20.0)
    assert got == {
        "client_train_seconds": 6.0,
        "client_val_seconds": 1.0,
        "server_eval_seconds": 5.0,
        "server_evaluations": 2,
        "round_seconds": 14.0,
        "rest_of_rounds_seconds": 2.0,  # 14 - 6 - 1 - 5
        "outside_rounds_seconds": 6.0,  # 20 - 14
        "train_share_of_wall": 0.3,  # 6 / 20
    }
