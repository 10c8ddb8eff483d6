"""Where the host's time goes in one fused_xent fw+bw, measured without a profiler.

Every function named below is wrapped with a ``perf_counter_ns`` timer (inclusive time: a
function's callees count in it) and the calls are made back to back without a sync, so the
numbers are the host's own cost per call (the GPU keeps up on a small head). The wrappers
themselves cost ~0.3-1 us each; the plain per-call time is measured first, unwrapped.

``PYTHONPATH=. python benchmarks/host_breakdown.py lean@94378496 auto triton``
(``impl@BYTES`` sets ``memory_budget``; ``HOST_CASE=extreme_1m`` another case of ``fused_xent.bench``;
``--plain``: the unwrapped times only; ``--toggle``: the unwrapped times with ``kernels.launch``'s
cached path off and on, alternating in one process)."""

import collections
import functools
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.runtime.jit import JITFunction

import fused_xent
from fused_xent import functional
from fused_xent.bench import CASES, host_time, make_inputs
from fused_xent.kernels import class_chunked, launch, row_chunked

case = CASES[os.environ.get("HOST_CASE", "vit21k")]
x, w, y, b = make_inputs(case, "cuda", torch.bfloat16)
TOTAL: collections.Counter = collections.Counter()
COUNT: collections.Counter = collections.Counter()

FUNCTIONAL = """_check_torch_options _autocast_dtype _check_options _check_ignore_index _check_budget
_deterministic_impl _check_linear _check_target _check_mixup _check_class_weight _choose row_targets
_report_target_range _check_scale _lean_chunk_bytes _fast_rows _spare_bytes _forward_impl reduced_loss
_setup_forward _reduced_input_grads loss_grad_coefs _input_grads _backward_impl _fast_impl scale_all_""".split()
CHUNKED = "_forward _backward _recompute_du _dense_chunk_grads _raw_products _kernel_args _chunk _accumulate".split()
ROWS = ["row_chunked_loss_grads"]
TORCH = "mm addmm sum empty empty_like zeros".split()


def _wrap(owner, name: str, label: str) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        t0 = time.perf_counter_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            TOTAL[label] += time.perf_counter_ns() - t0
            COUNT[label] += 1

    setattr(owner, name, timed)


def _wrap_launches() -> None:
    run = JITFunction.run

    def timed(self, *args, **kwargs):
        t0 = time.perf_counter_ns()
        try:
            return run(self, *args, **kwargs)
        finally:
            label = f"launch {self.fn.__name__}"
            TOTAL[label] += time.perf_counter_ns() - t0
            COUNT[label] += 1

    JITFunction.run = timed
    fast_run = launch.FastKernel.run

    def timed_fast(self, grid, args, kwargs):
        t0 = time.perf_counter_ns()
        try:
            return fast_run(self, grid, args, kwargs)
        finally:
            label = f"launch {self.fn.fn.__name__} (cached path)"
            TOTAL[label] += time.perf_counter_ns() - t0
            COUNT[label] += 1

    launch.FastKernel.run = timed_fast


def step(spec: str) -> None:
    impl, _, budget = spec.partition("@")
    for p in (x, w, b):
        if p is not None:
            p.grad = None
    if impl == "eager":
        loss = F.cross_entropy(F.linear(x, w, b).float(), y, label_smoothing=case.get("ls", 0.0))
    else:
        loss = fused_xent.linear_cross_entropy(
            x, w, y, linear_bias=b, label_smoothing=case.get("ls", 0.0), impl=impl,
            memory_budget=int(budget) if budget else None,
        )  # fmt: skip
    t0 = time.perf_counter_ns()
    loss.backward()
    TOTAL["loss.backward() (all of it)"] += time.perf_counter_ns() - t0
    COUNT["loss.backward() (all of it)"] += 1


def toggle(specs: list[str], rounds: int = 8) -> None:
    """The host's time per fw+bw and do_bench's fw+bw time with the cached Triton launches
    (``kernels.launch``) off and on, alternating in this one process: medians over ``rounds``
    (host: 50 calls each)."""
    for s in specs:
        host = {False: [], True: []}
        bench = {False: [], True: []}
        for _ in range(rounds):
            for on in (False, True):
                launch._ENABLED = on
                host[on].append(host_time(lambda s=s: step(s), 50, warmup=5) * 1e3)
                bench[on].append(triton.testing.do_bench(lambda s=s: step(s)))
        launch._ENABLED = None

        def med(v):
            return sorted(v)[len(v) // 2]

        print(
            f"{s} (medians of {rounds}): host {med(host[False]):.2f} -> {med(host[True]):.2f} ms, "
            f"do_bench {med(bench[False]):.2f} -> {med(bench[True]):.2f} ms (Triton's launch path -> cached)"
        )


def main() -> None:
    plain_only = "--plain" in sys.argv
    specs = [a for a in sys.argv[1:] if not a.startswith("--")] or ["lean@94378496", "auto", "triton", "eager"]
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; case {case}")
    plain = {s: [host_time(lambda s=s: step(s), 50, warmup=10) * 1e3 for _ in range(3)] for s in specs}
    for s in specs:
        print(f"{s}: host {' / '.join(f'{v:.2f}' for v in plain[s])} ms per fw+bw (unwrapped, 3 runs of 50)")
    if plain_only:
        return
    if "--toggle" in sys.argv:
        toggle(specs)
        return
    for name in FUNCTIONAL:
        if hasattr(functional, name):
            _wrap(functional, name, name)
    for name in CHUNKED:
        _wrap(class_chunked, name, f"class_chunked.{name}")
    for name in ROWS:
        _wrap(row_chunked, name, f"row_chunked.{name}")
    for name in TORCH:
        _wrap(torch, name, f"torch.{name}")
    _wrap(torch.Tensor, "to", "Tensor.to")
    _wrap_launches()
    _wrap(fused_xent, "linear_cross_entropy", "linear_cross_entropy (the forward, all of it)")
    for s in specs:
        TOTAL.clear()
        COUNT.clear()
        calls = 50
        wrapped = host_time(lambda s=s: step(s), calls, warmup=0) * 1e3
        TOTAL.clear()
        COUNT.clear()
        wrapped = host_time(lambda s=s: step(s), calls, warmup=0) * 1e3
        print(f"\n## {s}: {wrapped:.2f} ms per fw+bw wrapped; inclusive us per call (calls per call)")
        for label, ns in TOTAL.most_common():
            print(f"  {ns / calls / 1e3:8.1f}  ({COUNT[label] / calls:4.1f})  {label}")


if __name__ == "__main__":
    main()
