"""Hugging Face causal LMs: the fused loss vs the model's own, same model, same batch, one process.

``PYTHONPATH=. python benchmarks/bench_hf.py --out DIR [--cases llama_32k gemma2_256k ...]``

Per case (a random-init model built from a config as in ``examples/lm_train.py``, random
token ids) and per method -- ``own``: ``model(input_ids, labels=ids).loss``; ``fused``:
``fused_xent.integrations.transformers.causal_lm_loss`` -- it measures a training step
(forward + backward, parameter gradients reset each call) and a forward-only evaluation
(``torch.no_grad``): the median time (``triton.testing.do_bench`` on CUDA, after warm-up;
``perf_counter`` on CPU) and the peak memory above what was allocated before the call
(CUDA allocator; not measured on CPU), plus the two losses' difference. Weights are fp32
with bf16 autocast on CUDA, as ``Trainer(bf16=True)`` runs them. Writes ``bench_hf.json``
and ``bench_hf.md`` into DIR and prints the table last. A method that runs out of memory
or fails gets an error row. Without CUDA it runs the small ``cpu_small`` case.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fused_xent.integrations.transformers import causal_lm_loss  # noqa: E402

CASES = {
    # name: family, vocabulary V, hidden d, layers L, heads, batch B, sequence T
    "llama_32k": dict(family="llama", V=32768, d=768, L=6, heads=12, B=16, T=1024),  # examples/lm_train.py on GPU
    "llama3_128k": dict(family="llama", V=128256, d=2048, L=2, heads=16, B=4, T=2048),
    "gemma2_256k": dict(family="gemma2", V=256000, d=2304, L=2, heads=8, B=4, T=2048),
    "cpu_small": dict(family="llama", V=32768, d=64, L=2, heads=4, B=4, T=64),
}
GPU_CASES = ["llama_32k", "llama3_128k", "gemma2_256k"]


def build(case: dict, device: str):
    import transformers

    config_class = {"llama": transformers.LlamaConfig, "gemma2": transformers.Gemma2Config}[case["family"]]
    config = config_class(
        vocab_size=case["V"],
        hidden_size=case["d"],
        intermediate_size=4 * case["d"],
        num_hidden_layers=case["L"],
        num_attention_heads=case["heads"],
        num_key_value_heads=case["heads"],
        head_dim=case["d"] // case["heads"],
        max_position_embeddings=case["T"],
        use_cache=False,
    )
    torch.manual_seed(0)
    extra = {"attn_implementation": "eager"} if case["family"] == "gemma2" else {}
    model = transformers.AutoModelForCausalLM.from_config(config, **extra).to(device).train()
    ids = torch.randint(0, case["V"], (case["B"], case["T"]), device=device)
    return model, ids


def time_ms(fn, device: str, params) -> float:
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=100, rep=500, grad_to_none=params, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def peak_mib(fn, device: str, params) -> float | None:
    if device != "cuda":
        return None
    for p in params:
        p.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_case(name: str, case: dict, device: str) -> list[dict]:
    model, ids = build(case, device)
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" else nullcontext
    losses = {
        "own": lambda: model(input_ids=ids, labels=ids).loss,
        "fused": lambda: causal_lm_loss(model, ids, ids),
    }
    rows, values = [], {}
    for method, loss_fn in losses.items():
        for mode in ("train", "eval"):
            row = {"case": name, **case, "method": method, "mode": mode}

            def step(loss_fn=loss_fn, mode=mode):
                with autocast(), torch.no_grad() if mode == "eval" else nullcontext():
                    loss = loss_fn()
                if mode == "train":
                    loss.backward()
                return loss

            try:
                values[method] = step().item()  # warm-up; fused_xent's first call checks the head
                row["loss"] = values[method]
                row["ms"] = time_ms(step, device, params)
                row["peak_mib"] = peak_mib(step, device, params)
            except Exception as e:  # an out-of-memory or failing method becomes an error row
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                if device == "cuda":
                    torch.cuda.empty_cache()
            finally:
                for p in params:
                    p.grad = None
            rows.append(row)
    if "own" in values and "fused" in values:
        for row in rows:
            row["loss_diff_vs_own"] = abs(values["fused"] - values["own"])
    return rows


def markdown(record: dict) -> str:
    lines = [
        f"# Hugging Face causal LMs: fused loss vs the model's own ({record['device']})",
        "",
        f"{record['date']} · torch {record['torch']} · triton {record['triton']} · "
        f"transformers {record['transformers']} · `{record['command']}`",
        "",
        "Train = forward + backward of the whole model; eval = forward only under no_grad. "
        "Peak = allocator peak above what was allocated before the call.",
        "",
        "| case | V | B × T | mode | method | ms | peak MiB | loss | error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        ms = f"{r['ms']:.1f}" if "ms" in r else ""
        peak = f"{r['peak_mib']:.0f}" if r.get("peak_mib") is not None else "n/a"
        loss = f"{r['loss']:.5f}" if "loss" in r else ""
        lines.append(
            f"| {r['case']} | {r['V']} | {r['B']} × {r['T']} | {r['mode']} | {r['method']} | {ms} | {peak} "
            f"| {loss} | {r.get('error', '')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for bench_hf.json and bench_hf.md")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=None)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = args.cases or (GPU_CASES if device == "cuda" else ["cpu_small"])

    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "missing"
    rows = []
    for name in cases:
        rows += run_case(name, CASES[name], device)
        if device == "cuda":
            torch.cuda.empty_cache()  # the case's model is gone; give its memory back before the next
    record = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or 'unknown'})",
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "command": " ".join(["python", *sys.argv]),
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_hf.json").write_text(json.dumps(record, indent=1))
    (out / "bench_hf.md").write_text(markdown(record))

    print(f"\n{'case':14s} {'mode':6s} {'method':7s} {'ms':>9s} {'peak MiB':>9s} {'loss':>9s}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:14s} {r['mode']:6s} {r['method']:7s} {r['error']}")
            continue
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
        print(f"{r['case']:14s} {r['mode']:6s} {r['method']:7s} {r['ms']:9.1f} {peak:>9s} {r['loss']:9.5f}")
    print(f"wrote {out / 'bench_hf.json'} and {out / 'bench_hf.md'}")
    return record


if __name__ == "__main__":
    main()
