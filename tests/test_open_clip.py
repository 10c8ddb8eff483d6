"""fused_xent.integrations.open_clip against open_clip's own losses, and its Triton kernels.

The CPU comparisons run in float64, where both sides are exact up to summation order, so the
tolerances are a few hundred ulps; the Triton kernels run in the interpreter in float32
against a float64 materialised reference.
"""

import importlib.util
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from fused_xent.integrations import open_clip as fused


def _load_open_clip_loss():
    """open_clip's own ``loss.py``, loaded without the package's heavy ``__init__`` (it needs only
    torch), so that the spawned ranks start in seconds; None where open_clip is not installed
    (the GPU machine: its tests use the same eager formula)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    loss_spec = importlib.util.spec_from_file_location("_open_clip_loss", path)
    module = importlib.util.module_from_spec(loss_spec)
    loss_spec.loader.exec_module(module)
    return module


open_clip_loss = _load_open_clip_loss()

needs_open_clip = pytest.mark.skipif(open_clip_loss is None, reason="needs open_clip_torch")

needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs TRITON_INTERPRET=1"
)


def _features(B, D, dtype, seed, scale=2.5, bias=-1.7):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, D, generator=g, dtype=torch.float64)
    texts = images[torch.randperm(B, generator=g)] * 0.5 + torch.randn(B, D, generator=g, dtype=torch.float64)
    return images.to(dtype), texts.to(dtype), torch.tensor(scale, dtype=dtype), torch.tensor(bias, dtype=dtype)


def _loss_and_grads(loss_fn, tensors, **kwargs):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = loss_fn(*leaves, **kwargs)
    loss = out["contrastive_loss"] if isinstance(out, dict) else out
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


def _rel(a, b):
    """``||a - b|| / ||b||``; the plain norm of the difference where ``b`` is exactly 0 (B = 1)."""
    diff, norm = (a.double() - b.double()).norm().item(), b.double().norm().item()
    return diff / norm if norm > 0 else diff


def _assert_close(fused_out, ref_out, rtol, bias_atol=None, label=""):
    (loss, grads), (ref_loss, ref_grads) = fused_out, ref_out
    assert abs(loss.item() - ref_loss.item()) <= rtol * abs(ref_loss.item()), label
    for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True)):
        if i == 3 and bias_atol is not None:  # ClipLoss: the bias cancels, its gradient is 0 up to rounding
            assert g is not None and g.abs().item() <= bias_atol and r.abs().item() <= bias_atol
        else:
            assert _rel(g, r) <= rtol, (label, i, _rel(g, r))


# ------------------------------------------------------------------ ClipLoss, world size 1


@needs_open_clip
@pytest.mark.parametrize("B,D", [(1, 3), (13, 7), (40, 33)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_clip_loss_matches_open_clip_float64(B, D, with_bias):
    images, texts, scale, bias = _features(B, D, torch.float64, seed=B + D)
    tensors = (images, texts, scale, bias) if with_bias else (images, texts, scale)
    ours = _loss_and_grads(fused.FusedClipLoss(), tensors, output_dict=True)
    ref = _loss_and_grads(open_clip_loss.ClipLoss(), tensors, output_dict=True)
    _assert_close(ours, ref, rtol=1e-12, bias_atol=1e-14)


def test_clip_loss_output_dict_and_plain_value():
    images, texts, scale, _ = _features(9, 5, torch.float64, seed=3)
    loss = fused.FusedClipLoss(cache_labels=True)
    as_dict = loss(images, texts, scale, output_dict=True)
    assert list(as_dict) == ["contrastive_loss"]
    assert torch.equal(as_dict["contrastive_loss"], loss(images, texts, scale))
    assert loss(images, texts, scale).shape == () and loss(images, texts, scale).dtype == torch.float64


@needs_open_clip
def test_clip_loss_float32_features_keep_scale_gradient_through_exp():
    """open_clip passes ``logit_scale.exp()``; the gradient must reach the parameter."""
    images, texts, _, _ = _features(24, 16, torch.float32, seed=4)
    param = torch.tensor(1.2, requires_grad=True)
    loss = fused.FusedClipLoss()(images, texts, param.exp())
    loss.backward()
    ref_param = torch.tensor(1.2, requires_grad=True)
    open_clip_loss.ClipLoss()(images, texts, ref_param.exp()).backward()
    assert abs(param.grad.item() - ref_param.grad.item()) <= 1e-5 * abs(ref_param.grad.item())


def test_clip_loss_under_autocast_accumulates_in_float32():
    """Inside open_clip's ``autocast`` the features arrive in bf16 and the scale in fp32; the loss
    is computed in fp32 from those values, not re-rounded to bf16."""
    images, texts, scale, _ = _features(20, 12, torch.bfloat16, seed=14)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _loss_and_grads(fused.FusedClipLoss(), (images, texts, scale.float()))
    exact = _loss_and_grads(fused.FusedClipLoss(), (images.double(), texts.double(), scale.double()))
    assert ours[0].dtype == torch.float32
    assert abs(ours[0].item() - exact[0].item()) <= 1e-6 * abs(exact[0].item())
    assert _rel(ours[1][2], exact[1][2]) <= 1e-5
    for got, want in zip(ours[1][:2], exact[1][:2], strict=True):  # bf16 gradients: one rounding
        assert _rel(got, want) <= torch.finfo(torch.bfloat16).eps


def test_clip_lse_matches_torch_logsumexp():
    images, texts, scale, _ = _features(30, 11, torch.float64, seed=5)
    z = scale * images @ texts.T
    lse_row, lse_col, diag = fused.clip_lse(images, texts, scale)
    torch.testing.assert_close(lse_row, torch.logsumexp(z, 1), rtol=1e-13, atol=0)
    torch.testing.assert_close(lse_col, torch.logsumexp(z, 0), rtol=1e-13, atol=0)
    torch.testing.assert_close(diag, z.diagonal(), rtol=1e-13, atol=1e-13)


@needs_open_clip
def test_chunked_path_over_many_chunks(monkeypatch):
    """The column statistics carried from chunk to chunk, and the diagonal of every chunk."""
    monkeypatch.setattr(fused, "chunk_rows", lambda num_classes: 4)
    images, texts, scale, bias = _features(19, 6, torch.float64, seed=6, scale=9.0)
    ours = _loss_and_grads(fused.FusedClipLoss(), (images, texts, scale, bias))
    ref = _loss_and_grads(open_clip_loss.ClipLoss(), (images, texts, scale, bias))
    _assert_close(ours, ref, rtol=1e-12, bias_atol=1e-14)


# ------------------------------------------------------------------ Triton kernels (interpreter)


def _reference_lse(x, y, scale):
    z = scale.double() * x.double() @ y.double().T
    return torch.logsumexp(z, 1), torch.logsumexp(z, 0), z.diagonal()


@needs_interpreter
@pytest.mark.parametrize("B,D,programs", [(37, 21, 2), (16, 8, 1), (5, 3, 2), (50, 17, 7)])
def test_triton_forward_kernel(monkeypatch, B, D, programs):
    """Shapes that are not multiples of the 16-wide tiles; more programs than row blocks give
    column splits, fewer make one program merge several items into its scratch row."""
    from fused_xent.kernels import clip_xent

    monkeypatch.setattr(clip_xent, "_forward_programs", lambda device: programs)
    x, y, scale, _ = _features(B, D, torch.float32, seed=B)
    for got, want in zip(clip_xent.clip_xent_forward(x, y, scale.reshape(1)), _reference_lse(x, y, scale), strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_backward_over_strips(dtype):
    """Several strips of rows (a 2-block strip budget), against the float64 chunked path on the
    same (rounded) inputs; bf16 / fp16 strips round dz once, bounded by the dtype's epsilon."""
    from fused_xent.kernels import clip_xent

    B, D = 45, 19
    x, y, scale, _ = _features(B, D, dtype, seed=7)
    s = scale.float().reshape(1)
    g = torch.Generator().manual_seed(8)
    g_row, g_col = (torch.randn(B, generator=g) for _ in range(2))
    g_diag = torch.tensor(-0.7).expand(B)  # autograd can hand in stride-0 gradients
    lse_row, lse_col, _ = clip_xent.clip_xent_forward(x, y, s)
    got = clip_xent.clip_xent_backward(
        x, y, s, lse_row, lse_col, g_row, g_col, g_diag, strip_bytes=2 * 16 * B * x.element_size()
    )
    want = fused.chunked_clip_backward(
        x.double(), y.double(), s.double(), lse_row.double(), lse_col.double(), g_row.double(),
        g_col.double(), g_diag.double(),
    )  # fmt: skip
    tol = 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    assert got[0].dtype == dtype and got[1].dtype == dtype
    for a, b in zip(got, want, strict=True):
        assert _rel(a, b) <= tol


