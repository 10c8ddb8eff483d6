# Usage (on the device, from the checkout, the variants set up as benchmarks/ab_lib.sh says): bash benchmarks/ab_session19b.sh
# Session 19's log: benchmarks/NVIDIA-H100-80GB-HBM3/ab_session19b.log
# Three more rounds at the ViT-21k head, old = 6f52db1 (session 18's end), new = session 19's code: the lean call
# at the bench's 128 MiB moved from 2.13-2.79 to 1.74-2.05 ms over this session's first runs; the backward now
# reads ctx.saved_tensors once (it unpacked the 11 saved tensors 2-3 times); each variant in its own processes
. benchmarks/ab_lib.sh
ab_environment
ab_rounds 3 'timeout 150 python -m fused_xent bench vit21k --only "fused_xent[auto]" "fused_xent[lean]" 2>&1 | grep -E "^\| vit21k "; PYTHONPATH=. timeout 120 python ../../../benchmarks/host_breakdown.py --plain lean@94378496 2>&1 | grep host'
date -u
