"""experiments/gpu_smoke.sh, checked without a GPU: the script runs with ``gist-lightning``, ``python``
and ``nvidia-smi`` replaced by recorders, then every command it would have run is parsed by the
program it names (``--print_config`` for Lightning commands, ``--check_args`` for the benchmarks),
so a renamed option fails here and not on the day a GPU comes."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gist_lightning import cli

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "gpu_smoke.sh"
RECORDER = """#!{python}
import json, os, sys
stdin = sys.stdin.read() if sys.argv[1:2] == ["-"] else None
with open(os.environ["SMOKE_CALLS"], "a") as f:
    f.write(json.dumps({{"argv": [os.path.basename(sys.argv[0]), *sys.argv[1:]], "stdin": stdin}}) + "\\n")
"""


def record(tmp: Path, **env_vars: str) -> list[dict]:
    """Run the script with recorders in ``tmp`` (its output in ``tmp/out``); what it ran, in order:
    ``{"argv": [program, *args], "stdin": heredoc or None}``."""
    (tmp / "bin").mkdir(exist_ok=True)
    for program in ("gist-lightning", "python", "nvidia-smi"):
        (tmp / "bin" / program).write_text(RECORDER.format(python=sys.executable))
        (tmp / "bin" / program).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("SMOKE_BUDGET_S", "SMOKE_STEPS")}
    env.update(PATH=f"{tmp / 'bin'}{os.pathsep}{env['PATH']}", SMOKE_CALLS=str(tmp / "calls.jsonl"))
    env.update(env_vars)
    (tmp / "calls.jsonl").unlink(missing_ok=True)
    done = subprocess.run(["bash", str(SCRIPT), str(tmp / "out"), str(tmp / "runs")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return [json.loads(line) for line in (tmp / "calls.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def calls(tmp_path_factory) -> list[dict]:
    """What the whole script runs."""
    return record(tmp_path_factory.mktemp("gpu_smoke"))


def check_gist_lightning(args: list[str], capsys) -> dict | None:
    """Parse one ``gist-lightning`` command without running it; a Lightning command's config is returned."""
    if args[0] in cli.LIGHTNING_COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*args, "--print_config"])
        out = capsys.readouterr()
        if exit_info.value.code not in (0, None):
            pytest.fail(f"gist-lightning {' '.join(args)} does not parse (exit "
                        f"{exit_info.value.code}):\n{out.err[-2000:]}")
        # deepspeed announces its accelerator on stdout when it is first imported
        kept = [line for line in out.out.splitlines() if not re.match(r"^\[\d{4}-", line)]
        return yaml.safe_load("\n".join(kept))
    try:  # the others take no --print_config: they parse, then fail on the files a GPU run would have made
        cli.COMMANDS[args[0]](args[1:])
    except SystemExit as e:
        pytest.fail(f"gist-lightning {' '.join(args)} does not parse (exit "
                    f"{e.code}):\n{capsys.readouterr().err}")
    except Exception:
        pass
    return None


def check_benchmark(args: list[str], capsys) -> str:
    """Run a benchmark's argument parsing and checks (``--check_args``), no work; return what it prints."""
    path = ROOT / args[0]
    spec = importlib.util.spec_from_file_location(f"smoke_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.main([*args[1:], "--check_args"])
    except SystemExit as e:
        pytest.fail(f"python {' '.join(args)} does not parse (exit {e.code}):\n{capsys.readouterr().err}")
    out = capsys.readouterr().out
    assert "would run" in out, out
    return out


def test_the_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_command_of_the_script_parses(calls, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the script runs from the repository root; presets name files relative to it
    # LightningCLI warns when pytest's arguments are there
    monkeypatch.setattr(sys, "argv", ["gist-lightning"])
    fits, benchmarks = [], {}
    for call in calls:
        program, *args = call["argv"]
        if program == "gist-lightning":
            config = check_gist_lightning(args, capsys)
            if args[0] == "fit":
                assert config["trainer"]["accelerator"] == "gpu", \
                    f"a smoke step that does not use the GPU: {args}"
                fits.append(config)
        elif program == "python" and args[0] == "-":
            compile(call["stdin"], f"<python heredoc of gpu_smoke.sh, {args}>", "exec")
        elif program == "python" and re.fullmatch(r"experiments/bench_\w+\.py", args[0]):
            assert "--device" in args and args[args.index("--device") + 1] == "cuda", args
            benchmarks[Path(args[0]).stem] = check_benchmark(args, capsys)
        else:
            assert program == "nvidia-smi", f"this test does not know how to check {call['argv']}"
    # what issue 27 asks the smoke to cover
    assert len(fits) == 4
    assert sum("deepspeed" in str(f["trainer"].get("strategy")).lower() for f in fits) == 2
    peft = [f["model"]["peft"] for f in fits if f["model"].get("peft")]
    assert sorted(str(p["quantize"]) for p in peft) == ["None", "nf4"]
    assert set(benchmarks) == {"bench_attention", "bench_caching", "bench_serve", "bench_generate"}
    assert "'shape': '1b'" in benchmarks["bench_attention"]
    assert "'dtype': 'bfloat16'" in benchmarks["bench_attention"]


def test_a_part_runs_the_steps_named_and_adds_to_the_times(tmp_path):
    """SMOKE_STEPS runs only the steps it names (split by any blanks); a part without ``machine``
    keeps the first part's times and machine.txt; a name of no step is refused before anything runs."""
    first = record(tmp_path, SMOKE_STEPS="machine\n bench_generate")
    assert [c["argv"][:2] for c in first] == [["nvidia-smi"], ["python", "-"],
                                               ["python", "experiments/bench_generate.py"]]
    machine = (tmp_path / "out" / "machine.txt").read_bytes()
    second = record(tmp_path, SMOKE_STEPS="zero2")
    assert [c["argv"][:2] for c in second] == [["gist-lightning", "fit"]]
    assert (tmp_path / "out" / "machine.txt").read_bytes() == machine
    times = (tmp_path / "out" / "times.txt").read_text().splitlines()
    ran = [line.split()[0] for line in times if line.split()[-1] == "ok"]
    assert ran == ["machine", "bench_generate", "zero2"], times
    assert sum("not selected" in line for line in times) == 2 * 15 - 3, times  # 15 steps, 3 of them run
    record(tmp_path, SMOKE_STEPS="machine")  # a part with machine starts the times afresh
    assert [line.split()[0] for line in (tmp_path / "out" / "times.txt").read_text().splitlines()
            if line.split()[-1] == "ok"] == ["machine"]
    with pytest.raises(AssertionError, match="names no step bench-generate"):
        record(tmp_path, SMOKE_STEPS="machine bench-generate")
    assert not (tmp_path / "calls.jsonl").exists()


@pytest.mark.parametrize("program, args", [
    ("gist-lightning", ["fit", "--config", "configs/qwen3-0.6b-lora.yaml", "--trainer.max_stepz", "20"]),
    ("gist-lightning", ["export", "--ckpt", "x.ckpt", "--output", "y"]),
    ("python", ["experiments/bench_attention.py", "--device", "cuda", "--shapes", "1b"]),
    ("python", ["experiments/bench_serve.py", "--device", "cuda", "--dtype", "bf16"]),
    ("python", ["experiments/bench_caching.py", "--device", "cuda", "--repeat", "3"]),  # no abbreviations
], ids=["fit", "export", "bench_attention", "bench_serve", "bench_caching"])
def test_a_renamed_option_fails_the_check(program, args, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["gist-lightning"])
    check = check_gist_lightning if program == "gist-lightning" else check_benchmark
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        check(args, capsys)