@needs_open_clip
@needs_interpreter
@pytest.mark.parametrize("with_bias", [False, True])
def test_triton_clip_loss_matches_open_clip(with_bias):
    images, texts, scale, bias = _features(29, 13, torch.float32, seed=9)
    tensors = (images, texts, scale, bias) if with_bias else (images, texts, scale)
    ours = _loss_and_grads(fused.FusedClipLoss(impl="triton"), tensors)
    ref = _loss_and_grads(open_clip_loss.ClipLoss(), tuple(t.double() for t in tensors))
    _assert_close(ours, ref, rtol=2e-6, bias_atol=1e-6)


# ------------------------------------------------------------------ lean backend (interpreter)


def _grid_features(B, D, dtype, seed):
    """Features on a grid of quarters: every product ``x . y`` (a multiple of 1/16, |.| < 8) is
    exact in bf16, fp16 and fp32, so the chunk's rounding of R is no rounding at all and the
    lean backend is held to the float64 reference directly."""
    g = torch.Generator().manual_seed(seed)
    x, y = (torch.randint(-2, 3, (B, D), generator=g, dtype=torch.float64) / 4 for _ in range(2))
    return x.to(dtype), y.to(dtype)


def _small_tiles(monkeypatch, cols, rows=None):
    """Chunks of ``cols`` columns for both passes of the lean backend (several per test matrix),
    and backward tiles of ``rows`` rows."""
    from fused_xent.kernels import clip_chunked

    monkeypatch.setattr(clip_chunked, "chunk_cols", lambda B, D, dtype, nbytes: min(B, cols))
    if rows is not None:
        monkeypatch.setattr(clip_chunked, "TILE_ROWS", rows)
    return clip_chunked


