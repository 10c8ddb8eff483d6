# Usage (on the device, from the checkout, the variants set up as benchmarks/ab_lib.sh says): bash benchmarks/ab_launch_ints.sh
# Session 18's log: benchmarks/NVIDIA-H100-80GB-HBM3/ab_launch_ints.log
# A/B of the cached Triton launch handing the launcher tensors' addresses (kernels.launch.arg_key: one pass
# for the key and the values; no data_ptr call and no cuPointerGetAttribute per pointer in Triton's C
# launcher) and of _backward_impl without no-op .to() calls, at the ViT-21k head: "auto" and lean at the
# bench's 128 MiB; old = 9f8fa91, each variant from its own directory
. benchmarks/ab_lib.sh
ab_environment
ab_rounds 3 'timeout 200 python -m fused_xent bench vit21k --only "fused_xent[auto]" "fused_xent[lean]" 2>&1 | grep -E "^\| vit21k "'
ab_rounds 3 'PYTHONPATH=. timeout 120 python ../../../benchmarks/host_breakdown.py --plain lean@94378496 auto 2>&1 | grep host'
date -u
