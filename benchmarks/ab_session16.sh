# Usage (on the device, from the checkout, the variants set up as benchmarks/ab_lib.sh says): bash benchmarks/ab_session16.sh
# Session 16's log: benchmarks/NVIDIA-H100-80GB-HBM3/ab_session16.log
# A/B of session 16's front-end changes (torch's options= checked, targets / class weights / bias made contiguous,
# the create_graph check in each backward, fast's saved inputs for a second backward) where the host is the bound:
# the ViT-21k head, "auto" (fast, one chunk) and lean at the bench's 128 MiB; each variant from its own directory
. benchmarks/ab_lib.sh
ab_environment
ab_rounds 3 'timeout 200 python -m fused_xent bench vit21k --only "fused_xent[auto]" "fused_xent[lean]" 2>&1 | grep -E "^\| vit21k "'
date -u
