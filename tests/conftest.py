import os

import torch

# The Triton backend runs on CPU tensors through the interpreter; it must be on before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("TROPD_KERNELS_BACKEND", None)
torch.set_num_threads(min(2, os.cpu_count() or 1))
