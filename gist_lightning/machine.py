"""The machine a figure was measured on, named one way everywhere: a benchmark's output, a sweep
cell's attempts, an experiment's model record. Speed, and floating point (so a retrained model, bit
for bit), differ between CPU types, and on Linux ``platform.processor()`` often says only ``x86_64``.
Nothing here imports torch until :func:`describe_machine` is called."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """This machine's CPU as Linux names it (``/proc/cpuinfo``'s ``model name``), else what
    :mod:`platform` knows, else ``unknown``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe_machine() -> str:
    """``<OS>; <CPU>; <n> torch threads; torch <version>``: the line a benchmark records beside its
    figures (a GPU's name is the benchmark's to add, with its device)."""
    import torch

    threads = torch.get_num_threads()
    return f"{platform.platform()}; {cpu_model()}; {threads} torch threads; torch {torch.__version__}"
