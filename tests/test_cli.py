"""The command line: every shipped YAML parses (configs are data), one override reaches what it
sets, and the commands beside LightningCLI (export, compress, generate) run end to end."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gist_lightning import compress, generate
from gist_lightning.cli import cli_main, main
from gist_lightning.data import AlpacaPlus, EmbeddedSuite
from gist_lightning.export import export_pretrained, load_pretrained

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))
# configs that complete another one rather than stand alone (trainer presets go on top of any config)
LAYERED = {"tiny-t5.yaml": ["tiny.yaml"], "tiny-long.yaml": ["tiny.yaml"],
           "tiny-long-recall.yaml": ["tiny.yaml", "tiny-long.yaml"],
           # the long-context recipe's two steps
           "tiny-long-base.yaml": ["tiny.yaml", "tiny-long.yaml", "tiny-long-recall.yaml"],
           "tiny-long-gist.yaml": ["tiny.yaml", "tiny-long.yaml", "tiny-long-recall.yaml"]}
for preset in (CONFIG_DIR / "strategies").glob("*.yaml"):
    LAYERED[preset.name] = ["tiny.yaml"]
BIN = str(Path(sys.executable).parent / "gist-lightning")


def print_config(paths, extra=(), capsys=None):
    args = ["fit"]
    for p in paths:
        args += ["--config", str(p)]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args + ["--print_config", *extra], run=True)
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    # deepspeed announces its accelerator on stdout when it is first imported
    return yaml.safe_load("\n".join(line for line in out.splitlines() if not re.match(r"^\[\d{4}-", line)))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_parses(path, capsys, monkeypatch):
    monkeypatch.chdir(CONFIG_DIR.parent)  # presets name DeepSpeed JSON files relative to the repository root
    base = [CONFIG_DIR / b for b in LAYERED.get(path.name, [])]
    cfg = print_config([*base, path], capsys=capsys)
    # the model owns k and the condition; the data names its source class
    assert "num_gist_tokens" in cfg["model"] and "num_gist_tokens" not in cfg["data"]["init_args"]
    assert cfg["data"]["class_path"] in ("gist_lightning.data.EmbeddedSuite",
                                         "gist_lightning.data.AlpacaPlus", "gist_lightning.data.LongRecall")
    from_config = "model_config" in cfg["model"] and cfg["model"]["model_config"]
    assert ("model_name_or_path" in cfg["model"]) != from_config


@pytest.mark.parametrize("name", ["llama-7b.yaml", "flan-t5-xxl.yaml"])
@pytest.mark.parametrize("preset", ["deepspeed-zero3.yaml", "fsdp.yaml"])
def test_a_model_config_stacks_a_strategy_preset(name, preset, capsys, monkeypatch):
    monkeypatch.chdir(CONFIG_DIR.parent)
    own = yaml.safe_load((CONFIG_DIR / name).read_text())["trainer"]
    assert "strategy" not in own and "accelerator" not in own  # the preset's, not copied
    cfg = print_config([CONFIG_DIR / name, CONFIG_DIR / "strategies" / preset], capsys=capsys)["trainer"]
    wanted = yaml.safe_load((CONFIG_DIR / "strategies" / preset).read_text())["trainer"]["strategy"]
    assert cfg["strategy"]["class_path"] == wanted["class_path"]
    assert (cfg["accelerator"], cfg["devices"], cfg["precision"]) == ("gpu", 4, "bf16-mixed")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_a_run_is_named_once_by_its_logger(path, capsys, monkeypatch):
    monkeypatch.chdir(CONFIG_DIR.parent)
    assert "default_root_dir" not in (yaml.safe_load(path.read_text()).get("trainer") or {})
    if path.parent.name == "strategies":
        return
    base = [CONFIG_DIR / b for b in LAYERED.get(path.name, [])]
    logger = print_config([*base, path], capsys=capsys)["trainer"]["logger"]
    # the run folder is runs/<config name>/version_N
    assert (logger["init_args"]["save_dir"], logger["init_args"]["name"]) == ("runs", path.stem)


def test_one_override_reaches_model_and_data(tmp_path):
    tiny = CONFIG_DIR / "tiny.yaml"
    cli = cli_main(["--config", str(tiny), "--model.num_gist_tokens", "5", "--model.condition", "neg_control",
                    "--data.cache_dir", str(tmp_path), "--trainer.logger", "false"], run=False)
    assert cli.model.hparams.num_gist_tokens == 5 and cli.model.hparams.condition == "neg_control"
    assert isinstance(cli.datamodule, EmbeddedSuite)
    assert cli.datamodule.limits.max_length == 96 and cli.datamodule.human_limits.max_length == 128
    cli.datamodule.connect(**cli.model.data_facts())
    collate = cli.datamodule.collator(for_generation=False)
    assert (collate.num_gist_tokens, collate.condition) == (5, "neg_control")


def test_the_data_source_is_chosen_by_class_path(tmp_path):
    cli = cli_main(["--config", str(CONFIG_DIR / "tiny.yaml"), "--data", "gist_lightning.data.AlpacaPlus",
                    "--data.folder", str(tmp_path), "--trainer.logger", "false"], run=False)
    assert isinstance(cli.datamodule, AlpacaPlus) and cli.datamodule.hparams.folder == str(tmp_path)


def test_export_command_writes_the_checkpoints_weights(make_pair, tmp_path, tiny_models):
    import lightning as L

    from gist_lightning.module import GistLitModule

    module = GistLitModule(model_config=tiny_models["t5"], num_gist_tokens=2)
    module.configure_model()
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(torch.randn_like(p))  # weights no config can rebuild
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    main(["export", "--ckpt", str(tmp_path / "m.ckpt"), "--out", str(tmp_path / "hf")])
    model, tok, settings = load_pretrained(tmp_path / "hf")
    assert settings["num_gist_tokens"] == 2
    for (name, a), b in zip(module.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_compress_and_generate_commands_end_to_end(make_pair, tmp_path):
    instructions = ["reverse the list of words", "put cat first and remove every dog from the list please"]
    inputs = ["apple banana cherry", "dog egg fig grape apple"]
    model, tok, _ = make_pair("llama", seed=0)
    export_pretrained(model, tok, tmp_path / "m", num_gist_tokens=1, condition="gist")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([BIN, "compress", "--model", str(tmp_path / "m"), "--instruction", instructions[1],
                          "--out", str(tmp_path / "c.safetensors"), "--input", inputs[0]],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "compression factor" in out.stdout and "KiB" in out.stdout
    (tmp_path / "inputs.txt").write_text("\n".join(inputs * 3) + "\n")
    gen = subprocess.run([BIN, "generate", "--model", str(tmp_path / "m"),
                          "--cache", str(tmp_path / "c.safetensors"),
                          "--inputs", str(tmp_path / "inputs.txt"), "--batch_size", "4",
                          "--max_new_tokens", "5"],
                         capture_output=True, text=True, env=env)
    assert gen.returncode == 0, gen.stderr[-2000:]
    lines = gen.stdout.strip().splitlines()
    assert len(lines) == 6
    # the batched command gives what the Python API gives one by one
    cache = compress(model, tok, [instructions[1]], 1)
    for line, x in zip(lines, inputs * 3):
        want = generate(model, tok, cache, [x], max_new_tokens=5)[0]
        assert line == f"{x}\t{want}"
    again = subprocess.run([BIN, "compress", "--model", str(tmp_path / "m"), "--instruction", "x",
                            "--out", str(tmp_path / "c.safetensors")], capture_output=True, text=True,
                           env=env)
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr


# -- killed and resumed ----------------------------------------------------------------------------
def _fit_command(config: Path, folder: Path, *extra: str) -> list[str]:
    # 40 steps, validation at 20 and 40, last.ckpt every 3 steps; a fixed logger version, so that a
    # resumed run finds its last.ckpt and writes into the same run folder
    return [BIN, "fit", "--config", str(config), "--trainer.max_steps", "40",
            "--trainer.val_check_interval", "20", "--trainer.default_root_dir", str(folder),
            "--trainer.logger.init_args.save_dir", str(folder), "--trainer.logger.init_args.version", "run",
            "--checkpoint_every_n_steps", "3", *extra]


def _run_folder(folder: Path) -> Path:
    return folder / "t" / "run"


# A fit killed and resumed from last.ckpt equals the uninterrupted run: tests/test_resume.py (every
# phase a kill can land in, one process), tests/test_resume_strategies.py (DDP, DeepSpeed, FSDP).


def assert_reads_cleanly(done: subprocess.CompletedProcess) -> None:
    """What a fit prints, as the demo prints it: the model summary without FLOPs it did not count,
    the progress bar's last frame once, before the run's summary (not again below it), and nothing
    of DeepSpeed, which the run does not use (the export imports it where it is installed)."""
    out = done.stdout
    assert "Total params" in out and "flops" not in out.lower(), out
    printed = out + done.stderr
    assert "real_accelerator" not in printed and not re.search(r"^\[\d{4}-\d\d-\d\d ", printed, re.M), printed
    bars = [m.start() for m in re.finditer(r"^Step \(epoch \d+\)", out, re.M)]
    summary = out.index("\n== gist, k=")
    assert len(bars) == 1 and bars[0] < summary, out
    assert out.rstrip().splitlines()[-1].lstrip().startswith("load it:"), out  # the summary's last line


@pytest.mark.slow
def test_the_same_config_and_seed_twice_give_identical_metrics(run_config, tmp_path):
    """Reproducibility on one machine: two processes, one config and seed, the same numbers to the
    last digit (losses, ROUGE-L, exact match, the checkpoint's weights, every prediction). With the
    progress bar and model summary on, as in the demo, each prints what the demo prints, cleanly."""
    config = run_config(val_check_interval=20, enable_progress_bar=True, enable_model_summary=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = [tmp_path / "first", tmp_path / "second"]
    for folder in runs:
        done = subprocess.run(_fit_command(config, folder), capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert_reads_cleanly(done)

    def logged(folder):
        rows = list(csv.DictReader(open(_run_folder(folder) / "metrics.csv")))
        return [{k: v for k, v in r.items() if v and "time" not in k} for r in rows]

    first, second = (logged(f) for f in runs)
    assert first == second and any("validation_unseen/rougeL" in r for r in first)
    assert any(k.endswith("loss") for r in first for k in r)
    a, b = (torch.load(_run_folder(f) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
            for f in runs)
    assert all(torch.equal(a[name], b[name]) for name in a)
    for p in sorted((_run_folder(runs[0]) / "predictions").iterdir()):
        assert (_run_folder(runs[1]) / "predictions" / p.name).read_text() == p.read_text(), p.name


def test_a_checkout_that_is_not_installed_imports_with_its_version(tmp_path):
    """On PYTHONPATH without pip install (no package metadata): the version comes from pyproject.toml."""
    code = ("import importlib.metadata as m\n"
            "found = m.version\n"
            "def version(name):\n"
            "    if name == 'gist-lightning': raise m.PackageNotFoundError(name)\n"
            "    return found(name)\n"
            "m.version = version\n"
            "import gist_lightning\n"
            "print(gist_lightning.__version__)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    from gist_lightning import __version__
    assert done.stdout.split()[-1] == __version__ and re.fullmatch(r"\d+\.\d+\.\d+", __version__)


def test_a_fit_that_fails_before_its_first_step_removes_its_config_and_runs_again(run_config, tmp_path,
                                                                                    monkeypatch):
    """A fit that fails in setup (here its data), or in its first optimizer step (the second
    micro-batch of a gradient accumulation), leaves its run folder without the config.yaml it
    wrote, so the same command runs again into that folder once the cause is fixed (Lightning's
    SaveConfigCallback would refuse to overwrite it); a fit that failed after an optimizer step
    trained keeps its config."""
    from gist_lightning.data.datamodule import GistDataModule
    from gist_lightning.module import GistLitModule

    root = tmp_path / "runs"
    run = root / "t" / "run"
    args = ["fit", "--config", str(run_config(max_steps=2, val_check_interval=2)),
            "--trainer.logger.init_args.version", "run", "--trainer.accumulate_grad_batches", "2"]

    def unreadable(self, stage=None):
        raise OSError("the data cannot be read")

    with monkeypatch.context() as m:
        m.setattr(GistDataModule, "load", unreadable)
        with pytest.raises(OSError, match="the data cannot be read"):
            cli_main(args)
    assert run.is_dir() and not (run / "config.yaml").exists()

    step = GistLitModule.training_step
    for failing_batch, kept in ((1, False), (2, True)):  # batches 0 and 1: the first optimizer step

        def fails(self, batch, batch_idx, at=failing_batch):
            if batch_idx == at:
                raise RuntimeError(f"batch {at} failed")
            return step(self, batch, batch_idx)

        with monkeypatch.context() as m:
            m.setattr(GistLitModule, "training_step", fails)
            with pytest.raises(RuntimeError, match=f"batch {failing_batch} failed"):
                cli_main(args)
        assert (run / "config.yaml").exists() == kept, failing_batch
    (run / "config.yaml").unlink()
    cli_main(args)
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
