"""iwtrainer.files.write_json: the package's JSON records are written atomically."""

from __future__ import annotations

import json
import os

import pytest

from iwtrainer import IMPORTANCE_FILE, save_importance
from iwtrainer.files import write_json


def test_write_json_round_trips_and_leaves_no_temp_file(tmp_path):
    data = {"modules": {"a.query": {"rank": 3, "share": 0.25}}, "history": [1, 2.5, None], "name": "μ"}
    path = tmp_path / "deep" / "er" / "record.json"  # parent folders are created
    assert write_json(path, data) == str(path)
    assert json.loads(path.read_text()) == data
    assert path.read_text().endswith("\n") and path.read_text().startswith("{\n  ")  # indent=2, one final newline
    assert sorted(p.name for p in path.parent.iterdir()) == ["record.json"]
    write_json(path, {"replaced": True})  # an existing file is replaced as a whole
    assert json.loads(path.read_text()) == {"replaced": True}
    assert sorted(p.name for p in path.parent.iterdir()) == ["record.json"]
    write_json(path, {"path": tmp_path})  # values JSON cannot hold are written as their str()
    assert json.loads(path.read_text()) == {"path": str(tmp_path)}


def test_write_json_goes_through_a_rename(tmp_path, monkeypatch):
    """The target only ever holds a complete file: the data is written elsewhere, then ``os.replace``d over it."""
    path = tmp_path / "record.json"
    path.write_text('{"old": 1}\n')
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append((os.fspath(src), os.fspath(dst), json.loads(open(src).read()), json.loads(open(dst).read())))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    write_json(path, {"new": 2})
    [(src, dst, written, before)] = seen
    assert dst == str(path) and src != dst and os.path.dirname(src) == str(tmp_path)  # same folder: same filesystem
    assert written == {"new": 2} and before == {"old": 1}  # the target was intact until the rename
    assert json.loads(path.read_text()) == {"new": 2} and not os.path.exists(src)


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "record.json"
    write_json(path, {"old": 1})
    loop: dict = {}
    loop["self"] = loop  # not serialisable
    with pytest.raises(ValueError, match="Circular reference"):
        write_json(path, loop)
    assert json.loads(path.read_text()) == {"old": 1}


def test_importance_file_is_written_with_it(tmp_path):
    record = {"settings": {"iw_alpha": 1e-4}, "modules": {"q": {"sensitivity": 1.0, "weight": 1.0}}}
    path = save_importance(record, str(tmp_path / "run"))
    assert path == str(tmp_path / "run" / IMPORTANCE_FILE) and json.loads(open(path).read()) == record
    assert os.listdir(tmp_path / "run") == [IMPORTANCE_FILE]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "record.json"
    path.write_text('{"old": 1}\n')
    loop: dict = {}
    loop["self"] = loop  # json.dump raises on a circular reference, half-way through writing
    with pytest.raises(ValueError, match="Circular reference"):
        write_json(path, {"a": 1, "loop": loop})
    assert json.loads(path.read_text()) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]
