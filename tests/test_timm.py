"""fused_xent.integrations.timm against timm's own losses, Mixup and training task.

Every equivalence runs in float64 on the chunked torch path, where the fused loss and
timm's loss on materialised logits differ only by summation order: values and every
parameter gradient agree to ~1e-15 relative, so 1e-10 leaves room for nothing but bugs.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
from timm.data.mixup import Mixup, mixup_target  # noqa: E402
from timm.layers import ClassifierHead  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy  # noqa: E402

from fused_xent.integrations import timm as fx_timm  # noqa: E402
from fused_xent.integrations.timm import FusedHeadLoss, MixedTarget, PreLogits, SparseMixup  # noqa: E402

C = 1000  # the test models' head
#: linear_cross_entropy holds mixup's lam in fp32 (even for fp64 input): 6e-8 relative
MIXUP_RTOL = 2e-7
MODELS = {"test_vit": dict(img_size=32), "test_resnet": {}, "test_convnext": {}}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    torch.manual_seed(0)
    m = timm.create_model(request.param, pretrained=False, **MODELS[request.param]).double().eval()
    with torch.no_grad():  # zero-initialised gammas would leave whole branches without gradient
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m


@contextlib.contextmanager
def default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def pre_logits_of(m, x):
    return m.forward_head(m.forward_features(x), pre_logits=True)


def assert_same(m, x, fused_loss, timm_loss, rtol=1e-10):
    """Value and every parameter gradient of the fused loss on pre-logits vs timm's on logits."""
    params = [p for p in m.parameters() if p.requires_grad]
    ref = timm_loss(m(x))
    ref_grads = torch.autograd.grad(ref, params)
    out = fused_loss(pre_logits_of(m, x))
    grads = torch.autograd.grad(out, params)
    assert out.dtype == torch.float64
    assert abs(out.item() - ref.item()) <= rtol * abs(ref.item())
    for p, g, r in zip(params, grads, ref_grads, strict=True):
        assert r.abs().max() > 0, "every parameter must get a gradient for the check to mean something"
        assert rel_err(g, r) < rtol, p.shape


def test_label_smoothing_matches_timm(model):
    torch.manual_seed(1)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, C, (4,))
    loss_fn = FusedHeadLoss.from_model(model, label_smoothing=0.1)
    assert_same(model, x, lambda p: loss_fn(p, y), lambda z: LabelSmoothingCrossEntropy(0.1)(z, y))


@pytest.mark.parametrize("mode", ["elem", "batch"])
def test_mixup_matches_soft_target_on_timm_mixup(model, mode):
    torch.manual_seed(2)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, C, (4,))
    kw = dict(mixup_alpha=0.8, cutmix_alpha=1.0, mode=mode, label_smoothing=0.1, num_classes=C)
    np.random.seed(3)
    x_timm, t_timm = Mixup(**kw)(x.clone(), y)
    np.random.seed(3)
    x_fx, mixed = SparseMixup(**kw)(x.clone(), y)
    assert torch.equal(x_fx, x_timm)
    torch.testing.assert_close(mixed.dense(C), t_timm.float(), rtol=0, atol=1e-7)
    # timm rounds its one-hot to fp32 (eps / C to 3e-8 relative); in float64 its own formula is exact
    lam = mixed.lam if mode == "batch" else mixed.lam[:, None]
    with default_dtype(torch.float64):
        exact = mixup_target(y, C, lam, 0.1)
    loss_fn = FusedHeadLoss.from_model(model)  # the smoothing travels with the MixedTarget
    assert_same(model, x_fx, lambda p: loss_fn(p, mixed), lambda z: SoftTargetCrossEntropy()(z, exact), MIXUP_RTOL)


def test_dense_soft_target_and_explicit_target2_lam(model):
    torch.manual_seed(4)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    y, y2 = torch.randint(0, C, (4,)), torch.randint(0, C, (4,))
    lam = torch.rand(4, dtype=torch.float64)
    dense = MixedTarget(y, y2, lam, 0.2).dense(C, torch.float64)
    ref = lambda z: SoftTargetCrossEntropy()(z, dense)
    loss_fn = FusedHeadLoss.from_model(model, label_smoothing=0.2)
    assert_same(model, x, lambda p: loss_fn(p, y, target2=y2, lam=lam), ref, MIXUP_RTOL)
    assert_same(model, x, lambda p: loss_fn(p, dense), ref)  # dense targets carry their own smoothing


