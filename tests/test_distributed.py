"""fused_xent.distributed against the single-process fused_xent.linear_cross_entropy (itself
tested against torch in test_functional.py), with gloo in 2 and 3 CPU processes and
uneven shards: the loss and every gradient for the option matrix, in float64.

Each world runs every case in one ``torch.multiprocessing.start_processes`` (starting
processes is the slow part, so they are forked from this one with torch and open_clip
already imported and warmed up); every rank writes what it found per case to a JSON file
that the parametrised tests below read.
"""

from __future__ import annotations

import json
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch_reference import rel_err

import fused_xent
from fused_xent import distributed

C = 37
#: Uneven shard sizes per world size; they tile [0, C).
SHARDS = {2: [13, 24], 3: [5, 20, 12]}
#: float64 differs from the single process only in summation order (partial sums over
#: shards, a log-sum-exp of partial lse): ~1e-15. A wrong term in the math is >= 1e-3.
TOL64 = 1e-12
#: float32 through the Triton interpreter: fp32 rounding of a few dozen-term sums.
TOL32 = 2e-5


def _case(N=23, D=11, *, bias=False, weight=False, dense=False, ignore=0, lead=None, noncontig=False, **opts):
    return dict(N=N, D=D, bias=bias, weight=weight, dense=dense, ignore=ignore, lead=lead, noncontig=noncontig,
                opts=opts)  # fmt: skip


CASES = {
    "mean": _case(),
    "sum_bias": _case(bias=True, reduction="sum"),
    "none_weight_smoothing_ignore_bias": _case(bias=True, weight=True, ignore=4, reduction="none", label_smoothing=0.1),
    "mean_weight_smoothing_ignore": _case(weight=True, ignore=5, label_smoothing=0.2),
    "ignore_index_is_a_class": _case(weight=True, ignore=3, ignore_index=5, label_smoothing=0.1),
    "ignore_index_none": _case(ignore_index=None, label_smoothing=0.1),
    "every_row_ignored": _case(ignore=23, label_smoothing=0.1, bias=True),
    "every_row_ignored_sum": _case(ignore=23, reduction="sum"),
    "learnable_scale_softcap": _case(bias=True, scale="learn", softcap=4.0),
    "float_scale_zloss_lse": _case(scale=1.7, z_loss=1e-2, return_lse=True, reduction="none", ignore=3),
    "mixup_rows": _case(mixup="rows", weight=True, ignore=4, label_smoothing=0.1),
    "mixup_float_sum": _case(mixup=0.3, reduction="sum", bias=True),
    "probabilities": _case(dense=True, weight=True, bias=True, label_smoothing=0.2),
    "probabilities_none_lse_zloss": _case(dense=True, reduction="none", return_lse=True, z_loss=1e-3),
    "leading_dims": _case(lead=(3, 5), reduction="none", ignore=2, bias=True),
    "strided_input": _case(noncontig=True, weight=True),
    "one_row": _case(N=1, bias=True, label_smoothing=0.1),
    "partial_input_grad": _case(bias=True, scale="learn", reduce_input_grad=False, label_smoothing=0.1),
    "num_classes_given": _case(num_classes=C, weight=True, mixup="rows"),
    "no_grad": _case(bias=True, label_smoothing=0.1, grad=False),
    "triton": _case(
        N=19,
        D=13,
        dtype=torch.float32,
        impl="triton",
        bias=True,
        weight=True,
        ignore=2,
        label_smoothing=0.1,
        scale="learn",
        z_loss=1e-3,
        mixup="rows",
    ),  # fmt: skip
    "lean": _case(N=17, D=9, dtype=torch.float32, impl="lean", bias=True, label_smoothing=0.1, mixup="rows"),
    "triton_probabilities": _case(N=9, D=5, dtype=torch.float32, impl="triton", dense=True, softcap=3.0),
}


