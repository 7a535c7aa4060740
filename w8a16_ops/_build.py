"""Building and loading the CUDA extension.

The kernels are compiled with ninja through ``torch.utils.cpp_extension.load``
the first time ``w8a16_ops`` is imported on a machine with a CUDA GPU, for that
GPU's architecture only, and cached in ``$W8A16_BUILD_DIR`` (default
``~/.cache/w8a16_ops/<torch version>-sm<cc>``). Later imports only load the cached
library. Prebuild with ``python -m w8a16_ops.build``. Set ``W8A16_NO_BUILD=1``
to never compile (the CUDA ops then raise a clear error).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_SOURCES = ["ops.cpp", "linear.cu", "decode_attention.cu", "norm.cu"]
_state: dict = {"loaded": False, "error": None}


def _build_dir(cc: tuple[int, int]) -> Path:
    root = os.environ.get("W8A16_BUILD_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "w8a16_ops"
    tag = f"torch{torch.__version__.split('+')[0]}-cu{torch.version.cuda}-sm{cc[0]}{cc[1]}"
    return base / tag


# Switches the kernels read from the environment once per process (csrc/device_facts.h,
# csrc/linear.cu), with the values they accept. W8A16_GEMM_SPLITS is read on every call and
# checked there (csrc/ops.cpp).
ENV_SWITCHES = {
    "W8A16_PDL": ("0", "1"),             # programmatic dependent launch on sm_90+ (default on)
    "W8A16_GEMM_KTILE": ("32", "64"),    # k-tile width of unsplit M > 32 GEMM launches (default: by GPU)
}


def check_env() -> None:
    """Raise ValueError when a kernel switch in the environment holds a value the kernels do
    not accept (unset or empty means the default)."""
    for name, allowed in ENV_SWITCHES.items():
        value = os.environ.get(name)
        if value and value not in allowed:
            raise ValueError(f"w8a16_ops: environment variable {name} must be one of {', '.join(allowed)} "
                             f"(or unset), got {value!r}")


def load_extension(verbose: bool = False) -> bool:
    """Build (if needed) and load the CUDA kernels. Returns True when they are loaded.

    Does nothing and returns False when CUDA is unavailable or W8A16_NO_BUILD=1.
    """
    if _state["loaded"]:
        return True
    if not torch.cuda.is_available() or os.environ.get("W8A16_NO_BUILD") == "1":
        return False
    check_env()  # before the library exists: its kernels read the switches once
    from torch.utils.cpp_extension import load

    missing = [s for s in _SOURCES if not (_CSRC / s).exists()]
    if missing:
        raise RuntimeError(f"w8a16_ops: CUDA sources not found in {_CSRC} ({missing}); "
                           "install the project with `pip install -e .` from a source checkout")
    cc = torch.cuda.get_device_capability()
    if cc < (8, 0):
        # The ops themselves report the capability error when called on this GPU.
        _state["error"] = f"requires compute capability >= 8.0, found {cc[0]}.{cc[1]}"
        return False
    build_dir = _build_dir(cc)
    build_dir.mkdir(parents=True, exist_ok=True)
    lib = build_dir / "w8a16_cuda.so"
    arch = f"{cc[0]}.{cc[1]}"
    fresh = not lib.exists()
    if fresh:
        print(f"w8a16_ops: compiling CUDA kernels for sm_{cc[0]}{cc[1]} into {build_dir} "
              "(first use only, about a minute)...", file=sys.stderr, flush=True)
    t0 = time.time()
    old_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    try:
        load(
            name="w8a16_cuda",
            sources=[str(_CSRC / s) for s in _SOURCES],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=verbose,
        )
    finally:
        if old_arch is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old_arch
    if fresh:
        print(f"w8a16_ops: built in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    _state["loaded"] = True
    return True


def extension_loaded() -> bool:
    return _state["loaded"]