def test_linear_head_without_bias_and_1x1_conv_head():
    torch.manual_seed(5)
    x = torch.randn(6, 16, 3, 3, dtype=torch.float64)
    y = torch.randint(0, 37, (6,))
    conv_head = ClassifierHead(16, 37, use_conv=True).double()  # pools, then a 1x1 conv
    linear_head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 37, bias=False)).double()
    for head, classifier, pre in (
        (conv_head, conv_head.fc, conv_head(x, pre_logits=True)),
        (linear_head, linear_head[2], linear_head[:2](x)),
        (conv_head, conv_head.fc, x.mean((2, 3), keepdim=True)),  # (N, D, 1, 1) pre-logits
    ):
        params = list(classifier.parameters())
        out = FusedHeadLoss(classifier, label_smoothing=0.1)(pre, y)
        ref = LabelSmoothingCrossEntropy(0.1)(head(x), y)
        assert abs(out.item() - ref.item()) < 1e-12 * ref.item()
        for g, r in zip(torch.autograd.grad(out, params), torch.autograd.grad(ref, params), strict=True):
            assert rel_err(g, r) < 1e-12


def test_triton_kernels_under_the_interpreter():
    torch.manual_seed(6)
    head = nn.Linear(24, 53).float()
    pre = torch.randn(16, 24, requires_grad=True)
    y, y2, lam = torch.randint(0, 53, (16,)), torch.randint(0, 53, (16,)), torch.rand(16)
    out = FusedHeadLoss(head, 0.1, impl="triton")(pre, MixedTarget(y, y2, lam, 0.1))
    grads = torch.autograd.grad(out, [pre, head.weight, head.bias])
    ref_head = nn.Linear(24, 53).double()
    ref_head.load_state_dict(head.state_dict())
    pre64 = pre.detach().double().requires_grad_()
    ref = SoftTargetCrossEntropy()(ref_head(pre64), MixedTarget(y, y2, lam, 0.1).dense(53, torch.float64))
    ref_grads = torch.autograd.grad(ref, [pre64, ref_head.weight, ref_head.bias])
    assert abs(out.item() - ref.item()) < 1e-5 * ref.item()  # fp32 kernels vs a float64 reference
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_err(g.double(), r) < 1e-5


