# Usage (on the device, from the checkout, the variants set up as benchmarks/ab_lib.sh says): bash benchmarks/ab_session20.sh
# Session 20's log: benchmarks/NVIDIA-H100-80GB-HBM3/ab_session20.log
# A/B of CLIP's lean stats and grad kernels taking one exp per product where a block's values lie within
# SHARED_SPAN (clip_chunked's module text) at B = 32768, D = 768 bf16; old = 27450b5, each variant from its own
# directory, fused_xent's lean CLIP backend only
. benchmarks/ab_lib.sh
ab_environment
ab_rounds 3 'PYTHONPATH=. timeout 200 python ../../../benchmarks/bench_clip.py --out /tmp/clip_ab --impls lean --fused-only 2>&1 | grep -E "fused_xent"'
date -u
