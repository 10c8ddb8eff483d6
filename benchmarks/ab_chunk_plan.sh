# Usage (on the device, from the checkout, the variants set up as benchmarks/ab_lib.sh says): bash benchmarks/ab_chunk_plan.sh
# Session 13's log: benchmarks/NVIDIA-H100-80GB-HBM3/ab_chunk_plan.log
# A/B of lean's chunk plan (session 13): old = ec1f391's package, new = the working tree's
# (the training forward holds the gradients' bytes as logits; the backward's logits in dW's rows
# past each chunk; wider chunks' widths multiples of 128)
. benchmarks/ab_lib.sh
ab_environment
ab_rounds 2 'timeout 200 python -m fused_xent bench extreme_1m llama3 gemma2 vit21k --only "fused_xent[lean]" 2>&1 | grep -E "^\| (extreme_1m|llama3|gemma2|vit21k) "'
echo "=== ArcFace 1M"
ab_rounds 1 'PYTHONPATH=. timeout 150 python ../../../benchmarks/bench_timm.py --out /tmp/timm_$v --cases 1m-arcface --methods "fused lean" 2>&1 | grep -E "^\|" | tail -2'
date -u
