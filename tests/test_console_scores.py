"""Progress line and summary name the held-out score for what it is (label vs token accuracy)."""

from server.outputs import progress_line
from simulations.console import _score_rows

CLS = {"round": 2, "test_accuracy": 0.5, "test_loss": 1.2}
LM = {"round": 2, "test_accuracy": 0.61, "test_loss": 1.2, "test_exact_match": 0.25, "test_perplexity": 3.456}


def test_progress_line_of_a_causal_lm_shows_exact_match_token_accuracy_and_perplexity():
    line = progress_line(LM, 3, "causal-lm")
    assert "exact match 0.250  token acc 0.610  ppl 3.46" in line and "test acc" not in line
    unevaluated = progress_line({"round": 1, "test_accuracy": None, "test_loss": None}, 3, "causal-lm")
    assert "exact match   -    token acc   -    ppl   -  " in unevaluated


def test_progress_line_of_a_classifier_keeps_test_accuracy():
    assert "test acc 0.500  test loss 1.200" in progress_line(CLS, 3)


def test_summary_rows_for_a_causal_lm_name_each_score():
    base = {**LM, "round": 0, "test_exact_match": 0.0, "test_accuracy": 0.4, "test_perplexity": 9.0}
    rows = dict(_score_rows([base, LM]))
    assert rows["final (held-out)"] == "exact match 0.250, token accuracy 0.610, perplexity 3.46"
    assert rows["best exact match"] == "0.250  (round 2)"
    assert rows["round 0 (base model)"] == "exact match 0.000, token accuracy 0.400, perplexity 9.00"
    assert not any("test accuracy" in name for name in rows)


def test_summary_rows_for_a_classifier():
    rows = dict(_score_rows([{**CLS, "round": 0, "test_accuracy": 0.3}, CLS]))
    assert rows == {
        "final test accuracy": "0.500  (loss 1.200)",
        "best test accuracy": "0.500  (round 2)",
        "round 0 (initial adapter)": "0.300",
    }
    assert _score_rows([]) == []
