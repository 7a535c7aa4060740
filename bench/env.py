"""The header every benchmark prints: machine, versions, commit, command, date."""
from __future__ import annotations

import datetime
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str:
    """``<sha>`` of the checkout, with ``-dirty`` when tracked files differ from it."""
    sha = _run(["git", "rev-parse", "--short=12", "HEAD"])
    if sha is None:
        return "unknown (not a git checkout)"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return sha + ("-dirty" if dirty else "")


def gpu_driver() -> str:
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0] if out else "n/a"


def command_line(subcommand: str | None, argv: list[str]) -> str:
    """The exact command, as the user would type it again."""
    parts = [sys.executable.rsplit("/", 1)[-1], "-m", "bench"] + ([subcommand] if subcommand else []) + list(argv)
    return " ".join(shlex.quote(p) for p in parts)


def environment(device: torch.device, command: str) -> dict:
    """Everything the header shows, as a JSON-friendly dict."""
    import transformers

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": command,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda or "n/a",
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                    l2_cache_mb=round(getattr(props, "L2_cache_size", 0) / 2**20, 1), driver=gpu_driver())
    else:
        info.update(gpu="none (CPU run)", cpu=platform.processor() or platform.machine(),
                    cpu_threads=torch.get_num_threads(), driver="n/a")
    return info


def format_header(title: str, info: dict) -> str:
    keys = ["date", "command", "git_commit", "gpu", "gpu_memory_gb", "compute_capability", "driver", "cuda",
            "torch", "transformers", "python", "cpu", "cpu_threads"]
    lines = [f"# {title}"]
    lines += [f"{k:>18}: {info[k]}" for k in keys if k in info]
    return "\n".join(lines)


def resolve_device(name: str | None) -> torch.device:
    """``--device``: default cuda when available, else cpu. Raises ValueError when unusable."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"--device {name}: only cuda and cpu are supported")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev
