"""Output files are replaced whole or not at all (stableopd/files.py: atomic_path and its writers)."""

import json

import pytest

from stableopd.files import atomic_path, write_jsonl_atomic, write_text_atomic


def test_a_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "deep" / "er" / "config.yaml"  # missing folders are made
    write_text_atomic(path, "a: 1\n")
    write_text_atomic(path, "a: 2\n")
    assert path.read_text() == "a: 2\n" and sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]


def test_a_writer_that_fails_leaves_the_old_file_whole(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_jsonl_atomic(path, [{"step": 1}])

    def rows():
        yield {"step": 1}
        raise OSError(28, "No space left on device")  # half-way through the new file

    with pytest.raises(OSError):
        write_jsonl_atomic(path, rows())
    assert path.read_text() == '{"step": 1}\n' and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_jsonl_rows_keep_their_text_unless_asked_to_escape(tmp_path):
    row = {"response": "x = 3 × 4 → 12"}
    write_jsonl_atomic(tmp_path / "a.jsonl", [row, row])
    write_jsonl_atomic(tmp_path / "b.jsonl", [row], ensure_ascii=True)
    assert (tmp_path / "a.jsonl").read_text(encoding="utf-8") == 2 * (
        json.dumps(row, ensure_ascii=False) + "\n"
    )
    assert (tmp_path / "b.jsonl").read_text() == json.dumps(row) + "\n" and "×" not in (
        tmp_path / "b.jsonl"
    ).read_text()


def test_a_writer_may_name_its_own_extension(tmp_path):
    path = tmp_path / "loss.png"
    with atomic_path(path, suffix=".png") as tmp:
        assert tmp.suffix == ".png" and tmp != path and not path.exists()
        tmp.write_bytes(b"png")
    assert path.read_bytes() == b"png" and not tmp.exists()
