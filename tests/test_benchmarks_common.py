"""Tests of benchmarks.common's output files: a fresh file unless told to overwrite."""

import argparse
import json

from benchmarks import common


def test_results_go_to_a_fresh_file_unless_told_to_overwrite(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    committed = tmp_path / "demo.json"
    committed.write_text('{"committed": true}\n')
    parser = argparse.ArgumentParser()
    common.add_output_options(parser)
    first = common.write_json("demo", [{"a": 1}], parser.parse_args([]))
    second = common.write_json("demo", [{"a": 2}], parser.parse_args([]))
    assert json.loads(committed.read_text()) == {"committed": True}  # untouched
    assert first != second and first.parent == tmp_path and first.name.startswith("demo-")
    payload = json.loads(first.read_text())
    assert payload["rows"] == [{"a": 1}]
    assert {"git", "command", "versions"} <= set(payload["environment"])
    again = common.write_json("demo", [{"a": 3}], parser.parse_args(["--overwrite"]))
    assert again == committed and json.loads(committed.read_text())["rows"] == [{"a": 3}]
    out = tmp_path / "elsewhere" / "x.json"
    assert common.write_json("demo", [], parser.parse_args(["--out", str(out)])) == out
    assert json.loads(out.read_text())["benchmark"] == "demo"