@needs_interpreter
@pytest.mark.parametrize(
    "B,D,cols", [(37, 21, 16), (45, 19, 8), (64, 5, 32), (5, 3, 128)], ids=["odd", "tail", "even", "one_chunk"]
)
def test_lean_forward_over_chunks(monkeypatch, B, D, cols):
    """Several chunks with a tail narrower than 8 columns (45), tiles that all are full (64:
    the kernel's unmasked path), one chunk wider than B (5); row and column statistics merged
    over stripes, groups and chunks, and the diagonal of every chunk."""
    clip_chunked = _small_tiles(monkeypatch, cols)
    x, y = _grid_features(B, D, torch.float32, seed=B)
    scale = torch.tensor([2.5])
    for got, want in zip(clip_chunked.clip_chunked_forward(x, y, scale), _reference_lse(x, y, scale), strict=True):
        torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lean_backward_over_chunks(monkeypatch, dtype):
    """Tiles of 16 x 16 (a tail of 13 rows and one of 5 columns): dz written over R in place
    (fp16: over fp32 R with the same byte pitch), dY accumulated over row tiles, dX_raw over
    column chunks, ds from the per-program partials; against the float64 chunked backward.
    bf16 / fp16 round dz once and the gradients once."""
    clip_chunked = _small_tiles(monkeypatch, 16, rows=16)
    B, D = 45, 19
    x, y = _grid_features(B, D, dtype, seed=7)
    s = torch.tensor([2.5])
    g = torch.Generator().manual_seed(8)
    g_row, g_col = (torch.randn(B, generator=g) for _ in range(2))
    g_diag = torch.tensor(-0.7).expand(B)  # autograd can hand in stride-0 gradients
    lse_row, lse_col, _ = _reference_lse(x, y, s)
    got = clip_chunked.clip_chunked_backward(x, y, s, lse_row.float(), lse_col.float(), g_row, g_col, g_diag)
    want = fused.chunked_clip_backward(
        x.double(), y.double(), s.double(), lse_row, lse_col, g_row.double(), g_col.double(), g_diag.double()
    )
    tol = 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].shape == (1,)
    for a, b in zip(got, want, strict=True):
        assert _rel(a, b) <= tol


