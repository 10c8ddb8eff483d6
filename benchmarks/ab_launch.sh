# Usage (on the device, from the checkout, the variants set up as benchmarks/ab_lib.sh says): bash benchmarks/ab_launch.sh
# Session 17's log: benchmarks/NVIDIA-H100-80GB-HBM3/ab_launch.log
# A/B of the cached Triton launch path (kernels/launch.py) where the host is the bound: the ViT-21k head,
# "auto", lean at the bench's 128 MiB and the all-Triton path; each variant from its own directory, three rounds;
# then the host's own time per fw+bw (benchmarks/host_breakdown.py --plain) per variant
. benchmarks/ab_lib.sh
ab_environment
ab_rounds 3 'timeout 200 python -m fused_xent bench vit21k --only "fused_xent[auto]" "fused_xent[lean]" "fused_xent[triton]" 2>&1 | grep -E "^\| vit21k "'
ab_rounds 2 'PYTHONPATH=. timeout 120 python ../../../benchmarks/host_breakdown.py --plain lean@94378496 auto triton 2>&1 | grep host'
date -u
