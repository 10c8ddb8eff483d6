# Usage (on the device, from the checkout, the variants set up as benchmarks/ab_lib.sh says): bash benchmarks/ab_owned.sh
# Session 17's log: benchmarks/NVIDIA-H100-80GB-HBM3/ab_owned.log
# A/B of lean without a class-tail chunk (class_chunked._owned_ranges: the last chunk takes the tail and up to 7
# classes of the chunk before) at the ViT-21k head (21841 = 8 * 2730 + 1): "auto" (fast: unchanged but for the
# grad kernel's new argument) and lean at the bench's 128 MiB; old = 9f8118f, each variant from its own directory
. benchmarks/ab_lib.sh
ab_environment
ab_rounds 3 'timeout 200 python -m fused_xent bench vit21k --only "fused_xent[auto]" "fused_xent[lean]" 2>&1 | grep -E "^\| vit21k "'
ab_rounds 2 'PYTHONPATH=. timeout 120 python ../../../benchmarks/host_breakdown.py --plain lean@94378496 2>&1 | grep host'
date -u