@needs_open_clip
@needs_interpreter
@pytest.mark.parametrize("with_bias", [False, True])
def test_lean_clip_loss_matches_open_clip(monkeypatch, with_bias):
    """The loss, feature gradients and the learnable scale's gradient through several chunks."""
    _small_tiles(monkeypatch, 8, rows=24)
    images, texts, scale, bias = _features(29, 13, torch.float32, seed=9)
    tensors = (images, texts, scale, bias) if with_bias else (images, texts, scale)
    ours = _loss_and_grads(fused.FusedClipLoss(impl="lean"), tensors)
    ref = _loss_and_grads(open_clip_loss.ClipLoss(), tuple(t.double() for t in tensors))
    _assert_close(ours, ref, rtol=2e-6, bias_atol=1e-6)


@needs_open_clip
@needs_interpreter
@pytest.mark.parametrize("impl", ["lean", "triton", "chunked"])
@pytest.mark.parametrize("scale", [0.0, 1e-39, 1e-44])
def test_scale_gradient_at_zero_and_subnormal_scales(impl, scale):
    """``logit_scale`` 0 or subnormal in fp32: the scale's gradient is open_clip's (lean's
    kernel once summed the stored ``dz * scale`` and divided by the scale: NaN at 0, 0.29
    instead of 0.45 at 1e-44)."""
    images, texts, _, _ = _features(9, 5, torch.float32, seed=21)
    tensors = (images, texts, torch.tensor(scale))
    ours = _loss_and_grads(fused.FusedClipLoss(impl=impl), tensors)
    ref = _loss_and_grads(open_clip_loss.ClipLoss(), tuple(t.double() for t in tensors))
    assert abs(ours[0].item() - ref[0].item()) <= 1e-6 * ref[0].item()
    assert abs(ours[1][2].item() - ref[1][2].item()) <= 1e-5 * abs(ref[1][2].item())


@needs_interpreter
def test_lean_clip_loss_compiles_fullgraph(monkeypatch):
    """The custom ops take the backend by name: "lean" compiles without a graph break."""
    _small_tiles(monkeypatch, 8, rows=16)
    images, texts, scale, _ = _features(20, 6, torch.float32, seed=15)

    def loss_fn(i, t, s):
        return fused.clip_loss(i, t, s, impl="lean")

    eager = _loss_and_grads(loss_fn, (images, texts, scale))
    torch._dynamo.reset()
    compiled = _loss_and_grads(torch.compile(loss_fn, fullgraph=True, backend="aot_eager"), (images, texts, scale))
    _assert_close(compiled, eager, rtol=1e-6)


def test_lean_chunk_width_and_memory_budget():
    """B = 32768, D = 768 bf16: the forward's chunk (3072 columns) and the backward's peak (dY,
    the fp32 dX accumulator, one tile and the chunk's fp32 dY accumulator; dX comes once the
    tile is freed) stay under 256 MiB. At B = 262144 the forward's chunk keeps 1024 columns,
    within the accumulator's size (O(B D))."""
    from fused_xent.kernels import clip_chunked

    B, D = 32768, 768
    assert clip_chunked.chunk_cols(B, D, torch.bfloat16, clip_chunked.FORWARD_CHUNK_BYTES) == 3072
    rows = min(B, clip_chunked.TILE_ROWS)
    cols = clip_chunked.chunk_cols(rows, D, torch.bfloat16, clip_chunked.CHUNK_BYTES)
    assert B * D * 2 + B * D * 4 + rows * cols * 2 + cols * D * 4 <= 250 * 2**20
    big = 262144
    assert clip_chunked.chunk_cols(big, D, torch.bfloat16, clip_chunked.FORWARD_CHUNK_BYTES) == 1024
    assert clip_chunked.chunk_cols(big, D, torch.float32, clip_chunked.FORWARD_CHUNK_BYTES) * 4 <= 4 * D
    assert clip_chunked.chunk_cols(5, 3, torch.float16, clip_chunked.CHUNK_BYTES) == 5


