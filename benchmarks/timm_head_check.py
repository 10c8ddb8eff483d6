"""Which timm models ``PreLogits`` takes: each model (num_classes=7, drop_rate=0.3, random
weights) wrapped and called once in training mode on two random images, which runs
``integrations.timm.check_head``; prints ok, REFUSED (the check's reason) or ERROR per model.
CPU is enough.

    PYTHONPATH=. python benchmarks/timm_head_check.py fastvit_t8 efficientvit_m0 volo_d1_224 ...
"""

import sys

import timm
import torch

from fused_xent.integrations.timm import PreLogits

for name in sys.argv[1:]:
    try:
        m = timm.create_model(name, pretrained=False, num_classes=7, drop_rate=0.3)
        size = m.pretrained_cfg.get("input_size", (3, 224, 224))
        torch.manual_seed(1)
        out = PreLogits(m).train()(torch.randn(2, *size))
        print(f"{name:32s} ok {tuple(out.shape)}")
    except (ValueError, TypeError) as e:
        print(f"{name:32s} REFUSED {str(e)[:110]}")
    except Exception as e:  # noqa: BLE001 - a model this timm cannot build or run: reported, not fatal
        print(f"{name:32s} ERROR {type(e).__name__}: {str(e)[:110]}")
    sys.stdout.flush()
