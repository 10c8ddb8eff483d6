"""``python -m fused_xent bench`` on this machine's default case (CPU: ``cpu_small``): every
available method runs without an error row, agrees with the fp32 reference, and the JSON and
Markdown files are written."""

from __future__ import annotations

import json

import pytest
import torch

from fused_xent import bench


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU default case is the full Gemma 2 head")
def test_bench_default_case_writes_its_files(tmp_path, capsys):
    bench.main(["--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = data["rows"]
    assert {r["method"] for r in rows} >= {"torch_eager", "fused_xent[auto]"}
    for r in rows:
        assert "error" not in r, r
        assert r["loss_err"] < 1e-5 and r["gx_err"] < 1e-5 and r["gw_err"] < 1e-5, r
    assert data["env"]["command"].startswith("python -m fused_xent bench")
    md = (tmp_path / "bench.md").read_text()
    assert "| cpu_small | fused_xent[auto] |" in md and md in capsys.readouterr().out