def test_lean_backend_choice():
    """On CPU "auto" takes the chunked torch path; "lean" refuses float64, naming itself."""
    x = torch.zeros(3, 2, dtype=torch.float64)
    assert fused._clip_backend("auto", x).name == "chunked"
    assert fused._clip_backend("auto", x.float()).name == "chunked"
    with pytest.raises(ValueError, match="lean"):
        fused.clip_lse(x, x, impl="lean")


# ------------------------------------------------------------------ SigLipLoss, world size 1


@needs_open_clip
@pytest.mark.parametrize("B,D", [(1, 4), (17, 9), (33, 20)])
def test_siglip_matches_open_clip_float64(B, D):
    images, texts, scale, bias = _features(B, D, torch.float64, seed=B, scale=6.0, bias=-4.0)
    ours = _loss_and_grads(fused.FusedSigLipLoss(), (images, texts, scale, bias), output_dict=True)
    ref = _loss_and_grads(open_clip_loss.SigLipLoss(), (images, texts, scale, bias), output_dict=True)
    _assert_close(ours, ref, rtol=1e-12)


@needs_open_clip
def test_siglip_over_many_chunks_and_negative_only(monkeypatch):
    monkeypatch.setattr(fused, "chunk_rows", lambda num_classes: 5)
    images, texts, scale, bias = _features(23, 7, torch.float64, seed=10, scale=4.0, bias=-2.0)
    other = texts.flip(0)
    ours = _loss_and_grads(
        lambda i, t, s, b: fused.siglip_block_loss(i, t, s, b, negative_only=True), (images, other, scale, bias)
    )
    ref = _loss_and_grads(
        lambda i, t, s, b: open_clip_loss.SigLipLoss()._loss(i, t, s, b, negative_only=True),
        (images, other, scale, bias),
    )
    _assert_close(ours, ref, rtol=1e-12)


@needs_open_clip
def test_siglip_gradient_penalty_matches_open_clip(monkeypatch):
    """``create_graph=True`` (a gradient penalty) through the sigmoid loss, over several chunks
    (the positives' diagonal in each): open_clip differentiates its backward; ours too (it
    subtracted the diagonal in place from the sigmoid's output, which that backward reads)."""
    monkeypatch.setattr(fused, "chunk_rows", lambda num_classes: 5)
    images, texts, scale, bias = _features(12, 7, torch.float64, seed=4, scale=3.0, bias=-2.0)

    def penalty(loss_fn):
        leaves = [t.detach().clone().requires_grad_() for t in (images, texts, scale, bias)]
        loss = loss_fn(*leaves)
        gi, gt = torch.autograd.grad(loss, leaves[:2], create_graph=True)
        return loss.detach(), torch.autograd.grad((gi**2).sum() + (gt * gt.flip(0)).sum(), leaves)

    _assert_close(penalty(fused.FusedSigLipLoss()), penalty(open_clip_loss.SigLipLoss()), rtol=1e-10)


@needs_open_clip
def test_siglip_low_precision_features():
    """bf16 features: the fused loss accumulates in fp32, so it is closer to the float64 value
    than open_clip's own bf16 computation is."""
    images, texts, scale, bias = _features(40, 24, torch.bfloat16, seed=11, scale=5.0, bias=-3.0)
    ours = _loss_and_grads(fused.FusedSigLipLoss(), (images, texts, scale, bias))
    exact = _loss_and_grads(open_clip_loss.SigLipLoss(), tuple(t.double() for t in (images, texts, scale, bias)))
    eager = _loss_and_grads(open_clip_loss.SigLipLoss(), (images, texts, scale, bias))
    for ours_g, eager_g, exact_g in zip(ours[1], eager[1], exact[1], strict=True):
        assert _rel(ours_g, exact_g) <= max(2 * _rel(eager_g, exact_g), 4 * torch.finfo(torch.bfloat16).eps)