def test_autocast_uses_the_autocast_dtype():
    torch.manual_seed(7)
    head = nn.Linear(32, 101)
    pre = torch.randn(8, 32)
    y = torch.randint(0, 101, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = FusedHeadLoss(head, 0.1)(pre, y)
        ref = LabelSmoothingCrossEntropy(0.1)(head(pre), y)
    # both see the logits of bf16 x and W; they differ by bf16 rounding of those logits only
    assert out.dtype == torch.float32
    assert abs(out.item() - ref.float().item()) < 1e-2 * ref.item()


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize(
    "alphas", [dict(mixup_alpha=0.8), dict(cutmix_alpha=1.0, mixup_alpha=0.0), dict(mixup_alpha=0.8, cutmix_alpha=1.0)]
)
@pytest.mark.parametrize("prob", [1.0, 0.6])
def test_sparse_mixup_reproduces_timm_mixup(mode, alphas, prob):
    kw = dict(mode=mode, prob=prob, switch_prob=0.5, label_smoothing=0.1, num_classes=10, **alphas)
    x = torch.randn(8, 3, 12, 12)
    y = torch.randint(0, 10, (8,))
    for seed in range(4):
        np.random.seed(seed)
        x_timm, t_timm = Mixup(**kw)(x.clone(), y)
        np.random.seed(seed)
        x_fx, mixed = SparseMixup(**kw)(x.clone(), y)
        assert torch.equal(x_fx, x_timm)
        assert torch.equal(mixed.y, y) and torch.equal(mixed.y2, y.flip(0))
        assert isinstance(mixed.lam, float) if mode == "batch" else mixed.lam.shape == (8,)
        torch.testing.assert_close(mixed.dense(10), t_timm, rtol=0, atol=1e-6)
        # and the dense target is timm's own function of (y, lam)
        lam = mixed.lam if mode == "batch" else mixed.lam[:, None]
        torch.testing.assert_close(mixed.dense(10), mixup_target(y, 10, lam, 0.1), rtol=0, atol=1e-6)


def test_sparse_mixup_refuses_what_it_cannot_represent():
    with pytest.raises(ValueError, match="multi_label"):
        SparseMixup(multi_label=True, num_classes=10)
    with pytest.raises(ValueError, match="even batch"):
        SparseMixup(num_classes=10)(torch.randn(3, 3, 4, 4), torch.zeros(3, dtype=torch.long))


def test_pre_logits_wrapper_keeps_state_dict_and_eval_logits():
    torch.manual_seed(8)
    m = timm.create_model("test_vit", pretrained=False, img_size=32).eval()
    wrapped = PreLogits(m)
    x = torch.randn(2, 3, 32, 32)
    assert list(wrapped.state_dict()) == list(m.state_dict())
    torch.testing.assert_close(wrapped.eval()(x), m(x), rtol=0, atol=0)
    torch.testing.assert_close(wrapped(x, pre_logits=True), pre_logits_of(m, x), rtol=0, atol=0)
    assert wrapped.train()(x).shape == (2, m.num_features)
    wrapped.load_state_dict(m.state_dict())
    loss_fn = FusedHeadLoss.from_model(wrapped, 0.1)
    assert loss_fn.classifier is m.get_classifier()


class _TinyHead(nn.Module):
    """A timm-like model: features (N, 6) -> ``extra`` -> fc, ``aux`` optionally added to the logits."""

    def __init__(self, extra: nn.Module | None = None, aux: bool = False) -> None:
        super().__init__()
        self.stem, self.extra, self.fc = nn.Linear(5, 6), extra or nn.Identity(), nn.Linear(6, 7)
        self.aux = nn.Linear(6, 7) if aux else None

    def forward_features(self, x):
        return self.stem(x)

    def forward_head(self, x, pre_logits: bool = False):
        if pre_logits:
            return x
        out = self.fc(self.extra(x))
        return out + 0.5 * self.aux(x) if self.aux is not None else out

    def get_classifier(self):
        return self.fc


@pytest.mark.parametrize(
    "extra, aux, match",
    [
        (nn.BatchNorm1d(6), False, "transforms the pre-logits"),  # EfficientViT-M, SHViT
        (nn.Dropout(0.3), False, "transforms the pre-logits"),  # MViTv2 with drop_rate
        (None, True, "not its classifier's output"),  # VOLO's aux head
    ],
)
def test_pre_logits_refuses_a_head_the_fused_loss_would_skip(extra, aux, match):
    torch.manual_seed(0)
    m = _TinyHead(extra, aux).train()
    stats = [b.clone() for b in m.buffers()]
    with pytest.raises(ValueError, match=match):
        PreLogits(m)(torch.randn(8, 5))
    assert all(torch.equal(b, s) for b, s in zip(m.buffers(), stats, strict=True))  # the check left them alone
    assert PreLogits(m).eval()(torch.randn(3, 5)).shape == (3, 7)  # evaluation: the model's own logits


def test_pre_logits_checks_a_plain_head_once_without_touching_the_generator():
    torch.manual_seed(0)
    m = _TinyHead(nn.Identity()).train()
    wrapped = PreLogits(m)
    x = torch.randn(4, 5)
    state = torch.get_rng_state()
    out = wrapped(x)
    assert torch.equal(torch.get_rng_state(), state)  # training randomness is the plain model's
    torch.testing.assert_close(out, m.stem(x), rtol=0, atol=0)
    assert wrapped.__dict__["_checked"] is m.fc and "_checked" not in dict(wrapped.named_modules())


def test_the_check_runs_under_torch_compile(monkeypatch):
    """A model compiled before its first step (timm's --torchcompile): the check ran only
    outside compiling, so a compiled head with a norm after the pre-logits trained on a
    different loss; it now runs eagerly at a graph break, once (an int attribute the compiled
    graph guards; a first version re-entered the check on every step). With fullgraph=True the
    first step runs eagerly (a graph break cannot be traced), later ones compile."""
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="transforms the pre-logits"):
        torch.compile(PreLogits(_TinyHead(nn.BatchNorm1d(6)).train()), backend="eager")(torch.randn(8, 5))
    m = _TinyHead().train()
    wrapped = PreLogits(m)
    x = torch.randn(4, 5)
    checks, check = [], fx_timm.check_head
    monkeypatch.setattr(fx_timm, "check_head", lambda *a: checks.append(1) or check(*a))
    compiled = torch.compile(wrapped, backend="eager")
    for _ in range(4):
        torch.testing.assert_close(compiled(x), m.stem(x), rtol=0, atol=0)
    assert wrapped.__dict__["_checked"] is m.fc and len(checks) == 1  # once: the later graphs hold no call
    torch.testing.assert_close(torch.compile(wrapped, backend="eager", fullgraph=True)(x), m.stem(x))  # checked


