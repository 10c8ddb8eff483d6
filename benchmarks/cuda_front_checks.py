"""CUDA checks of session 18's front-end fixes: PreLogits' head check (forked CUDA generator),
a refused head, an inference_mode call before training (CUDA pinned range-check buffers)."""

import timm
import torch

import fused_xent
from fused_xent.integrations.timm import FusedHeadLoss, PreLogits

torch.manual_seed(0)
m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000, drop_rate=0.1).cuda()
w = PreLogits(m).train()
x = torch.randn(8, 3, 224, 224, device="cuda")
y = torch.randint(0, 1000, (8,), device="cuda")
pre = w(x)
print("vit_tiny: pre-logits", tuple(pre.shape))
loss = FusedHeadLoss.from_model(w, 0.1)(pre, y)
loss.backward()
print("vit_tiny: loss", round(loss.item(), 4), "head grad", m.head.weight.grad.norm().item() > 0)
try:
    PreLogits(timm.create_model("efficientvit_m0", pretrained=False, num_classes=10).cuda()).train()(x[:2])
    print("efficientvit_m0: NOT refused")
except ValueError as e:
    print("efficientvit_m0: refused:", str(e)[:80])
xx = torch.randn(64, 32, device="cuda", requires_grad=True)
ww = torch.randn(300, 32, device="cuda", requires_grad=True)
yy = torch.randint(0, 300, (64,), device="cuda")
for impl in ("lean", "fast", "filtered", "triton", "chunked"):
    fused_xent.functional._UNIT_SCALES.clear()
    with torch.inference_mode():
        a = fused_xent.linear_cross_entropy(xx, ww, yy, impl=impl)
    b = fused_xent.linear_cross_entropy(xx, ww, yy, impl=impl)
    b.backward()
    torch.cuda.synchronize()
    print(f"inference_mode then training, {impl}: {a.item():.6f} {b.item():.6f} grads {xx.grad is not None}")
    xx.grad = ww.grad = None
