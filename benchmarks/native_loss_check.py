"""torch's own chunked ``F.linear_cross_entropy`` (torch >= 2.13) on the CPU: the error of the
loss it returns for bf16 operands, against the loss of the same operands in float64, beside
torch's reference path and fused_xent's.

``benchmarks/native_anchor.py`` measured that chunked path on the H100 (torch 2.15's modules on
torch 2.11) with loss errors of 2.2e-3 (Llama 3 head), 5.0e-2 (Gemma 2) and 0.72 (1M classes),
while its gradients were as accurate as torch eager's. This checks on an unmodified torch that
the loss error is the chunked path's own, and prints the row chunk each shape gets.

    python benchmarks/native_loss_check.py
"""

import math
import sys

import torch
import torch.nn.functional as F

import fused_xent


def main() -> None:
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        return
    torch.manual_seed(0)
    print(f"# torch {torch.__version__}, CPU, bf16 operands; loss error = |loss - loss_fp64| / loss_fp64")
    print("| N x D x C | rows per chunk | chunked (compact) | chunked (default) | torch reference path | fused_xent |")
    print("|---|---|---|---|---|---|")
    for N, D, C in ((2048, 512, 32000), (1024, 256, 64000), (256, 512, 1_000_000)):
        w = (torch.randn(C, D) / math.sqrt(D)).bfloat16()
        x = torch.randn(N, D).bfloat16()
        y = torch.randint(0, C, (N,))
        ref = float(F.cross_entropy(F.linear(x.double(), w.double()), y))

        def err(loss: torch.Tensor, ref: float = ref) -> str:
            return f"{abs(float(loss) - ref) / ref:.1e}"

        compact = torch.nn.LinearCrossEntropyOptions(acc_policy="compact")
        rows = compact._adjust(num_batches=N, in_features=D, num_classes=C, dtype=x.dtype).batch_chunk_size
        cells = [
            err(F.linear_cross_entropy(x, w, y, options=compact)),
            err(F.linear_cross_entropy(x, w, y, options=torch.nn.LinearCrossEntropyOptions())),
            err(F.linear_cross_entropy(x, w, y)),
            err(fused_xent.linear_cross_entropy(x, w, y)),
        ]
        print(f"| {N} x {D} x {C} | {rows} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
