"""The machine a figure was measured on (gist_lightning.machine): the CPU by the name Linux gives it,
not platform.processor()'s architecture; the line benchmarks record."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gist_lightning import machine


def test_the_cpu_is_named_as_proc_cpuinfo_names_it():
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        pytest.skip("no /proc/cpuinfo on this system")
    names = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
             if line.startswith("model name")]
    if not names:
        pytest.skip("/proc/cpuinfo names no model here")
    assert machine.cpu_model() == names[0] != platform.machine()


def test_without_proc_cpuinfo_the_cpu_is_what_platform_knows(monkeypatch):
    def unreadable(self, *a, **k):
        raise OSError("no such file")

    monkeypatch.setattr(Path, "read_text", unreadable)
    assert machine.cpu_model() == (platform.processor() or platform.machine() or "unknown")


def test_the_machine_line_names_os_cpu_threads_and_torch():
    line = machine.describe_machine()
    assert line == (f"{platform.platform()}; {machine.cpu_model()}; {torch.get_num_threads()} torch threads; "
                    f"torch {torch.__version__}")


def test_a_sweep_cell_process_names_its_cpu_without_importing_torch():
    """A sweep cell's process (``python -m gist_lightning.sweeps.cell``) records the CPU of every
    attempt and waits on its fits: neither it nor the package it imports loads torch (an idle cell
    held ~250 MB with it)."""
    code = ("import sys; from gist_lightning.machine import cpu_model; cpu_model(); "
            "import gist_lightning.sweeps.cell; print('torch' in sys.modules)")
    root = Path(__file__).resolve().parents[1]  # (this checkout's package, not another install's)
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=root).stdout.strip() == "False"


def test_the_package_names_import_when_first_used():
    import gist_lightning

    assert set(gist_lightning.__all__) <= set(dir(gist_lightning))
    from gist_lightning.caching import compress

    assert gist_lightning.compress is compress
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        gist_lightning.nothing  # noqa: B018
