import os

# The Triton kernels run on the CPU through the interpreter; it must be set before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("FUSED_XENT_GPU_TESTS") else "1")
