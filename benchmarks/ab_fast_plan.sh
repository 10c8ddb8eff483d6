# Usage (on the device, from the checkout, the variants set up as benchmarks/ab_lib.sh says): bash benchmarks/ab_fast_plan.sh
# Session 14's log: benchmarks/NVIDIA-H100-80GB-HBM3/ab_fast_plan.log
# A/B of the fast strategy's row chunks under a budget (session 14): no fp32 dX counted without a scale, chunks made equal;
# each variant from its own directory, alternating, three rounds
. benchmarks/ab_lib.sh
ab_environment
ab_rounds 3 'timeout 200 python -m fused_xent bench gemma2 llama3 --only "fused_xent[fast]" 2>&1 | grep -E "^\| (gemma2|llama3) "'
date -u
