"""Prediction files: durable appends, recovery from a half-written last line, de-duplication."""

import json
import os

import pytest

from experiments.benchmarks.io import PredictionWriter, read_predictions


def test_written_records_read_back_keyed_by_string_id(tmp_path):
    path = tmp_path / "runs" / "pope.jsonl"  # parent directories are created
    with PredictionWriter(path) as writer:
        writer.write({"question_id": 1, "text": "Yes", "num_tokens": 2})
        writer.write({"question_id": "random/2", "text": "Été"})
    records = read_predictions(path)
    assert records == {
        "1": {"question_id": "1", "text": "Yes", "num_tokens": 2},
        "random/2": {"question_id": "random/2", "text": "Été"},
    }
    assert path.read_bytes().isascii()


def test_every_record_is_flushed_and_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = tmp_path / "p.jsonl"
    writer = PredictionWriter(path)
    writer.write({"question_id": "a", "text": "x"})
    assert len(synced) == 1
    assert read_predictions(path) == {"a": {"question_id": "a", "text": "x"}}  # visible before close
    writer.write({"question_id": "b", "text": "y"})
    assert len(synced) == 2
    writer.close()


def test_half_written_last_line_is_ignored_then_truncated_before_appending(tmp_path):
    path = tmp_path / "p.jsonl"
    with PredictionWriter(path) as writer:
        writer.write({"question_id": "1", "text": "Yes"})
        writer.write({"question_id": "2", "text": "No"})
    complete = path.read_bytes()
    # Simulate a crash in the middle of writing record 3.
    path.write_bytes(complete + b'{"question_id": "3", "te')

    assert set(read_predictions(path)) == {"1", "2"}
    assert path.read_bytes().endswith(b'"te')  # reading does not modify the file

    with PredictionWriter(path) as writer:
        assert path.read_bytes() == complete  # the partial line is gone before anything is appended
        writer.write({"question_id": "3", "text": "Yes"})
    assert path.read_bytes() == complete + b'{"question_id": "3", "text": "Yes"}\n'
    assert set(read_predictions(path)) == {"1", "2", "3"}


def test_last_line_without_newline_counts_as_unwritten_even_if_valid_json(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"question_id": "1", "text": "a"}\n{"question_id": "2", "text": "b"}')
    assert set(read_predictions(path)) == {"1"}


def test_file_holding_only_a_partial_line_is_emptied(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"question_id": "1", "te')
    assert read_predictions(path) == {}
    PredictionWriter(path).close()
    assert path.read_bytes() == b""


def test_duplicates_keep_the_last_record(tmp_path):
    path = tmp_path / "p.jsonl"
    with PredictionWriter(path) as writer:
        writer.write({"question_id": "1", "text": "first"})
        writer.write({"question_id": "2", "text": "other"})
    with PredictionWriter(path) as writer:  # a resumed run redoes item 1
        writer.write({"question_id": 1, "text": "second"})
    records = read_predictions(path)
    assert list(records) == ["1", "2"]
    assert records["1"]["text"] == "second"


def test_corrupt_complete_line_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"question_id": "1"}\n\nnot json\n{"question_id": "2"}\n')
    with pytest.raises(ValueError, match=rf"{path}:3: corrupt prediction record"):
        read_predictions(path)


def test_record_without_question_id_is_an_error(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"text": "Yes"}) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:1: .*'question_id'"):
        read_predictions(path)
    with PredictionWriter(tmp_path / "q.jsonl") as writer, pytest.raises(ValueError, match="question_id"):
        writer.write({"text": "Yes"})


def test_missing_prediction_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_predictions(tmp_path / "nope.jsonl")