@pytest.mark.parametrize("task", [False, True])
def test_first_training_step_of_a_batchnorm_model(task):
    """The check restored every buffer in place, the trunk's BatchNorm statistics included,
    which that BatchNorm had saved for the same step's backward: the first backward of every
    BatchNorm model failed ("modified by an inplace operation")."""
    torch.manual_seed(0)
    m = timm.create_model("test_resnet", pretrained=False).double().train()
    ref = copy.deepcopy(m)
    x, y = torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 5, 9])
    if task:
        if not hasattr(fx_timm, "FusedClassificationTask"):
            pytest.skip("installed timm has no timm.task")
        loss = fx_timm.FusedClassificationTask(m, label_smoothing=0.1, verbose=False)(x, y)["loss"]
    else:
        wrapped = PreLogits(m)
        loss = FusedHeadLoss.from_model(wrapped, 0.1)(wrapped(x), y)
    loss.backward()
    want = LabelSmoothingCrossEntropy(0.1)(ref(x), y)
    want.backward()
    assert abs(loss.item() - want.item()) < 1e-12
    for (name, p), q in zip(m.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)
    for b, rb in zip(m.buffers(), ref.buffers(), strict=True):  # one update of the statistics, as timm's
        torch.testing.assert_close(b, rb, rtol=1e-12, atol=0)


def test_losses_from_models_copy_and_pickle():
    """``FusedHeadLoss.from_model`` kept a weak reference to the model: the loss and timm's task
    holding it did not pickle, and a deep copy checked the original model's head (and refused
    to train, blaming reset_classifier)."""
    import pickle

    m = PreLogits(timm.create_model("test_vit", pretrained=False))
    loss = FusedHeadLoss.from_model(m, 0.1)
    twin, restored = copy.deepcopy((m, loss)), pickle.loads(pickle.dumps((m, loss)))
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    for model, fn in (twin, restored):
        assert fn.__dict__["_model"] is model.model
        out = fn(model(x), y)
        torch.testing.assert_close(out, loss(m(x), y))
        model.model.reset_classifier(5)
        with pytest.raises(RuntimeError, match="reset_classifier"):
            fn(model(x), y)


def test_sparse_mixup_for_another_class_count_is_refused():
    """timm's Mixup + SoftTargetCrossEntropy fail when Mixup's num_classes is not the head's;
    the fused loss must not train on eps / C of the wrong C instead."""
    head = nn.Linear(8, 10)
    mix = SparseMixup(mixup_alpha=0.8, label_smoothing=0.1, num_classes=1000)
    _, target = mix(torch.randn(4, 3, 8, 8), torch.tensor([1, 2, 3, 4]))
    y, y2, lam, eps = target  # it still unpacks as four values
    with pytest.raises(ValueError, match="num_classes=1000 but the classifier has 10"):
        FusedHeadLoss(head)(torch.randn(4, 8), target)
    FusedHeadLoss(head)(torch.randn(4, 8), MixedTarget(y, y2, lam, eps))  # no count recorded: runs


def _train_step_matches_timm(m, x, y):
    """One training step through ``PreLogits`` + ``FusedHeadLoss.from_model`` (the head check
    included) against cross-entropy on the model's own logits: value and every gradient."""
    with torch.no_grad():  # a zero-initialised head would leave the trunk without gradient
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    params = [p for p in m.parameters() if p.requires_grad]
    ref = nn.functional.cross_entropy(m(x), y)
    ref_grads = torch.autograd.grad(ref, params)
    wrapped = PreLogits(m).train()
    out = FusedHeadLoss.from_model(wrapped)(wrapped(x), y)
    grads = torch.autograd.grad(out, params)
    assert abs(out.item() - ref.item()) <= 1e-10 * abs(ref.item())
    for g, r in zip(grads, ref_grads, strict=True):
        assert r.abs().max() > 0 and rel_err(g, r) < 1e-9


def test_a_whole_head_module_as_classifier_takes_its_fc():
    """sequencer2d's get_classifier() is its whole ClassifierHead (pooling, dropout, fc); the
    layer on the pre-logits is its fc (it was refused: "got ClassifierHead")."""
    from timm.models.sequencer import Sequencer2d

    torch.manual_seed(0)
    m = Sequencer2d(
        num_classes=5, layers=(1, 1), patch_sizes=(4, 2), embed_dims=(8, 8), hidden_sizes=(4, 4), mlp_ratios=(1, 1)
    ).double()
    assert isinstance(m.get_classifier(), ClassifierHead)
    assert FusedHeadLoss(m.get_classifier()).classifier is m.get_classifier().fc
    _train_step_matches_timm(m, torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 4]))


