# Usage (on the device, from the checkout, the variants set up as benchmarks/ab_lib.sh says): bash benchmarks/ab_fast_host.sh
# Session 14's log: benchmarks/NVIDIA-H100-80GB-HBM3/ab_fast_host.log
# A/B of the fast strategy's host path (session 14): dX from its GEMMs in the input dtype with a class tail, db from one
# column sum, the backward's scaling in one launch; each variant from its own directory, two rounds
. benchmarks/ab_lib.sh
ab_environment
ab_rounds 2 'timeout 200 python -m fused_xent bench vit21k gemma2 llama3 --only "fused_xent[auto]" "fused_xent[fast]" 2>&1 | grep -E "^\| (vit21k|gemma2|llama3) "; PYTHONPATH=. timeout 200 python ../../../benchmarks/small_heads.py 2>&1 | grep -E "auto"'
date -u
