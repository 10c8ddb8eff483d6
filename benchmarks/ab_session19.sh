# Usage (on the device, from the checkout, the variants set up as benchmarks/ab_lib.sh says): bash benchmarks/ab_session19.sh
# Session 19's log: benchmarks/NVIDIA-H100-80GB-HBM3/ab_session19.log
# A/B of session 19's changes, old = 6f52db1 (session 18's end): the entry points' device guard and the
# backward's single read of saved tensors (host path: ViT-21k "auto" and lean at the bench's 128 MiB), and
# the dense target tile's where (no weight without mass) with class weights + smoothing (lean, triton) at
# ViT-21k and Gemma 2; each variant from its own directory, two rounds
. benchmarks/ab_lib.sh
ab_environment
ab_rounds 2 'timeout 150 python -m fused_xent bench vit21k --only "fused_xent[auto]" "fused_xent[lean]" 2>&1 | grep -E "^\| vit21k "; PYTHONPATH=. timeout 150 python ../../../benchmarks/weighted_step.py vit21k,gemma2 lean 2>&1 | grep "^|"'
date -u