def test_features_as_a_list_of_stages():
    """CoaT's forward_features returns a list of per-stage maps (its forward_head aggregates
    them): the head check slices each (it failed on ``features.shape``)."""
    from timm.models.coat import CoaT

    torch.manual_seed(0)
    m = CoaT(
        img_size=32, patch_size=4, embed_dims=(16,) * 4, serial_depths=(1,) * 4, parallel_depth=1, num_heads=8,
        mlp_ratios=(1,) * 4, num_classes=5,
    ).double()  # fmt: skip
    assert isinstance(m.forward_features(torch.randn(1, 3, 32, 32, dtype=torch.float64)), list)
    _train_step_matches_timm(m, torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 2, 4]))


def test_inputs_and_features_the_head_check_cannot_take_are_refused_clearly():
    """A NaFlex dict batch (its padding mask pools the head's tokens, and PreLogits would drop
    it: Gemma4VitClassifier trained on 1.972 for 1.978) and an auxiliary head's
    ``(features, aux)`` pair (Inception v3 with aux_logits)."""
    m = _TinyHead().train()
    with pytest.raises(TypeError, match="x must be a tensor of images.*NaFlex"):
        PreLogits(m)({"patches": torch.randn(2, 5), "patch_valid": torch.ones(2, dtype=torch.bool)})
    m.forward_features = lambda x: (m.stem(x), m.stem(x))
    with pytest.raises(TypeError, match="returned a tuple.*auxiliary head"):
        PreLogits(m)(torch.randn(2, 5))


def test_two_heads_are_refused_clearly():
    heads = (nn.Linear(4, 3), nn.Linear(4, 3))  # a distilled model's get_classifier()
    with pytest.raises(TypeError, match="tuple of 2 heads"):
        FusedHeadLoss(heads)
    m = _TinyHead()
    m.get_classifier = lambda: heads
    with pytest.raises(TypeError, match="tuple of 2 heads"):
        PreLogits(m).train()(torch.randn(2, 5))


def test_a_replaced_head_is_refused_not_trained_stale():
    m = timm.create_model("test_vit", pretrained=False, img_size=32)
    loss_fn = FusedHeadLoss.from_model(PreLogits(m))
    m.reset_classifier(10)
    with pytest.raises(RuntimeError, match="reset_classifier"):
        loss_fn(torch.randn(2, m.num_features), torch.tensor([1, 2]))


