"""Prebuild the CUDA extension: ``python -m w8a16_ops.build``."""
import sys

import torch

from ._build import load_extension

if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("w8a16_ops.build: no CUDA GPU visible; nothing to build (the CPU reference ops need none)")
        sys.exit(0)
    ok = load_extension(verbose="-v" in sys.argv)
    print("w8a16_ops.build: CUDA kernels ready" if ok else "w8a16_ops.build: not built (see above)")
    sys.exit(0 if ok else 1)
