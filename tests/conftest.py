import os

import torch

# Without a GPU the Triton kernels run on the CPU through the interpreter, which must be
# switched on before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