def _problem(case: dict, seed: int):
    """Full (unsharded) float64 inputs, identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    shape = case["lead"] or (case["N"],)
    D = case["D"]
    x = torch.randn(*shape, D, generator=g, dtype=torch.float64)
    if case["noncontig"]:
        x = torch.randn(D, *shape, generator=g, dtype=torch.float64).transpose(0, -1)
    w = torch.randn(C, D, generator=g, dtype=torch.float64) / D**0.5 * 2
    b = torch.randn(C, generator=g, dtype=torch.float64) * 0.5 if case["bias"] else None
    cw = torch.rand(C, generator=g, dtype=torch.float64) + 0.5 if case["weight"] else None
    ignore_index = case["opts"].get("ignore_index", -100)
    if case["dense"]:
        y = torch.softmax(torch.randn(*shape, C, generator=g, dtype=torch.float64) * 2, -1)
    else:
        y = torch.randint(0, C, shape, generator=g)
        if case["ignore"]:
            y.view(-1)[torch.randperm(y.numel(), generator=g)[: case["ignore"]]] = ignore_index
    extra = {}
    mixup = case["opts"].get("mixup")
    if mixup is not None:
        extra["target2"] = torch.randint(0, C, shape, generator=g)
        extra["lam"] = torch.rand(shape, generator=g, dtype=torch.float64) if mixup == "rows" else mixup
    return x, w, b, cw, y, extra


def _run_case(name: str, case: dict, rank: int, world: int, device: str = "cpu") -> list[str]:
    """Distributed vs single process on this rank; a list of mismatches (empty: agreement).
    float64 on CPU; on CUDA float32 (the Triton and lean paths take no float64)."""
    opts = dict(case["opts"])
    dtype = opts.pop("dtype", torch.float64 if device == "cpu" else torch.float32)
    opts.pop("mixup", None)
    want_grad = opts.pop("grad", True)
    reduce_dx = opts.pop("reduce_input_grad", True)
    num_classes = opts.pop("num_classes", None)
    impl = opts.pop("impl", "auto")
    learn_scale = opts.get("scale") == "learn"
    want_lse = opts.get("return_lse", False)
    x, w, b, cw, y, extra = (
        t.to(device) if isinstance(t, torch.Tensor) else t for t in _problem(case, seed=sum(map(ord, name)))
    )
    extra = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
    offset = sum(SHARDS[world][:rank])
    rows = slice(offset, offset + SHARDS[world][rank])

    def leaves():
        xx = x.to(dtype).requires_grad_(want_grad)
        ww = w.to(dtype).requires_grad_(want_grad)
        bb = b.to(dtype).requires_grad_(want_grad) if b is not None else None
        ss = torch.tensor(2.5, device=device, requires_grad=want_grad) if learn_scale else opts.get("scale")
        return xx, ww, bb, ss

    def backward(out, tensors):
        loss, lse = out if want_lse else (out, None)
        total = (loss * torch.randn(loss.shape, generator=torch.Generator().manual_seed(7)).to(loss)).sum()
        if want_lse:
            total = total + (lse * torch.randn(lse.shape, generator=torch.Generator().manual_seed(8)).to(lse)).sum()
        if not want_grad:
            return [None] * len(tensors)
        return torch.autograd.grad(total, tensors, allow_unused=True)

    kw = {**opts, **extra}
    xs, ws, bs, ss = leaves()
    kw_single = dict(kw, scale=ss, linear_bias=bs, weight=cw.to(dtype) if cw is not None else None)
    single = fused_xent.linear_cross_entropy(xs, ws, y.to(dtype) if case["dense"] else y, impl=impl, **kw_single)
    single_grads = backward(single, [t for t in (xs, ws, bs, ss) if isinstance(t, torch.Tensor)])

    xd, wd, bd, sd = leaves()
    w_shard = wd.detach()[rows].requires_grad_(want_grad)
    b_shard = bd.detach()[rows].requires_grad_(want_grad) if bd is not None else None
    y_local = y[..., rows].to(dtype) if case["dense"] else y
    kw_dist = dict(kw, scale=sd, linear_bias=b_shard, weight=cw[rows].to(dtype) if cw is not None else None)
    got = distributed.linear_cross_entropy(
        xd, w_shard, y_local, class_offset=offset, num_classes=num_classes, reduce_input_grad=reduce_dx, impl=impl,
        **kw_dist,
    )  # fmt: skip
    got_grads = list(backward(got, [t for t in (xd, w_shard, b_shard, sd) if isinstance(t, torch.Tensor)]))
    if want_grad and not reduce_dx:  # the caller's own reduction of the partial input gradient
        dist.all_reduce(got_grads[0])

    tol = TOL64 if dtype == torch.float64 else TOL32
    errors = []
    pairs = [("loss", single[0] if want_lse else single, got[0] if want_lse else got)]
    if want_lse:
        pairs.append(("lse", single[1], got[1]))
    if want_grad:
        names = ["input", "linear_weight", "linear_bias", "scale"]
        present = [n for n, t in zip(names, (xs, ws, bs, ss), strict=True) if isinstance(t, torch.Tensor)]
        for n, s, g in zip(present, single_grads, got_grads, strict=True):
            if n == "linear_weight" or n == "linear_bias":
                s = s[rows]
            pairs.append((f"grad {n}", s, g))
    for label, ref, out in pairs:
        if out.shape != ref.shape or out.dtype != ref.dtype:
            errors.append(f"{label}: {tuple(out.shape)} {out.dtype} vs {tuple(ref.shape)} {ref.dtype}")
        elif rel_err(out, ref) > tol:
            errors.append(f"{label}: rel err {rel_err(out, ref):.3g} > {tol}")
    return errors


def _run_bad_inputs(rank: int, world: int) -> list[str]:
    """Each bad argument raises the named error on every rank (so no rank waits in a collective)."""
    offset = sum(SHARDS[world][:rank])
    n_local = SHARDS[world][rank]
    x = torch.randn(8, 6, dtype=torch.float64)
    w = torch.randn(n_local, 6, dtype=torch.float64)
    y = torch.randint(0, C, (8,))
    bad = [
        (dict(class_offset=-1), ValueError, "class_offset must be"),
        (dict(class_offset=0), ValueError, "must tile"),
        (dict(class_offset=offset, num_classes=offset + n_local - 1), ValueError, "exceeds num_classes"),
        (dict(class_offset=offset, weight=torch.rand(C, dtype=torch.float64)), ValueError, "weight must be"),
        (dict(class_offset=offset, target=torch.full((8,), C)), ValueError, f"target contains {C}"),
        (dict(class_offset=offset, target=torch.rand(8, C, dtype=torch.float64)), ValueError, "probabilities"),
        (dict(class_offset=offset, impl="reference"), ValueError, "impl must be"),
        (dict(class_offset=offset, reduction="avg"), ValueError, "reduction must be"),
    ]
    errors = []
    for kw, err, match in bad:
        kw = dict(kw)
        target = kw.pop("target", y)
        try:
            distributed.linear_cross_entropy(x, w, target, **kw)
            errors.append(f"{kw}: no error")
        except err as e:
            if match not in str(e):
                errors.append(f"{kw}: {e!r} does not say {match!r}")
    return errors


def _run_create_graph(rank: int, world: int) -> list[str]:
    """A backward with create_graph=True raises on every rank (the ranks' lse and dX are combined
    by collectives autograd does not differentiate: a second-order gradient would be this rank's
    part only), and a plain backward of the same loss still works."""
    offset = sum(SHARDS[world][:rank])
    x = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(SHARDS[world][rank], 6, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, C, (8,), generator=torch.Generator().manual_seed(0))
    loss = distributed.linear_cross_entropy(x, w, y, class_offset=offset, impl="chunked")
    try:
        torch.autograd.grad(loss, x, create_graph=True, retain_graph=True)
        return ["create_graph=True: no error"]
    except RuntimeError as e:
        if "create_graph=True" not in str(e):
            return [f"create_graph=True: {e!r}"]
    loss.backward()
    return [] if x.grad is not None and w.grad is not None else ["no gradients after a plain backward"]


def _run_gather(rank: int, world: int) -> list[str]:
    """Values and gradients of gather_features equal open_clip's own, for the four modes."""
    from open_clip.loss import gather_features as open_clip_gather

    errors = []
    for local_loss in (False, True):
        for with_grad in (False, True):
            g = torch.Generator().manual_seed(100 + rank)
            feats = [torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(2)]
            probe = [torch.randn(4 * world, 6, generator=torch.Generator().manual_seed(i)) for i in (1, 2)]
            results = []
            for fn in (open_clip_gather, distributed.gather_features):
                leaves = [f.clone().requires_grad_() for f in feats]
                out = fn(*leaves, local_loss=local_loss, gather_with_grad=with_grad, rank=rank, world_size=world)
                total = sum((o * p.to(o)).sum() for o, p in zip(out, probe, strict=True))
                if total.requires_grad:  # local_loss without gather_with_grad leaves nothing to differentiate
                    total.backward()
                results.append([o.detach() for o in out] + [f.grad for f in leaves])
            for i, (ours, theirs) in enumerate(zip(results[1], results[0], strict=True)):
                # sums over ranks in another order than torch.distributed.nn's: equal to rounding
                if (ours is None) != (theirs is None) or (ours is not None and rel_err(ours, theirs) > 1e-15):
                    errors.append(f"local_loss={local_loss} gather_with_grad={with_grad}: output {i} differs")
    return errors


