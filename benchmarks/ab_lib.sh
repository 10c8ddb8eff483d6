# Shared by the A/B scripts (benchmarks/ab_*.sh), sourced from the checkout on the device. The old
# package lies in scratch/ab/old (git archive REV fused_xent | tar -x -C scratch/ab/old), the new
# one in scratch/ab/new (cp -r fused_xent scratch/ab/new/); the call carries scratch/ab.

# The GPU, driver, torch and Triton, and the time.
ab_environment() {
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python -c "import torch, triton; print(torch.__version__, triton.__version__)"
  date -u
}

# ab_rounds ROUNDS COMMAND: COMMAND (a shell string) in scratch/ab/old, then in scratch/ab/new,
# ROUNDS times: each variant in its own processes, alternating.
ab_rounds() {
  local round v
  for round in $(seq 1 "$1"); do
    for v in old new; do
      echo "=== round $round variant $v"
      (cd scratch/ab/$v && eval "$2")
    done
  done
}