def _assert_same_logits(ours, theirs, tensors) -> None:
    """open_clip's gathered (not local) logits add ``logit_bias`` in place to ``logits_per_image``
    and then to ``logits_per_text``, its transpose (a view of the same storage): both get it
    twice (the loss does not change: a shift shared by a row cancels). Its logits are compared
    without the bias, the bias added here once to each."""
    bias = tensors[3] if len(tensors) > 3 else 0.0
    for out, ref in zip(ours.get_logits(*tensors), theirs.get_logits(*tensors[:3]), strict=True):
        torch.testing.assert_close(out, ref + bias, rtol=0, atol=0)


@needs_open_clip
def test_float_scale_and_bias_with_float64_features():
    """A Python-float ``logit_scale`` / ``logit_bias`` became an fp32 tensor whatever the
    features' dtype: fp64 features lost ~3e-8 to open_clip's fp64 loss."""
    images, texts, _, _ = _features(9, 6, torch.float64, seed=14)
    for ours, theirs in (
        (fused.FusedClipLoss(), open_clip_loss.ClipLoss()),
        (fused.FusedSigLipLoss(), open_clip_loss.SigLipLoss()),
    ):
        got = _loss_and_grads(ours, (images, texts), logit_scale=2.7, logit_bias=-1.3)
        want = _loss_and_grads(theirs, (images, texts), logit_scale=2.7, logit_bias=-1.3)
        _assert_close(got, want, rtol=1e-13)


@needs_open_clip
def test_get_logits_and_ground_truth_match_open_clip():
    """Not used by the losses (which never form the logits): open_clip's helpers, for callers
    of the loss object (in-batch retrieval metrics)."""
    tensors = _features(7, 5, torch.float64, seed=13, scale=3.0, bias=-1.0)
    _assert_same_logits(fused.FusedClipLoss(), open_clip_loss.ClipLoss(), tensors)
    _assert_same_logits(fused.FusedClipLoss(), open_clip_loss.ClipLoss(), tensors[:3])
    ours, theirs = fused.FusedSigLipLoss(), open_clip_loss.SigLipLoss()
    for args in (tensors, tensors[:3]):
        torch.testing.assert_close(ours.get_logits(*args), theirs.get_logits(*args), rtol=0, atol=0)
    for negative_only in (False, True):
        args = (torch.device("cpu"), torch.float32, 4, negative_only)
        torch.testing.assert_close(ours.get_ground_truth(*args), theirs.get_ground_truth(*args), rtol=0, atol=0)


# ------------------------------------------------------------------ distributed (gloo, 2 and 3 processes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank, world, port):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        b, D = 6, 5
        images, texts, scale, bias = _features(b * world, D, torch.float64, seed=12, scale=3.0, bias=-1.0)
        mine = slice(rank * b, (rank + 1) * b)
        tensors = (images[mine], texts[mine], scale, bias)
        ranks = dict(rank=rank, world_size=world)
        for local_loss in (False, True):
            for gather_with_grad in (False, True):
                options = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True, **ranks)
                ours = _loss_and_grads(fused.FusedClipLoss(**options), tensors)
                ref = _loss_and_grads(open_clip_loss.ClipLoss(**options), tensors)
                _assert_close(ours, ref, rtol=1e-11, bias_atol=1e-13)
                _assert_same_logits(fused.FusedClipLoss(**options), open_clip_loss.ClipLoss(**options), tensors)
        for dist_impl in fused.DIST_IMPLS:
            ours = _loss_and_grads(fused.FusedSigLipLoss(dist_impl=dist_impl, **ranks), tensors)
            ref = _loss_and_grads(open_clip_loss.SigLipLoss(dist_impl=dist_impl, **ranks), tensors)
            _assert_close(ours, ref, rtol=1e-11, label=dist_impl)
    finally:
        dist.destroy_process_group()


