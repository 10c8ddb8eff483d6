# Usage (on the device, from the checkout, the variants set up as benchmarks/ab_lib.sh says): bash benchmarks/ab_clip_ds.sh
# Session 18's log: benchmarks/NVIDIA-H100-80GB-HBM3/ab_clip_ds.log
# A/B of CLIP's lean grad kernel summing the scale's gradient from dz itself (one more multiply per product, dz *
# out_scale at the store, no division by the scale afterwards) at B = 32768, D = 768 bf16; old = 6291d97, each
# variant from its own directory, fused_xent's lean CLIP backend only
. benchmarks/ab_lib.sh
ab_environment
ab_rounds 3 'PYTHONPATH=. timeout 200 python ../../../benchmarks/bench_clip.py --out /tmp/clip_ab --impls lean --fused-only 2>&1 | grep -E "fused_xent"'
date -u
