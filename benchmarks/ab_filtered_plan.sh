# Usage (on the device, from the checkout, the variants set up as benchmarks/ab_lib.sh says): bash benchmarks/ab_filtered_plan.sh
# Session 13's log: benchmarks/NVIDIA-H100-80GB-HBM3/ab_filtered_plan.log
# A/B of filtered's wider forward chunks (session 13): old = HEAD's package (6aeb96c), new = the working tree's
. benchmarks/ab_lib.sh
ab_environment
PYTHONPATH=. timeout 200 python -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -k "filtered or 1m" 2>&1 | tail -2
ab_rounds 2 'timeout 150 python -m fused_xent bench extreme_1m gemma2 --only "fused_xent[filtered]" 2>&1 | grep -E "^\| (extreme_1m|gemma2) "'
ab_rounds 1 'timeout 150 python -m fused_xent bench gemma2_peaked llama3 --only "fused_xent[filtered]" 2>&1 | grep -E "^\| (gemma2_peaked|llama3) "'
date -u