@needs_open_clip
@pytest.mark.parametrize("world", [2, 3])
def test_distributed_modes_match_open_clip(world):
    """Every ClipLoss mode (local loss or not, gather with grad or not) and every SigLIP
    exchange; three ranks also take SigLIP's bidirectional path."""
    context = mp.spawn(_distributed_worker, args=(world, _free_port()), nprocs=world, join=False)
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):  # raises as soon as a rank fails
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world} ranks did not finish within 240 s")


# ------------------------------------------------------------------ bad input


@needs_open_clip
def test_integer_scale_and_bias_tensors_are_constants_as_in_open_clip():
    """open_clip multiplies by an int64 ``logit_scale`` tensor (and adds an int64 bias) as by a
    number; they were refused here."""
    images, texts, _, _ = _features(9, 5, torch.float32, seed=23)
    for ours_fn, ref_fn, bias in [
        (fused.FusedClipLoss(), open_clip_loss.ClipLoss(), None),
        (fused.FusedSigLipLoss(), open_clip_loss.SigLipLoss(), torch.tensor(-3)),
    ]:
        scalars = dict(logit_scale=torch.tensor(3), logit_bias=bias)
        ours = _loss_and_grads(ours_fn, (images, texts), **scalars)
        _assert_close(ours, _loss_and_grads(ref_fn, (images.double(), texts.double()), **scalars), rtol=2e-6)
    with pytest.raises(ValueError, match="scale must be"):
        fused.FusedClipLoss()(images, texts, torch.tensor(True))


def test_bad_input_names_the_argument():
    images, texts, scale, _ = _features(4, 3, torch.float32, seed=13)
    loss = fused.FusedClipLoss()
    with pytest.raises(ValueError, match="text_features"):
        loss(images, texts[:3], scale)
    with pytest.raises(ValueError, match="logit_bias"):
        loss(images, texts, scale, torch.zeros(4, 4))
    with pytest.raises(ValueError, match="logit_scale"):
        fused.FusedSigLipLoss()(images, texts, torch.ones(2), None)
    with pytest.raises(TypeError, match="image_features"):
        loss(images, texts.double(), scale)
    with pytest.raises(ValueError, match="dist_impl"):
        fused.FusedSigLipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match="rank"):
        fused.FusedClipLoss(rank=2, world_size=2)
    with pytest.raises(NotImplementedError, match="horovod"):
        fused.FusedClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="impl"):
        fused.clip_lse(images, texts, impl="cuda")
    with pytest.raises(ValueError, match="at least one"):
        loss(images[:0], texts[:0], scale)


# ------------------------------------------------------------------ open_clip's training entry point


@needs_open_clip
def test_training_entry_point_patches_create_loss():
    import argparse

    import open_clip

    from fused_xent.integrations import open_clip_train

    args = argparse.Namespace(
        distill=False, model="ViT-B-32", siglip=False, local_loss=True, gather_with_grad=True, rank=0,
        world_size=1, horovod=False, loss_dist_impl=None, coca_caption_loss_weight=2.0,
        coca_contrastive_loss_weight=1.0,
    )  # fmt: skip
    with open_clip_train.patched():
        assert isinstance(open_clip.create_loss(args), fused.FusedClipLoss)
        args.siglip = True
        assert isinstance(open_clip.create_loss(args), fused.FusedSigLipLoss)
        args.horovod = True  # open_clip's create_loss refuses SigLIP with horovod too
        with pytest.raises(ValueError, match="--horovod is not supported with --siglip"):
            open_clip.create_loss(args)
        args.horovod = False
        args.model = "coca_ViT-B-32"
        assert isinstance(open_clip.create_loss(args), open_clip.loss.CoCaLoss)
    assert open_clip.create_loss is open_clip.factory.create_loss
    args.model, args.siglip = "ViT-B-32", False
    assert type(open_clip.create_loss(args)) is open_clip.loss.ClipLoss


# ------------------------------------------------------------------ GPU


def _eager_clip_loss(images, texts, scale):
    """open_clip's ClipLoss where it is installed, else its eager formula, line for line."""
    if open_clip_loss is not None:
        return open_clip_loss.ClipLoss()(images, texts, scale)
    labels = torch.arange(images.shape[0], device=images.device)
    return (F.cross_entropy(scale * images @ texts.T, labels) + F.cross_entropy(scale * texts @ images.T, labels)) / 2


