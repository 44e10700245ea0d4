"""Objectives beside the language-model loss (gist_lightning.objectives): distillation from a
frozen teacher, segment-wise token importance, fine-grained autoencoding; checked by behaviour
(a model distilled from itself with its own view loses nothing, a unit's reconstruction reads its
own gists alone), then trained through the command line, recorded, and kept out of the export."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA

from gist_lightning.long_context import SegmentSettings, encode_context, masked_forward
from gist_lightning.objectives import (
    Objectives,
    autoencode_loss,
    build_autoencoder,
    context_labels,
    distill_loss,
    gist_units,
    importance_weights,
    weighted_lm_loss,
)
from gist_lightning.padding import pad_batch
from gist_lightning.templates import encode_continuation, encode_target

ROOT = Path(__file__).resolve().parents[1]
G = 99
CONTEXTS = ["the code of amber is 4417 and the code of blue is 9 while the cat sleeps all day",
            "apple banana cherry dog egg fig grape and the code of amber is 4417"]


def _batch(tok, gist_id, settings):
    """Segmented prompts with answers, labels on the answers only (as the collator makes them)."""
    rows, labels = [], []
    for context, answer in zip(CONTEXTS, ["4417", "fig"]):
        prompt = (encode_context(tok, context, settings, gist_id)
                  + encode_continuation(tok, "the code?", False))
        target = encode_target(tok, answer)
        rows.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
    ids, mask = pad_batch(rows, tok.pad_token_id, "left")
    lab, _ = pad_batch(labels, -100, "left")
    return ids, mask, lab


def test_the_plain_weighted_loss_is_the_models_own_loss(make_pair):
    model, tok, gist_id = make_pair("llama", "eager")
    settings = SegmentSettings(8, 2, "fine")
    ids, mask, labels = _batch(tok, gist_id, settings)
    with torch.no_grad():
        out = masked_forward(model, ids, mask, gist_id, settings, labels=labels)
    assert weighted_lm_loss(out.logits, labels, None, 0.0) == pytest.approx(out.loss.item(), abs=1e-6)
    ones = torch.ones(labels.shape[0], labels.shape[1] - 1)
    assert weighted_lm_loss(out.logits, labels, ones, 1.0) == pytest.approx(out.loss.item(), abs=1e-6)


def test_context_labels_are_the_prompts_raw_tokens_and_the_term_is_the_masked_models_loss(make_pair):
    """The context term's targets: every real prompt token but gists, the answer and each example's
    first token (a packed row's too); its value is the loss of the model under the condition's mask
    with those labels, and the module adds it with its weight."""
    from gist_lightning.module import GistLitModule

    model, tok, gist_id = make_pair("llama", "eager")
    settings = SegmentSettings(8, 2, "fine")
    ids, mask, labels = _batch(tok, gist_id, settings)
    ctx = context_labels(ids, mask, labels, gist_id)
    for row in range(ids.shape[0]):
        real = mask[row].bool()
        first = int(real.nonzero()[0])
        want = [t for i, t in enumerate(ids[row].tolist())
                if real[i] and i != first and t != gist_id and labels[row, i] == -100]
        assert ctx[row][ctx[row] != -100].tolist() == want and len(want) > 10
    assert not ((ctx != -100) & (labels != -100)).any()  # the answer stays the lm term's
    packed = torch.tensor([[5, 6, gist_id, 7, 8, 9, gist_id, 10]])
    seg = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    got = context_labels(packed, torch.ones_like(packed), torch.full_like(packed, -100), gist_id, seg)
    assert got.tolist() == [[-100, 6, -100, 7, -100, 9, -100, 10]]  # each example's first token: none

    with torch.no_grad():
        gist = masked_forward(model, ids, mask, gist_id, settings, "gist", labels=ctx)
        full = masked_forward(model, ids, mask, gist_id, settings, "pos_control", labels=ctx)
    assert gist.loss.item() != pytest.approx(full.loss.item(), abs=1e-4)  # the mask decides what it reads
    module = GistLitModule(model_config={"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1,
                                         "num_attention_heads": 2}, num_gist_tokens=2,
                           segments={"segment_tokens": 8, "gists_per_segment": 2, "placement": "fine"},
                           objectives={"context_weight": 0.5})
    module.model, module.tokenizer = model, tok
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with torch.no_grad():
        terms = module._losses(batch)
        answer = masked_forward(model, ids, mask, gist_id, settings, "gist", labels=labels).loss
    assert terms["context"].item() == pytest.approx(gist.loss.item(), abs=1e-5)
    assert terms["lm"].item() == pytest.approx(answer.item(), abs=1e-5)
    assert terms["loss"].item() == pytest.approx(answer.item() + 0.5 * gist.loss.item(), abs=1e-5)


def test_the_context_term_is_refused_for_an_encoder_decoder_model():
    from gist_lightning.module import GistLitModule

    with pytest.raises(ValueError, match="context_weight predicts the prompt's tokens"):
        GistLitModule(model_config={"model_type": "t5", "d_model": 32, "d_ff": 64, "num_layers": 1,
                                    "num_heads": 2, "d_kv": 16}, objectives={"context_weight": 1.0})


def test_distillation_is_zero_from_the_same_view_and_trains_only_the_student(make_pair):
    """A model distilled from itself, both seeing the whole context, loses nothing; under the gist
    rule it loses something, and the gradient reaches the student alone."""
    student, tok, gist_id = make_pair("llama", "eager", seed=0)
    teacher, _, _ = make_pair("llama", "eager", seed=0)
    teacher.requires_grad_(False)
    settings = SegmentSettings(8, 2, "fine")
    ids, mask, labels = _batch(tok, gist_id, settings)
    with torch.no_grad():
        full = masked_forward(teacher, ids, mask, gist_id, settings, "pos_control").logits
    same = masked_forward(student, ids, mask, gist_id, settings, "pos_control").logits
    assert distill_loss(same, full, labels, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    gisted = masked_forward(student, ids, mask, gist_id, settings, "gist").logits
    loss = distill_loss(gisted, full, labels, 1.0)
    assert loss.item() > 1e-4
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_importance_weights_follow_the_gain_from_the_context_capped_and_average_one():
    """Three loss tokens the teacher finds more likely with the context by known log-likelihood
    gains; the weights are softmax(min(gain, cap)) over a row's loss tokens, times their count."""
    vocab, targets, raised = 5, [1, 2, 3], [0.0, 1.5, 6.0]
    labels = torch.tensor([[-100, -100] + targets])
    alone, full = torch.zeros(1, 5, vocab), torch.zeros(1, 5, vocab)
    for i, (t, x) in enumerate(zip(targets, raised)):
        full[0, 1 + i, t] = x  # position 1 + i predicts targets[i]
    log_alone = -torch.log(torch.tensor(float(vocab)))
    gains = torch.tensor([x - torch.log(torch.exp(torch.tensor(x)) + vocab - 1) - log_alone for x in raised])
    assert gains.max() > 1.0  # the cap below binds on the last token
    for cap in (1.0, 100.0):
        w = importance_weights(full, alone, labels, cap)
        want = torch.softmax(gains.clamp(max=cap), 0) * 3
        assert w[0, 0] == 0  # the question's token: no loss there
        assert torch.allclose(w[0, 1:], want, atol=1e-5), (cap, w, want)
    capped, uncapped = (importance_weights(full, alone, labels, cap)[0, 3] for cap in (1.0, 100.0))
    assert capped < uncapped


def test_gist_units_of_coarse_fine_and_packed_rows():
    """A unit is a run of gists and the raw tokens since the previous run; what follows an example's
    last gists (its question and answer) is no unit; packed examples do not run into each other."""
    row = torch.tensor([[0, 1, 2, G, G, 3, 4, G, G, 7, 8]])  # 0: padding column
    examples = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    assert gist_units(row, examples, G) == [(0, [3, 4], [1, 2]), (0, [7, 8], [5, 6])]
    fine = torch.tensor([[1, G, 2, G, 3, 4, G, 9]])
    assert gist_units(fine, torch.ones_like(fine), G) == [(0, [1], [0]), (0, [3], [2]), (0, [6], [4, 5])]
    packed = torch.tensor([[1, 2, G, 5, 6, 1, 2, G, 5]])
    seg = torch.tensor([[1, 1, 1, 1, 1, 2, 2, 2, 2]])
    assert gist_units(packed, seg, G) == [(0, [2], [0, 1]), (0, [7], [5, 6])]


def test_each_unit_is_reconstructed_from_its_own_gists_alone(make_pair):
    """Perturbing the keys/values of every other column leaves a unit's reconstruction loss as it
    was; perturbing its own gists changes it; the loss reaches the student's weights."""
    model, tok, gist_id = make_pair("llama", "eager", seed=0)
    settings = SegmentSettings(8, 2, "coarse")
    ids, mask, _ = _batch(tok, gist_id, settings)
    out = masked_forward(model, ids, mask, gist_id, settings, use_cache=True)
    ae = build_autoencoder(model.config)
    positions = torch.stack([torch.clamp(mask[b].cumsum(-1) - 1, min=0) for b in range(len(mask))])
    units = gist_units(ids, mask, gist_id)
    assert len(units) >= 4
    base = autoencode_loss(ae, out.cache, ids, mask, positions, gist_id, per_unit=True)
    target = 1  # perturb everything but unit 1's gists, then unit 1's gists
    b, own, _ = units[target]
    layer = out.cache.layers[-1]
    keys, values = layer.keys.detach().clone(), layer.values.detach().clone()
    others = torch.ones(keys.shape[2], dtype=torch.bool)
    others[own] = False
    layer.keys, layer.values = keys.clone(), values.clone()
    layer.keys[:, :, others] += 3.0
    layer.values[:, :, others] -= 3.0
    moved = autoencode_loss(ae, out.cache, ids, mask, positions, gist_id, per_unit=True)
    assert moved[target].item() == pytest.approx(base[target].item(), abs=1e-5)
    assert (moved - base).abs().max() > 1e-3  # the others did move
    layer.keys, layer.values = keys.clone(), values.clone()
    layer.keys[b, :, own] += 3.0
    layer.values[b, :, own] -= 3.0
    mine = autoencode_loss(ae, out.cache, ids, mask, positions, gist_id, per_unit=True)
    assert abs(mine[target].item() - base[target].item()) > 1e-3
    fresh = masked_forward(model, ids, mask, gist_id, settings, use_cache=True)
    autoencode_loss(ae, fresh.cache, ids, mask, positions, gist_id).backward()
    assert model.model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(distill_weight=1.0), "distill_weight needs a teacher"),
    (dict(importance_weight=0.5), "importance_weight needs a teacher"),
    (dict(teacher="x"), "teacher is set but no objective uses it"),
    (dict(importance_weight=1.5, teacher="x"), "importance_weight mixes"),
    (dict(autoencode_weight=-1.0), "autoencode_weight must be >= 0"),
    (dict(context_weight=-0.5), "context_weight must be >= 0"),
])
def test_bad_objectives_are_refused_naming_the_setting(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Objectives(**kwargs)


def test_autoencoding_without_segments_is_refused():
    from gist_lightning.module import GistLitModule

    with pytest.raises(ValueError, match="autoencode_weight .* needs model.segments"):
        GistLitModule(model_config={"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1,
                                    "num_attention_heads": 2}, objectives={"autoencode_weight": 1.0})


TINY = json.dumps({**TINY_LLAMA, "max_position_embeddings": 2048})


def _fit(tmp_path, name, *extra):
    from gist_lightning.cli import cli_main

    return cli_main(["fit", "--config", str(ROOT / "configs" / "tiny.yaml"),
                     "--config", str(ROOT / "configs" / "tiny-long.yaml"), "--trainer.max_steps", "3",
                     "--trainer.val_check_interval", "3", "--trainer.enable_progress_bar", "false",
                     "--trainer.logger.init_args.name", name, "--trainer.log_every_n_steps", "1",
                     "--model.model_config", TINY, "--data.train_size", "24", "--data.validation_size", "3",
                     "--data.eval_batch_size", "3", "--data.context_words", "[40, 60]",
                     "--data.cache_dir", str(tmp_path / "cache"), "--model.max_new_tokens", "2", *extra])


@pytest.mark.slow
def test_objectives_train_are_logged_recorded_and_stay_out_of_the_export(tmp_path, monkeypatch):
    """A base, then a gist model fine-tuned from it with all three objectives and the base as its
    teacher: each term logged apart, the teacher left as it was, the objectives in the checkpoint's
    hyperparameters and the export's settings, the autoencoder in the checkpoint and not the export."""
    from gist_lightning.evaluation.callbacks import ExportBest
    from gist_lightning.export import load_pretrained

    monkeypatch.chdir(tmp_path)
    base = _fit(tmp_path, "base", "--model.condition", "pos_control")
    base_export = next(c for c in base.trainer.callbacks if isinstance(c, ExportBest)).path
    teacher_before = {k: v.clone() for k, v in load_pretrained(base_export)[0].state_dict().items()}
    objectives = {"teacher": str(base_export), "distill_weight": 0.5, "importance_weight": 0.5,
                  "autoencode_weight": 0.3, "context_weight": 0.2}
    cli = _fit(tmp_path, "gist", "--model.model_config", "null", "--model.model_name_or_path",
               str(base_export), "--model.objectives", json.dumps(objectives))
    run = Path(cli.trainer.log_dir)
    import csv

    logged = list(csv.DictReader(open(run / "metrics.csv")))
    for term in ("train/loss", "train/lm_loss", "train/distill_loss", "train/autoencode_loss",
                 "train/context_loss"):
        values = [float(r[term]) for r in logged if r.get(term)]
        assert len(values) == 3 and all(v > 0 for v in values), term
    spread = [float(r["train/importance_spread"]) for r in logged if r.get("train/importance_spread")]
    assert len(spread) == 3 and all(v >= 0 for v in spread), spread  # logged as a statistic, not a loss
    assert not any("importance_spread_loss" in k for k in logged[0])
    teacher = cli.model._teacher[0]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    [ckpt] = (run / "checkpoints").glob("last*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["hyper_parameters"]["objectives"] == {**objectives, "distill_temperature": 1.0,
                                                       "importance_cap": 2.0}
    assert any(k.startswith("autoencoder.") for k in state["state_dict"])
    assert not any("teacher" in k for k in state["state_dict"])
    export = next(c for c in cli.trainer.callbacks if isinstance(c, ExportBest)).path
    model, _, settings = load_pretrained(export)
    assert settings["objectives"]["autoencode_weight"] == 0.3
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in cli.model.model.parameters())


