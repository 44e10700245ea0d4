"""Parameter-efficient gist tuning (model.peft): what trains and what stays frozen, for every
family; checkpoints that hold only the trainable part and resume exactly; both export forms
reloading to the same logits; refusals that say why."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from gist_lightning.adapters import PeftSettings, apply_peft
from gist_lightning.backends import gist_forward
from gist_lightning.cli import main
from gist_lightning.data import EmbeddedSuite
from gist_lightning.errors import CorruptFileError, GistError
from gist_lightning.export import load_pretrained
from gist_lightning.families import FAMILIES
from gist_lightning.module import GistLitModule
from gist_lightning.tokens import GIST_TOKEN

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Instruction: Reverse the list.\n" + GIST_TOKEN + "\nInput: cat dog owl\nOutput: owl dog cat"


def _batch(model, tok):
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    if model.config.is_encoder_decoder:
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, -4:]}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _effective_rows(model, ids):
    """The rows the model reads for ``ids``: input embedding, and output head where untied."""
    inp = model.get_input_embeddings()(torch.tensor(ids))
    out = model.get_output_embeddings()
    head = out(torch.eye(inp.shape[-1]))[:, ids].T if out is not None else None  # (len(ids), hidden)
    return inp, head


@pytest.mark.parametrize("rank", [4, 0], ids=["lora", "rows-only"])
def test_a_step_changes_only_adapters_and_the_gist_rows(make_pair, family, rank):
    model, tok, gist_id = make_pair(family)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    untied = model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    apply_peft(model, PeftSettings(rank=rank), [gist_id])
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) != ("trainable_tokens_delta" in n) for n in trainable)
    assert any("lora_" in n for n in trainable) == (rank > 0)
    # the gist row of the input embedding, and of the output head where it is not tied to it
    assert len([n for n in trainable if "trainable_tokens_delta" in n]) == (2 if untied else 1)
    if rank and FAMILIES[model.config.model_type].moe:  # experts adapted, routers left as trained
        assert any(".experts." in n for n in trainable) and not any(".gate.lora" in n for n in trainable)
    other = [i for i in range(len(tok)) if i != gist_id]
    rows_before = _effective_rows(model, [gist_id])
    others_before = _effective_rows(model, other)

    torch.manual_seed(0)
    opt = torch.optim.SGD(trainable.values(), lr=1.0)
    gist_forward(model.train(), **_batch(model, tok), gist_token_id=gist_id, condition="gist").loss.backward()
    opt.step()

    # every base tensor is bitwise what it was (PEFT renames wrapped weights: ...base_layer.weight)
    after = {n.replace("base_layer.", "").replace("original_module.", "").replace("token_adapter.", ""): p
             for n, p in model.named_parameters() if not p.requires_grad}
    for name, before in frozen_before.items():
        assert torch.equal(after[name], before), name
    assert all(p.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)  # initialised to 0, trained
    # the gist row moved, in the input embedding and (where untied) in the output head; no other row did
    rows_after, others_after = _effective_rows(model, [gist_id]), _effective_rows(model, other)
    for after_, before_ in zip(rows_after, rows_before):
        assert not torch.equal(after_, before_)
    for after_, before_ in zip(others_after, others_before):
        assert torch.equal(after_, before_)


@pytest.fixture
def pretrained_base(make_pair, tmp_path):
    """``pretrained_base(family)``: a tiny model of ``family`` saved as a local HF folder, as a hub
    model would be (with its tokenizer, <GIST> already added)."""

    def make(family: str = "llama", seed: int = 0) -> str:
        model, tok, _ = make_pair(family, seed=seed)
        folder = tmp_path / f"base-{family}"
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        return str(folder)

    return make


def _data(tmp_path, **kw):
    return EmbeddedSuite(cache_dir=str(tmp_path / "cache"), train_size=128, validation_size=8, batch_size=8,
                         max_validation_records=8, eval_batch_size=8, limits={"max_length": 128},
                         human_limits={"max_length": 160}, **kw)


class StepCounter(L.Callback):
    """Training batches run in this process (a resumed run runs only the rest)."""

    count = 0

    def on_train_batch_end(self, *args):
        self.count += 1


def _fit(base, tmp_path, name, max_steps, callbacks=(), ckpt=None, family="llama", **peft):
    L.seed_everything(0)
    module = GistLitModule(model_name_or_path=base, peft={"rank": 4, **peft}, learning_rate=1e-2,
                           attn_implementation="eager" if family == "gemma2" else "sdpa", max_new_tokens=6)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, limit_val_batches=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path / name), callbacks=list(callbacks))
    steps = StepCounter()
    trainer.callbacks.append(steps)
    trainer.fit(module, datamodule=_data(tmp_path), ckpt_path=ckpt)
    return trainer, module, steps.count


@pytest.mark.slow
def test_checkpoint_holds_the_trainable_part_and_resume_equals_the_uninterrupted_run(
        pretrained_base, tmp_path):
    base = pretrained_base("llama")
    _, straight, _ = _fit(base, tmp_path, "a", max_steps=24)  # default LoRA dropout: the RNG must resume too
    every = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=20, save_top_k=-1,
                            filename="mid-{step}")
    _fit(base, tmp_path, "b", max_steps=24, callbacks=[every])
    ckpt = tmp_path / "ckpts" / "mid-step=20.ckpt"

    state = torch.load(ckpt, weights_only=True)
    trainable = {f"model.{n}": p for n, p in straight.model.named_parameters() if p.requires_grad}
    assert set(state["state_dict"]) == set(trainable)
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable.values())
    all_bytes = sum(p.numel() * p.element_size() for p in straight.model.parameters())
    # weights + two AdamW moments of the trainable part, plus bookkeeping; the frozen base is not there
    assert ckpt.stat().st_size < 3 * trainable_bytes + 64_000 < all_bytes, (ckpt.stat().st_size,
                                                                            trainable_bytes)

    _, resumed, steps_run = _fit(base, tmp_path, "c", max_steps=24, ckpt=str(ckpt))
    assert steps_run == 4
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name


def test_a_checkpoint_of_other_peft_settings_is_refused(pretrained_base):
    module = GistLitModule(model_name_or_path=pretrained_base("llama"), peft={"rank": 4})
    module.configure_model()
    partial = {k: v for k, v in module.state_dict().items() if "lora_A" not in k and "token_adapter" not in k}
    with pytest.raises(CorruptFileError, match="lacks .* trainable tensors"):
        module.load_state_dict(partial)


@torch.no_grad()
def _logits(model, tok):
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    if model.config.is_encoder_decoder:
        start = torch.tensor([[model.config.decoder_start_token_id, 5]])
        return model(input_ids=ids, decoder_input_ids=start).logits
    return model(input_ids=ids).logits


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "t5", "gemma2"])
def test_both_export_forms_reload_to_the_same_logits(pretrained_base, tmp_path, family):
    base = pretrained_base(family)
    _, module, _ = _fit(base, tmp_path, "run", max_steps=6, family=family)
    want = _logits(module.model.eval(), module.tokenizer)
    untouched = GistLitModule(model_name_or_path=base, attn_implementation=module.hparams.attn_implementation)
    untouched.configure_model()
    # it trained
    assert not torch.allclose(want, _logits(untouched.model.eval(), module.tokenizer), atol=1e-3)

    adapter = module.export(tmp_path / "adapter", form="adapter")
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "model.safetensors").exists()
    merged = module.export(tmp_path / "merged", form="merged")
    assert (merged / "model.safetensors").is_file()
    for folder in (adapter, merged):
        model, tok, settings = load_pretrained(folder)
        assert settings["num_gist_tokens"] == 1 and ("adapter" in settings) == (folder == adapter)
        assert torch.allclose(_logits(model, tok), want, atol=1e-5), folder.name
    unmerged, tok, _ = load_pretrained(adapter, merge=False)
    assert torch.allclose(_logits(unmerged, tok), want, atol=1e-5)
    # the run's model was left as it was by the merged export
    assert torch.equal(_logits(module.model, module.tokenizer), want)


def test_an_adapter_export_without_its_base_names_the_base(pretrained_base, tmp_path):
    base = pretrained_base("llama")
    module = GistLitModule(model_name_or_path=base, peft={"rank": 4})
    module.configure_model()
    out = module.export(tmp_path / "adapter", form="adapter")
    Path(base, "config.json").rename(Path(base, "moved.json"))
    with pytest.raises(FileNotFoundError, match="base model"):
        load_pretrained(out)


@pytest.mark.slow
def test_export_command_writes_both_forms_from_a_checkpoint(pretrained_base, tmp_path, capsys):
    base = pretrained_base("llama")
    every = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=4, filename="s{step}")
    _, module, _ = _fit(base, tmp_path, "run", max_steps=4, callbacks=[every])
    want = _logits(module.model.eval(), module.tokenizer)
    ckpt = next((tmp_path / "ckpts").glob("*.ckpt"))
    for form in ("merged", "adapter"):
        main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / form), "--form", form])
        model, tok, _ = load_pretrained(tmp_path / form)
        assert torch.allclose(_logits(model, tok), want, atol=1e-5), form
    assert "adapter)" in capsys.readouterr().out


def test_qlora_on_cpu_fails_with_a_clear_message(pretrained_base):
    module = GistLitModule(model_name_or_path=pretrained_base("llama"), peft={"quantize": "nf4"})
    with pytest.raises(GistError, match="needs a CUDA GPU"):
        module.configure_model()


def test_peft_needs_a_pretrained_base_and_valid_settings(tiny_models):
    with pytest.raises(ValueError, match="model_name_or_path"):
        GistLitModule(model_config=tiny_models["llama"], peft={"rank": 4})
    with pytest.raises(ValueError, match="quantize"):
        PeftSettings(quantize="int3")
    with pytest.raises(ValueError, match="rank"):
        PeftSettings(rank=-1)


def test_an_adapter_export_of_a_full_run_is_refused(tiny_models, tmp_path):
    module = GistLitModule(model_config=tiny_models["llama"])
    module.configure_model()
    with pytest.raises(GistError, match="needs a model.peft run"):
        module.export(tmp_path / "x", form="adapter")


@pytest.mark.parametrize("name", ["qwen3-0.6b-lora.yaml", "llama-3.1-8b-lora.yaml"])
def test_one_gpu_presets_train_adapters_in_bf16(name):
    cfg = yaml.safe_load((ROOT / "configs" / name).read_text())  # the CLI parse is in test_cli
    assert cfg["trainer"]["devices"] == 1 and "strategy" not in cfg["trainer"]
    assert cfg["trainer"]["precision"] == "bf16-mixed" and cfg["model"]["dtype"] == "bfloat16"
    assert cfg["model"]["gradient_checkpointing"] is True
    PeftSettings(**cfg["model"]["peft"])
    assert cfg["data"]["class_path"] == "gist_lightning.data.AlpacaPlus"


@pytest.mark.slow
def test_fit_from_the_command_line_exports_the_best_adapters(pretrained_base, run_config, tmp_path):
    from gist_lightning.cli import cli_main
    from gist_lightning.evaluation.callbacks import ExportBest

    config = run_config(max_steps=6, val_check_interval=3)
    cli = cli_main(["fit", "--config", str(config), "--model.model_config", "null",
                    "--model.model_name_or_path", pretrained_base("llama"), "--model.peft.rank", "4",
                    "--data.limits.max_length", "128", "--data.human_limits.max_length", "160"])
    best = cli.trainer.checkpoint_callback.best_model_path
    assert set(torch.load(best, weights_only=True)["state_dict"]) == cli.model.trainable_names()
    reloaded = GistLitModule.load_from_checkpoint(best)
    export = next(c for c in cli.trainer.callbacks if isinstance(c, ExportBest)).path
    assert (export / "adapter_config.json").is_file()
    model, tok, _ = load_pretrained(export)
    assert torch.allclose(_logits(model, tok), _logits(reloaded.model.eval(), reloaded.tokenizer), atol=1e-5)
