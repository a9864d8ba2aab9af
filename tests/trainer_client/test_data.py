"""Data sources: JSONL, Parquet, saved `datasets` datasets and data-file directories, with column mapping."""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer_client.data import Columns, DataError, StreamedRows, load_rows, rows_for_step, stream_rows

RECORDS = [{"question": f"{a}+{a}=", "response": str(2 * a), "gold": str(2 * a)} for a in range(10, 30)]
MAPPING = Columns(prompt="question", completion="response", answer="gold")


def _expected(records=RECORDS):
    return [(r["question"], r["response"], r["gold"]) for r in records]


def _triples(rows):
    return [(row.prompt, row.completion, row.answer) for row in rows]


def test_a_saved_dataset_is_read_by_row_with_its_columns_mapped(tmp_path):
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "saved"))
    data = load_rows(tmp_path / "saved", columns=MAPPING)
    assert len(data) == 20 and _triples(data.rows) == _expected()
    assert _triples(data.rows[5:7]) == _expected()[5:7]
    # A run walks it batch by batch exactly as it walks the same rows from a JSONL file.
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": q, "completion": c, "answer": a}) + "\n" for q, c, a in _expected()))
    for step in range(6):
        assert _triples(rows_for_step(data, step, 7, seed=3)) == _triples(rows_for_step(load_rows(jsonl), step, 7, seed=3))


def test_a_saved_dataset_dict_needs_an_existing_split(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS[:15]), "test": datasets.Dataset.from_list(RECORDS[15:])}).save_to_disk(
        str(tmp_path / "splits"))
    assert _triples(load_rows(tmp_path / "splits", columns=MAPPING, split="test").rows) == _expected()[15:]
    with pytest.raises(DataError, match="no split 'validation' \\(splits: train, test\\)"):
        load_rows(tmp_path / "splits", columns=MAPPING, split="validation")


def test_parquet_is_read_whole_or_streamed(tmp_path):
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "rows.parquet")
    assert _triples(load_rows(tmp_path / "rows.parquet", columns=MAPPING).rows) == _expected()
    assert _triples(stream_rows(str(tmp_path / "rows.parquet"), columns=MAPPING)) == _expected()


def test_a_directory_of_data_files_loads_like_a_hub_dataset(tmp_path):
    (tmp_path / "repo").mkdir()
    pq.write_table(pa.Table.from_pylist(RECORDS[:12]), tmp_path / "repo" / "train.parquet")
    pq.write_table(pa.Table.from_pylist(RECORDS[12:]), tmp_path / "repo" / "test.parquet")
    assert _triples(load_rows(tmp_path / "repo", columns=MAPPING, split="test").rows) == _expected()[12:]


def test_a_missing_prompt_column_is_named_with_the_columns_there_are(tmp_path):
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "rows.parquet")
    with pytest.raises(DataError, match="no column 'prompt' for the prompt \\(columns: question, response, gold\\).*--prompt-column"):
        load_rows(tmp_path / "rows.parquet")


def test_malformed_arrow_rows_are_named_or_skipped(tmp_path):
    records = [dict(r) for r in RECORDS]
    records[3]["question"] = ""
    records[7]["question"] = None
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "rows.parquet")
    with pytest.raises(DataError, match="rows.parquet: row 3: malformed row: prompt"):
        load_rows(tmp_path / "rows.parquet", columns=MAPPING)
    data = load_rows(tmp_path / "rows.parquet", skip_bad_rows=True, columns=MAPPING)
    assert data.skipped == 2 and _triples(data.rows) == [t for i, t in enumerate(_expected()) if i not in (3, 7)]


def test_a_missing_file_is_an_error_not_a_hub_lookup(tmp_path):
    with pytest.raises(DataError, match="absent.jsonl: no such file"):
        load_rows(tmp_path / "absent.jsonl")


def test_jsonl_rows_keep_their_line_numbers_in_errors(tmp_path):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"prompt": "1+1="}) + "\n" + json.dumps({"prompt": 3}) + "\n")
    with pytest.raises(DataError, match="rows.jsonl:2: malformed row: prompt"):
        load_rows(tmp_path / "rows.jsonl")


def test_streamed_training_rows_walk_shuffled_epochs_and_resume_at_any_step(tmp_path):
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "rows.parquet")
    walked = StreamedRows(str(tmp_path / "rows.parquet"), MAPPING, seed=3, buffer=8)
    batches = [_triples(rows_for_step(walked, step, 5, seed=3)) for step in range(8)]  # 40 rows: two epochs of 20
    first, second = sum(batches[:4], []), sum(batches[4:], [])
    assert sorted(first) == sorted(second) == sorted(_expected())  # each epoch holds every row once
    assert first != _expected() and first != second  # shuffled, differently per epoch
    # A resumed run asks for step 6 first: the same rows as the walk gave it, and the walk goes on from there.
    resumed = StreamedRows(str(tmp_path / "rows.parquet"), MAPPING, seed=3, buffer=8)
    assert [_triples(rows_for_step(resumed, step, 5, seed=3)) for step in (6, 7)] == batches[6:]
    assert _triples(rows_for_step(resumed, 2, 5, seed=3)) == batches[2]  # earlier: read again from the start
