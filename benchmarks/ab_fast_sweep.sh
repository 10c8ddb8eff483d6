# Usage (on the device, from the checkout, the variants set up as benchmarks/ab_lib.sh says): bash benchmarks/ab_fast_sweep.sh
# Session 15's log: benchmarks/NVIDIA-H100-80GB-HBM3/ab_fast_sweep.log
# A/B of the fast strategy over the bench's class and row sweeps at the default budget (old: before session 14's
# changes to fast, new: after), each variant from its own directory, alternating, two rounds
. benchmarks/ab_lib.sh
ab_environment
ab_rounds 2 'timeout 280 python -m fused_xent bench --sweep classes rows --only "fused_xent[fast]" 2>&1 | grep -E "^\| (classes|rows)[0-9] "'
date -u
