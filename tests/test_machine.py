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


def _in_a_fresh_process(code: str) -> str:
    root = Path(__file__).resolve().parents[1]  # (this checkout's package, not another install's)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=root).stdout.strip()


def test_a_sweep_cell_process_loads_no_torch(tmp_path):
    """A sweep cell's process (``python -m gist_lightning.sweeps.cell``) records the CPU of every
    attempt, reads the step a stage of steps starts at from ``last.ckpt`` and waits on its fits:
    neither it nor the packages it imports loads torch (an idle cell held ~250-360 MB with it)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 11}, run / "checkpoints" / "last.ckpt")
    code = ("import sys; from gist_lightning.machine import cpu_model; cpu_model(); "
            "from gist_lightning.sweeps.cell import stage_start; from pathlib import Path; "
            f"print(stage_start(Path({str(tmp_path)!r}), Path({str(run)!r}), 1, True), "
            "'torch' in sys.modules, 'lightning' in sys.modules)")
    assert _in_a_fresh_process(code) == "11 False False"
    assert (tmp_path / "stage1.start").read_text() == "11"


def test_the_packages_names_are_imported_when_first_used():
    code = ("import sys, gist_lightning, gist_lightning.sweeps as s; "
            "print('torch' in sys.modules, 'compress' in vars(gist_lightning), 'Sweep' in vars(s)); "
            "from gist_lightning.caching import compress; "
            "print(gist_lightning.compress is compress, 'compress' in vars(gist_lightning), "
            "s.Sweep.__module__, sorted(set(gist_lightning.__all__) - set(dir(gist_lightning))))")
    assert _in_a_fresh_process(code).splitlines() == [
        "False False False", "True True gist_lightning.sweeps.engine []"]
    import gist_lightning

    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        gist_lightning.nothing  # noqa: B018
