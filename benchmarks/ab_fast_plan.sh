# Usage (on the device, from the checkout): the old package in scratch/ab/old (git archive REV fused_xent | tar -x -C scratch/ab/old),
# the new one in scratch/ab/new (cp -r fused_xent scratch/ab/new/); carry scratch/ab. Session 14's log: benchmarks/NVIDIA-H100-80GB-HBM3/ab_fast_plan.log
# A/B of the fast strategy's row chunks under a budget (session 14): no fp32 dX counted without a scale, chunks made equal;
# each variant from its own directory, alternating, three rounds
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, triton; print(torch.__version__, triton.__version__)"
date -u
for round in 1 2 3; do
  for v in old new; do
    echo "=== round $round variant $v"
    (cd scratch/ab/$v && timeout 200 python -m fused_xent bench gemma2 llama3 --only "fused_xent[fast]" 2>&1 | grep -E "^\| (gemma2|llama3) ")
  done
done
date -u
