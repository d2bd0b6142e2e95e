import json

import pandas as pd
import pytest

from fedlora.config import DataConfig
from fedlora.data.partition import partition_records, split_local, summarize
from fedlora.data.sources import DataError, load_task_data, read_rows


def _rows(n=120, labels=("pos", "neg", "neutral", "mixed")):
    return [
        {"sentence": f"example {i} about {labels[i % len(labels)]}", "y": labels[i % len(labels)]}
        for i in range(n)
    ]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet", "hf-disk"])
def test_reads_every_format_with_column_mapping(tmp_path, fmt):
    rows = _rows()
    if fmt == "csv":
        path = tmp_path / "d.csv"
        pd.DataFrame(rows).to_csv(path, index=False)
    elif fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif fmt == "parquet":
        path = tmp_path / "d.parquet"
        pd.DataFrame(rows).to_parquet(path)
    else:
        from datasets import Dataset

        path = tmp_path / "ds"
        Dataset.from_list(rows).save_to_disk(str(path))
    cfg = DataConfig(source=str(path), text_column="sentence", label_column="y", test_fraction=0.25)
    data = load_task_data(cfg, "classification")
    assert data.labels == ("mixed", "neg", "neutral", "pos")
    assert len(data.train) == 90 and len(data.test) == 30
    assert {r["label"] for r in data.train} == {0, 1, 2, 3}
    assert all(set(r) == {"text", "label"} for r in data.train)


def test_missing_file_column_and_unknown_label(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_rows(str(tmp_path / "nope.csv"))
    path = tmp_path / "d.csv"
    pd.DataFrame(_rows()).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"column 'text' not found .*set data.text_column"):
        load_task_data(DataConfig(source=str(path)), "classification")
    test = tmp_path / "t.csv"
    pd.DataFrame([{"sentence": "x", "y": "surprise"}]).to_csv(test, index=False)
    cfg = DataConfig(source=str(path), test_source=str(test), text_column="sentence", label_column="y")
    with pytest.raises(DataError, match="label 'surprise', which is not among the known labels"):
        load_task_data(cfg, "classification")


def test_bad_jsonl_line_is_located(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{oops\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_rows(str(path))


def test_iid_partitions_are_disjoint_complete_and_deterministic():
    data = load_task_data(DataConfig(num_train=400, num_test=50), "classification")
    cfg = DataConfig()
    parts = partition_records(data.train, 4, cfg)
    assert [len(p) for p in parts] == [100, 100, 100, 100]
    texts = [r["text"] for p in parts for r in p]
    assert sorted(texts) == sorted(r["text"] for r in data.train)
    assert parts == partition_records(data.train, 4, cfg)


def test_dirichlet_skews_labels_more_than_iid():
    data = load_task_data(DataConfig(num_train=800, num_test=50), "classification")

    def max_share(parts):
        shares = []
        for row in summarize(parts, data.labels):
            counts = list(row["labels"].values())
            shares.append(max(counts) / sum(counts))
        return sum(shares) / len(shares)

    iid = partition_records(data.train, 4, DataConfig())
    skewed = partition_records(data.train, 4, DataConfig(partitioner="dirichlet", dirichlet_alpha=0.1))
    assert sum(len(p) for p in skewed) == 800
    assert max_share(skewed) > max_share(iid) + 0.2


def test_shards_give_each_client_few_labels():
    data = load_task_data(DataConfig(num_train=400, num_test=50), "classification")
    parts = partition_records(data.train, 4, DataConfig(partitioner="shards", shards_per_client=1))
    for row in summarize(parts, data.labels):
        assert len(row["labels"]) <= 2


def test_empty_partition_and_too_few_records_are_errors():
    recs = [{"text": "a", "label": 0}] * 3
    with pytest.raises(DataError, match="cannot be split across 5 clients"):
        partition_records(recs, 5, DataConfig())
    with pytest.raises(DataError, match="needs labels"):
        partition_records(
            [{"instruction": "a", "response": "b"}] * 10, 2, DataConfig(partitioner="dirichlet")
        )


def test_split_local_keeps_a_training_record():
    train, val = split_local([{"text": "a", "label": 0}], 0.5, 0)
    assert len(train) == 1 and val == []