def test_pre_logits_keeps_the_models_training_api():
    """timm's optimizer factory on the wrapper groups as on the model: no weight decay on the
    model's own list, layer decay from its group_matcher; the attributes train.py reads."""
    from timm.optim import create_optimizer_v2

    m = timm.create_model("test_vit", pretrained=False, img_size=32)
    wrapped = PreLogits(m)
    assert wrapped.num_classes == m.num_classes and wrapped.pretrained_cfg is m.pretrained_cfg
    wrapped.set_grad_checkpointing(True)
    assert m.grad_checkpointing

    def groups(module):
        opt = create_optimizer_v2(module, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
        return sorted((g["weight_decay"], g.get("lr_scale", 1.0), sorted(id(p) for p in g["params"]))
                      for g in opt.param_groups)  # fmt: skip

    assert groups(wrapped) == groups(m)
    assert len({lr for _, lr, _ in groups(m)}) > 2  # the layer decay made several groups


def test_pre_logits_state_dict_round_trips_nested():
    """Inside a parent module (DDP, torch.compile and the task hold it so) the keys are the
    parent's prefix and the model's own keys, and they load back."""
    torch.manual_seed(10)
    m = timm.create_model("test_resnet", pretrained=False)
    outer = torch.nn.Sequential(PreLogits(m))
    sd = outer.state_dict()
    assert list(sd) == ["0." + k for k in m.state_dict()]
    other = torch.nn.Sequential(PreLogits(timm.create_model("test_resnet", pretrained=False)))
    other.load_state_dict(sd)
    for a, b in zip(other.state_dict().values(), sd.values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="bogus"):
        other.load_state_dict({**sd, "0.bogus": torch.zeros(1)})
    # strict=False reports (and strict=True names) keys as the state dict names them
    dropped = next(iter(sd))
    report = other.load_state_dict({**{k: v for k, v in sd.items() if k != dropped}, "0.bogus": 1}, strict=False)
    assert (report.missing_keys, report.unexpected_keys) == ([dropped], ["0.bogus"])
    with pytest.raises(RuntimeError, match=rf'Missing key\(s\) in state_dict: "{dropped}"'):
        other.load_state_dict({k: v for k, v in sd.items() if k != dropped})
    report = PreLogits(timm.create_model("test_resnet", pretrained=False)).load_state_dict({}, strict=False)
    assert report.missing_keys and set(report.missing_keys) <= set(m.state_dict())  # no "model." part
    if hasattr(fx_timm, "FusedClassificationTask"):
        task = fx_timm.FusedClassificationTask(m, label_smoothing=0.1, verbose=False)
        task.load_state_dict(task.state_dict())


@pytest.mark.skipif(not hasattr(fx_timm, "FusedClassificationTask"), reason="installed timm has no timm.task")
def test_classification_task_matches_timm_task():
    from timm.task import ClassificationTask

    torch.manual_seed(9)
    m = timm.create_model("test_resnet", pretrained=False).double().eval()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, C, (4,))
    ref = ClassificationTask(m, criterion=LabelSmoothingCrossEntropy(0.1), verbose=False)(x, y)
    task = fx_timm.FusedClassificationTask(m, label_smoothing=0.1, return_logits=True, verbose=False).eval()
    out = task(x, y)
    assert abs(out["loss"].item() - ref["loss"].item()) < 1e-12
    torch.testing.assert_close(out["output"], ref["output"], rtol=1e-12, atol=1e-12)
    assert list(task.get_eval_model().state_dict()) == list(m.state_dict())
    assert "output" not in fx_timm.FusedClassificationTask(m, 0.1, verbose=False)(x, y)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: FusedHeadLoss(nn.Identity()), "nn.Identity"),
        (lambda: FusedHeadLoss(nn.Conv2d(4, 5, 3)), "1x1 Conv2d"),
        (lambda: FusedHeadLoss(nn.Bilinear(2, 2, 3)), "nn.Linear"),
        (lambda: FusedHeadLoss(nn.Linear(4, 5), label_smoothing=1.5), "label_smoothing"),
        (lambda: FusedHeadLoss(nn.Linear(4, 5))(torch.randn(2, 3), torch.zeros(2, dtype=torch.long)), "pre_logits"),
        (
            lambda: FusedHeadLoss(nn.Linear(4, 5))(
                torch.randn(2, 4), MixedTarget(torch.zeros(2).long(), torch.zeros(2).long(), 0.5), lam=0.5
            ),
            "MixedTarget",
        ),
        (lambda: FusedHeadLoss.from_model(nn.Linear(4, 5)), "get_classifier"),
    ],
)
def test_bad_input_names_the_argument(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("mixup", [False, True])
def test_gpu_vit21k_head_bf16_within_twice_torch_error(mixup):
    """ViT-21k head at a tenth of the batch: gradient error vs fp32 no worse than 2x torch bf16's."""
    torch.manual_seed(10)
    N, D, Cls = 512, 768, 21841
    head = nn.Linear(D, Cls, device="cuda")
    pre = torch.randn(N, D, device="cuda")
    y = torch.randint(0, Cls, (N,), device="cuda")
    target = MixedTarget(y, y.flip(0), torch.rand(N, device="cuda"), 0.1) if mixup else y

    def timm_loss(h, p):
        logits = h(p)
        if mixup:
            return SoftTargetCrossEntropy()(logits.float(), target.dense(Cls))
        return LabelSmoothingCrossEntropy(0.1)(logits.float(), y)

    def grads(loss_of, dtype):
        h = nn.Linear(D, Cls, device="cuda", dtype=dtype)
        h.load_state_dict(head.state_dict())
        p = pre.to(dtype).requires_grad_()
        loss = loss_of(h, p)
        return [loss.float()] + [g.float() for g in torch.autograd.grad(loss, [p, h.weight, h.bias])]

    ref = grads(timm_loss, torch.float32)
    eager = grads(timm_loss, torch.bfloat16)
    fused = grads(lambda h, p: FusedHeadLoss(h, 0.1)(p, target), torch.bfloat16)
    assert abs(fused[0] - ref[0]) <= 1e-3 * ref[0]  # the loss itself: fp32 accumulation on both sides
    for f, e, r in zip(fused[1:], eager[1:], ref[1:], strict=True):
        assert rel_err(f, r) <= 2 * rel_err(e, r)
