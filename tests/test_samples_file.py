"""``samples.jsonl`` holds each evaluated round once, also when a resumed run redoes rounds."""

import json

from fedlora.config import RunConfig
from server.outputs import SAMPLES_FILE, RunOutputs


def _rounds(path):
    return [json.loads(line)["round"] for line in path.read_text().splitlines()]


def test_resume_drops_the_samples_of_rounds_it_redoes_as_it_drops_their_metrics(tmp_path):
    out = RunOutputs(tmp_path / "run", RunConfig())
    samples = out.dir / SAMPLES_FILE
    for rnd in (0, 1, 2, 3):  # a run that was killed after round 3's evaluation
        out.log({"kind": "global", "round": rnd})
        with samples.open("a") as fh:
            fh.writelines(json.dumps({"round": rnd, "answer": a}) + "\n" for a in ("x", "y"))
    out.truncate_after(1)  # the last checkpoint was round 1: rounds 2 and 3 are redone
    assert _rounds(out.metrics_path) == [0, 1]
    assert _rounds(samples) == [0, 0, 1, 1]
    out.truncate_after(-1)  # no checkpoint at all: the run starts over
    assert samples.read_text() == "" and out.metrics_path.read_text() == ""