@pytest.mark.slow
def test_importance_weights_that_change_nothing_are_reported_once(tmp_path, monkeypatch):
    """Where every loss token's gain reaches the cap (here a cap below any gain), the weights are
    uniform and the objective is the plain loss: the first training batch says so, naming the cap;
    with a cap the gains stay under, nothing is said."""
    from gist_lightning.evaluation.callbacks import ExportBest

    monkeypatch.chdir(tmp_path)
    base = _fit(tmp_path, "base", "--model.condition", "pos_control")
    teacher = str(next(c for c in base.trainer.callbacks if isinstance(c, ExportBest)).path)
    for cap, said in ((-1000.0, True), (1000.0, False)):
        objectives = {"teacher": teacher, "importance_weight": 0.5, "importance_cap": cap}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _fit(tmp_path, f"cap{cap}", "--model.model_config", "null", "--model.model_name_or_path", teacher,
                 "--model.objectives", json.dumps(objectives))
        told = [str(w.message) for w in caught if "importance_weight changes nothing" in str(w.message)]
        assert len(told) == (1 if said else 0), (cap, told)
        if said:
            assert f"importance_cap ({cap})" in told[0]


def test_a_teacher_with_another_vocabulary_is_refused_before_training(make_pair, tmp_path):
    from gist_lightning.export import export_pretrained
    from gist_lightning.module import GistLitModule

    model, tok, _ = make_pair("llama", seed=0)  # the test tokenizer, not the suite's
    export_pretrained(model, tok, tmp_path / "teacher", num_gist_tokens=2, condition="pos_control")
    module = GistLitModule(model_config=json.loads(TINY), num_gist_tokens=2,
                           segments={"segment_tokens": 8, "gists_per_segment": 2},
                           objectives={"teacher": str(tmp_path / "teacher"), "distill_weight": 1.0})
    with pytest.raises(ValueError, match="tokenizer differs from the student's"):
        module.setup("fit")
