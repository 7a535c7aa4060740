"""Sub-command dispatch of ``python -m bench``.

    python -m bench [STUDY FLAGS]          the teacher-forced decode study (bench.study)
    python -m bench kernels [FLAGS]        W8A16 linear vs torch fp16 / dequantize+F.linear (bench.kernels)
    python -m bench policies [FLAGS]       perplexity of every KV-cache policy (bench.policies)
    python -m bench attention [FLAGS]      decode-attention kernel benchmark (bench.attention)
"""
from __future__ import annotations

import argparse
import sys

SUBCOMMANDS = ("kernels", "policies", "attention")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" except where there is no default or the help text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False) or "default" in text:
            return text
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        name, rest = argv[0], argv[1:]
        if name == "kernels":
            from .kernels import main as sub
        elif name == "policies":
            from .policies import main as sub
        else:
            from .attention import main as sub
        return sub(rest) or 0
    from .study import main as study
    return study(argv) or 0
