"""bench.data: the loader benchmark runs on generated JPEGs and writes its JSON (a smoke test, no timing)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import data
from tests.conftest import import_or_skip


def test_bench_data_writes_rows_for_each_path(tmp_path: Path, capsys) -> None:
    import_or_skip("torchvision")
    args = ["--synthetic", "16", "--batch-size", "8", "--size", "32", "--workers", "0", "--rounds", "1"]
    data.main([*args, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "loader throughput" in out and "CPU ms per image by stage" in out
    (path,) = tmp_path.glob("data-*.json")
    payload = json.loads(path.read_text())
    rows = {r["path"]: r for r in payload["rows"]}
    assert {"pil-float", "pil-uint8", "cpu"} <= set(rows)
    for row in rows.values():
        keys = {"path", "workers", "img_per_s", "img_per_s_per_worker", "device", "cpu_ms_per_img"}
        assert keys <= set(row)
        assert row["img_per_s"] > 0 and row["workers"] == 0
    assert rows["pil-float"]["vs_pil_float"] == 1.0
    assert payload["env"]["commit"] and payload["images"] == 16
