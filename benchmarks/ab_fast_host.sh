# Usage (on the device, from the checkout): the old package in scratch/ab/old (git archive REV fused_xent | tar -x -C scratch/ab/old),
# the new one in scratch/ab/new (cp -r fused_xent scratch/ab/new/); carry scratch/ab. Session 14's log: benchmarks/NVIDIA-H100-80GB-HBM3/ab_fast_host.log
# A/B of the fast strategy's host path (session 14): dX from its GEMMs in the input dtype with a class tail, db from one
# column sum, the backward's scaling in one launch; each variant from its own directory, two rounds
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, triton; print(torch.__version__, triton.__version__)"
date -u
for round in 1 2; do
  for v in old new; do
    echo "=== round $round variant $v"
    (cd scratch/ab/$v && timeout 200 python -m fused_xent bench vit21k gemma2 llama3 --only "fused_xent[auto]" "fused_xent[fast]" 2>&1 | grep -E "^\| (vit21k|gemma2|llama3) ")
    (cd scratch/ab/$v && PYTHONPATH=. timeout 200 python ../../../benchmarks/small_heads.py 2>&1 | grep -E "auto")
  done
done
date -u
