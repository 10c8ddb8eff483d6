"""``python -m fused_xent bench`` on this machine's default case (CPU: ``cpu_small``): every
available method runs without an error row, agrees with the fp32 reference, and the JSON and
Markdown files are written."""

from __future__ import annotations

import json
import time

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


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU sweep")
def test_cpu_sweep_measures_fused_xent_and_plots_it(tmp_path):
    """The sweep's methods had no fused_xent one that runs on the CPU (its rows were torch
    eager's only), and the plot drew only the GPU sweeps' panels (four empty ones here)."""
    bench.main(["--sweep", "cpu", "--only", "torch_eager", "fused_xent[auto]", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench.json").read_text(), parse_constant=_no_constants)  # strict JSON
    swept = {(r["case"], r["method"]) for r in data["rows"] if r.get("sweep") == "cpu"}
    assert {("cpu0", "fused_xent[auto]"), ("cpu1", "fused_xent[auto]")} <= swept
    assert (tmp_path / "sweeps.png").stat().st_size > 0
    assert bench.SWEEP_METHODS.count("fused_xent[auto]") == 1


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


@pytest.mark.parametrize("argv", [["cpu_small", "bogus"], ["--sweep", "bogus"]])
def test_unknown_names_are_refused_before_any_run(argv, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(bench, "run_case", lambda *a, **k: ran.append(a) or [])
    with pytest.raises(SystemExit) as exit_:
        bench.main(argv)
    assert exit_.value.code == 2 and not ran and "bogus" in capsys.readouterr().err


def test_cpu_timing_leaves_the_first_call_out():
    """On the CPU a method's first call (allocator growth, lazy imports, caches) is a warm-up,
    and the time is the median of the calls after it: one slow call does not move it."""
    calls = []

    def fn():
        calls.append(None)
        if len(calls) in (1, 3):  # the warm-up, and one slow timed call
            time.sleep(0.05)

    ms = bench._bench(fn, "cpu")
    assert len(calls) == bench.CPU_REPS + 1
    assert ms < 25