def _run_cross_rank(rank: int, world: int) -> list[str]:
    """Calls the ranks make differently are refused on every rank, by the shards' gather (a
    different N aborted gloo's process; a different smoothing gave a loss neither rank's);
    a rank whose whole shard has a -inf bias (padding classes) leaves the loss finite through
    the no-grad forwards too (it was NaN there: exp(-inf - -inf)); a label outside [0, C)
    makes its row NaN where the range check is not run (no index past the shard's weights)."""
    offset, n_local = sum(SHARDS[world][:rank]), SHARDS[world][rank]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 6, dtype=torch.float64, generator=g)
    w_all = torch.randn(C, 6, dtype=torch.float64, generator=g)
    y = torch.randint(0, C - SHARDS[world][-1], (8,), generator=g)  # none in the last shard
    w = w_all[offset : offset + n_local]
    errors = []
    rows = 8 - rank  # a different N on each rank
    calls = [(x, w, y, dict(label_smoothing=0.1 * rank)), (x[:rows], w, y[:rows], {})]
    calls.append((x.float() if rank else x, w.float() if rank else w, y, {}))  # another dtype on rank 1
    for xx, ww, yy, kw in calls:
        try:
            distributed.linear_cross_entropy(xx, ww, yy, class_offset=offset, **kw)
            errors.append(f"{kw}, N {len(yy)}, {xx.dtype} on rank {rank}: no error")
        except ValueError as e:
            if "call differs" not in str(e):
                errors.append(f"{kw}: {e!r}")
    # legitimate calls the comparison must not refuse: an unbatched probability target (its one dim is
    # the rank's own classes, uneven across ranks) and a frozen trunk with only some shards trained
    probs = torch.softmax(torch.randn(C, dtype=torch.float64, generator=g), 0)
    got = distributed.linear_cross_entropy(x[0], w, probs[offset : offset + n_local], class_offset=offset)
    want = fused_xent.linear_cross_entropy(x[0], w_all, probs, impl="chunked")
    if not abs(got.item() - want.item()) <= 1e-12 * abs(want.item()):
        errors.append(f"unbatched probabilities: {got.item()} for {want.item()}")
    w_part = w.clone().requires_grad_(rank == world - 1)
    got = distributed.linear_cross_entropy(x, w_part, y, class_offset=offset)
    if got.requires_grad:
        got.backward()
    want = fused_xent.linear_cross_entropy(x, w_all, y, impl="chunked")
    if not abs(got.item() - want.item()) <= 1e-12 * abs(want.item()):
        errors.append(f"partly frozen shards: {got.item()} for {want.item()}")
    b_all = torch.zeros(C, dtype=torch.float64)
    b_all[C - SHARDS[world][-1] :] = float("-inf")
    want = fused_xent.linear_cross_entropy(x, w_all, y, linear_bias=b_all, impl="chunked")
    impls = ["chunked"] + (["lean", "triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    for impl in impls:
        dtype = torch.float64 if impl == "chunked" else torch.float32
        b = b_all[offset : offset + n_local].to(dtype)
        with torch.no_grad():
            got = distributed.linear_cross_entropy(
                x.to(dtype), w.to(dtype), y, linear_bias=b, class_offset=offset, impl=impl
            )
        if not abs(got.item() - want.item()) <= 1e-5 * abs(want.item()):
            errors.append(f"masked shard, {impl}, no grad: {got.item()} for {want.item()}")
    bad = torch.tensor([1, C + 5, -7, 2])
    opts = distributed.XentOptions(num_classes=C, label_smoothing=0.1)
    weights = torch.rand(n_local, dtype=torch.float64)
    rt = distributed.shard_row_targets(
        bad, target2=None, lam=None, class_weight=weights, ignore_index=-100, opts=opts, class_offset=offset,
        num_local=n_local,
    )  # fmt: skip
    if rt.lse_coef.isnan().tolist() != [False, True, True, False]:
        errors.append(f"out-of-range labels: lse_coef {rt.lse_coef.tolist()}")
    return errors


def _run_siglip_fp16(rank: int, world: int) -> list[str]:
    """FusedSigLipLoss's "reduce" / "gather" keep an unused block in the graph as zeros: fp16 text
    features whose sum passes 65504 made that 0 * inf = NaN ("bidir" was right)."""
    from fused_xent.integrations.open_clip import FusedSigLipLoss

    images = torch.zeros(4, 16, dtype=torch.float16)
    images[:, 0] = 1.0
    texts = torch.zeros(4, 16, dtype=torch.float16)
    texts[:, 1:] = 1200.0  # orthogonal to the images (every logit is the bias); their sum, 72000, is inf in fp16
    losses = {}
    for impl in ("bidir", "reduce", "gather"):
        loss_fn = FusedSigLipLoss(rank=rank, world_size=world, dist_impl=impl)
        losses[impl] = loss_fn(images, texts.requires_grad_(), torch.tensor(10.0), torch.tensor(-10.0)).item()
    want = losses["bidir"]
    return [f"{impl}: {v} for bidir's {want}" for impl, v in losses.items() if not abs(v - want) <= 1e-3 * abs(want)]


def _worker(rank: int, world: int, port: int, out_dir: str, device: str = "cpu") -> None:
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    backend = "gloo" if device == "cpu" else "nccl"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    jobs = {name: (lambda n=name: _run_case(n, CASES[n], rank, world, device)) for name in CASES}
    if device == "cpu":  # both build their tensors on the CPU; neither depends on the device
        jobs["bad_inputs"] = lambda: _run_bad_inputs(rank, world)
        jobs["create_graph"] = lambda: _run_create_graph(rank, world)
        jobs["gather_features"] = lambda: _run_gather(rank, world)
        jobs["cross_rank"] = lambda: _run_cross_rank(rank, world)
        jobs["siglip_fp16"] = lambda: _run_siglip_fp16(rank, world)
    try:
        for name, job in jobs.items():
            interpreted = device == "cpu" and CASES.get(name, {}).get("opts", {}).get("impl")
            if interpreted and os.environ.get("TRITON_INTERPRET") != "1":
                results[name] = "skip: needs TRITON_INTERPRET=1"
                continue
            if name == "gather_features" and (world != 2 or not _has_open_clip()):
                # importing open_clip takes longer than every other case; one world suffices
                results[name] = "skip: open_clip is not installed" if world == 2 else "skip: run in world 2"
                continue
            try:
                results[name] = job()
            except Exception:
                results[name] = [traceback.format_exc()]
            dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


def _has_open_clip() -> bool:
    try:
        import open_clip  # noqa: F401
    except ImportError:
        return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=sorted(SHARDS))
def world_results(request, tmp_path_factory):
    world = request.param
    out_dir = tmp_path_factory.mktemp(f"world{world}")
    # first calls import torch._dynamo (custom ops) and open_clip: seconds each, done once here
    fused_xent.linear_cross_entropy(torch.randn(2, 3, requires_grad=True), torch.randn(4, 3), torch.zeros(2).long())
    if world == 2:
        _has_open_clip()
    # fork once CUDA is initialised (earlier GPU tests in this process) breaks the children: spawn there
    method = "spawn" if torch.cuda.is_initialized() else "fork"
    mp.start_processes(_worker, args=(world, _free_port(), str(out_dir)), nprocs=world, start_method=method)
    return world, [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("name", [*CASES, "bad_inputs", "create_graph", "gather_features", "cross_rank", "siglip_fp16"])
def test_matches_single_process(world_results, name):
    world, per_rank = world_results
    for rank, results in enumerate(per_rank):
        found = results[name]
        if isinstance(found, str):
            pytest.skip(found)
        assert not found, f"world {world} rank {rank}:\n" + "\n".join(found)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_matches_single_gpu_over_nccl(tmp_path):
    """The option matrix in float32 on 2 GPUs with NCCL, each rank against one GPU."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), "cuda"), nprocs=2, start_method="spawn")
    failures = []
    for rank in range(2):
        for name, found in json.loads((tmp_path / f"rank{rank}.json").read_text()).items():
            if found and not isinstance(found, str):
                failures.append(f"rank {rank} {name}:\n" + "\n".join(found))
    assert not failures, "\n".join(failures)


def test_shard_classes_tile_the_classes():
    for num_classes, world in [(37, 2), (37, 3), (8, 8), (10_000_000, 7)]:
        shards = [distributed.shard_classes(num_classes, r, world) for r in range(world)]
        assert shards[0][0] == 0 and all(a[0] + a[1] == b[0] for a, b in zip(shards, shards[1:], strict=False))
        assert sum(n for _, n in shards) == num_classes
        assert max(n for _, n in shards) - min(n for _, n in shards) <= 1
    with pytest.raises(ValueError, match="num_classes=2 must be >= world_size=3"):
        distributed.shard_classes(2, 0, 3)


def test_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        distributed.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long),
                                         class_offset=0)  # fmt: skip