def _eager_siglip_loss(images, texts, scale, bias):
    """open_clip's SigLipLoss where it is installed, else its eager formula."""
    if open_clip_loss is not None:
        return open_clip_loss.SigLipLoss()(images, texts, scale, bias)
    B = images.shape[0]
    labels = 2 * torch.eye(B, device=images.device, dtype=images.dtype) - 1
    return -F.logsigmoid(labels * (scale * images @ texts.T + bias)).sum() / B


def _gpu_features(B, D, dtype):
    torch.manual_seed(0)
    images = F.normalize(torch.randn(B, D, device="cuda"), dim=-1)
    texts = F.normalize(images + 0.5 * torch.randn(B, D, device="cuda"), dim=-1)
    return images.to(dtype), texts.to(dtype)


def gpu(test):
    """Marked ``gpu`` (``pytest -m gpu``) and skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


@pytest.mark.parametrize("B,D", [(1, 8), (1000, 100), (4133, 257), (20000, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", ["lean", "triton"])
@gpu
def test_gpu_kernels_match_float64(B, D, dtype, impl):
    """Odd sizes through the compiled kernels (20000 rows: two backward tiles of "lean"); fp32
    uses IEEE products, bf16 / fp16 round dz once ("lean" bf16 also rounds R, as torch's own
    bf16 matmul does)."""
    images, texts = _gpu_features(B, D, dtype)
    scale = torch.tensor(30.0, device="cuda")
    ours = _loss_and_grads(fused.FusedClipLoss(impl=impl), (images, texts, scale))
    exact = _loss_and_grads(fused.FusedClipLoss(impl="chunked"), (images.double(), texts.double(), scale.double()))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(ours[0].item() - exact[0].item()) <= tol * abs(exact[0].item())
    for a, b in zip(ours[1], exact[1], strict=True):
        assert _rel(a, b) <= tol


@gpu
def test_gpu_clip_32k_bf16_gradient_error():
    """B = 32768, D = 768, bf16: the fused gradients' error against an fp32 reference (on the
    same rounded features) is at most twice that of open_clip's own bf16 computation."""
    images, texts = _gpu_features(32768, 768, torch.bfloat16)
    scale = torch.tensor(100.0, device="cuda")
    bf16 = (images, texts, scale)
    exact = _loss_and_grads(_eager_clip_loss, (images.float(), texts.float(), scale))
    eager = _loss_and_grads(_eager_clip_loss, bf16)
    ours = _loss_and_grads(fused.FusedClipLoss(), bf16)
    assert abs(ours[0].item() - exact[0].item()) <= 1e-3 * abs(exact[0].item())
    for ours_g, eager_g, exact_g in zip(ours[1], eager[1], exact[1], strict=True):
        # floor: a few bf16 roundings of dz, averaged over B terms, stay well under 1e-3
        assert _rel(ours_g, exact_g) <= max(2 * _rel(eager_g, exact_g), 1e-3)


@gpu
def test_gpu_siglip_16k_bf16_gradient_error():
    images, texts = _gpu_features(16384, 768, torch.bfloat16)
    scale, bias = torch.tensor(10.0, device="cuda"), torch.tensor(-10.0, device="cuda")
    exact = _loss_and_grads(_eager_siglip_loss, (images.float(), texts.float(), scale, bias))
    eager = _loss_and_grads(_eager_siglip_loss, (images, texts, scale, bias))
    ours = _loss_and_grads(fused.FusedSigLipLoss(), (images, texts, scale, bias))
    assert abs(ours[0].item() - exact[0].item()) <= 1e-3 * abs(exact[0].item())
    for ours_g, eager_g, exact_g in zip(ours[1], eager[1], exact[1], strict=True):
        # floor: a few bf16 roundings of dz, averaged over B terms, stay well under 1e-3
        assert _rel(ours_g, exact_g) <= max(2 * _rel(eager_g, exact_g), 1e-3)
