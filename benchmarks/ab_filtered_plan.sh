# Usage (on the device, from the checkout): put the old package in scratch/ab/old (git archive REV fused_xent | tar -x -C scratch/ab/old)
# and the new one in scratch/ab/new (cp -r fused_xent scratch/ab/new/); carry scratch/ab. Session 13's log: benchmarks/NVIDIA-H100-80GB-HBM3/ab_filtered_plan.log
# A/B of filtered's wider forward chunks (session 13): old = HEAD's package (6aeb96c), new = the working tree's
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, triton; print(torch.__version__, triton.__version__)"
date -u
PYTHONPATH=. timeout 200 python -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -k "filtered or 1m" 2>&1 | tail -2
for round in 1 2; do
  for v in old new; do
    echo "=== round $round variant $v"
    (cd scratch/ab/$v && timeout 150 python -m fused_xent bench extreme_1m gemma2 --only "fused_xent[filtered]" 2>&1 | grep -E "^\| (extreme_1m|gemma2) ")
  done
done
for v in old new; do
  echo "=== variant $v"
  (cd scratch/ab/$v && timeout 150 python -m fused_xent bench gemma2_peaked llama3 --only "fused_xent[filtered]" 2>&1 | grep -E "^\| (gemma2_peaked|llama3) ")
done
date -u
