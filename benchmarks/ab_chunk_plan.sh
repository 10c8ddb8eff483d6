# Usage (on the device, from the checkout): put the old package in scratch/ab/old (git archive REV fused_xent | tar -x -C scratch/ab/old)
# and the new one in scratch/ab/new (cp -r fused_xent scratch/ab/new/); carry scratch/ab. Session 13's log: benchmarks/NVIDIA-H100-80GB-HBM3/ab_chunk_plan.log
# A/B of lean's chunk plan (session 13): old = ec1f391's package, new = the working tree's
# (the training forward holds the gradients' bytes as logits; the backward's logits in dW's rows
# past each chunk; wider chunks' widths multiples of 128); each variant from its own directory
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, triton; print(torch.__version__, triton.__version__)"
date -u
for round in 1 2; do
  for v in old new; do
    echo "=== round $round variant $v"
    (cd scratch/ab/$v && timeout 200 python -m fused_xent bench extreme_1m llama3 gemma2 vit21k --only "fused_xent[lean]" 2>&1 | grep -E "^\| (extreme_1m|llama3|gemma2|vit21k) ")
  done
done
for v in old new; do
  echo "=== ArcFace 1M, variant $v"
  (cd scratch/ab/$v && PYTHONPATH=. timeout 150 python ../../../benchmarks/bench_timm.py --out /tmp/timm_$v --cases 1m-arcface --methods "fused lean" 2>&1 | grep -E "^\|" | tail -2)
done
date -u
