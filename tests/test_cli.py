"""Every shipped YAML parses against the CLI; k set once reaches the model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from gist_lightning.cli import cli_main

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))
# configs that complete another one rather than stand alone (trainer presets go on top of any config)
LAYERED = {"tiny-t5.yaml": ["tiny.yaml"]}
for preset in (CONFIG_DIR / "strategies").glob("*.yaml"):
    LAYERED[preset.name] = ["tiny.yaml"]


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
    # linked arguments are set on the data only
    assert "num_gist_tokens" in cfg["data"] and "num_gist_tokens" not in cfg["model"]
    assert ("model_name_or_path" in cfg["model"]) != ("model_config" in cfg["model"] and cfg["model"]["model_config"])


def test_one_override_changes_k_everywhere(tmp_path):
    tiny = CONFIG_DIR / "tiny.yaml"
    cli = cli_main(["--config", str(tiny), "--data.num_gist_tokens", "5", "--data.condition", "neg_control",
                    "--data.cache_dir", str(tmp_path), "--trainer.logger", "false"], run=False)
    assert cli.model.hparams.num_gist_tokens == 5 and cli.model.hparams.condition == "neg_control"
    assert cli.model.hparams.gist_token_id == cli.datamodule.gist_token_id
    assert cli.model.hparams.vocab_size == cli.datamodule.vocab_size
