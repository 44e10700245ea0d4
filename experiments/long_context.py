"""Long contexts: recipes that train every time, compared by compression ratio, in one ablation.

Per task and seed, a full-attention **base** (``pos_control``: the gists in place, hiding nothing)
is trained first, on short contexts where the key-value lookup forms (``--base_short_steps`` on
``--base_short_words``), then on the task's; every gist **variant** is then fine-tuned from its
export (as every successor fine-tunes a model that already reads), except ``scratch``, the plain
recipe trained from random weights. A base trains with each fact restated (``--restate``) and the
context's own next-token loss (``--context_weight``), the lookup's dense signal; a gist model on the
answer's loss alone (``--tune_restate``, ``--tune_context_weight``: with the base's, it learned
nothing through its gists).
Every gist model trains with a ratio drawn per batch from {4, 8, 16} and is tested at each
from caches made segment by segment (:func:`gist_lightning.long_context.compress_context`).

Variants (``VARIANTS``): ``scratch`` (coarse, from random weights), ``coarse`` and ``fine`` (from
the base); then, on the placement chosen on validation records (``--placement auto``): ``+layout``
(4 sink tokens and the last raw segment kept: UniGist's layout), ``+ae`` (fine-grained
autoencoding), ``+importance`` (segment-wise token importance from the base), ``+kd``
(distillation from the base), ``+short`` (400 of the 1000 steps on the bases' short contexts
first), ``+learn`` (the short contexts until the answer loss is learned, at most 1000 steps, then
the task's to step 1600), ``+budget`` (a control, never combined: the plain row trained +learn's
1600 steps, all on the task's contexts, so +learn's gain can be told from its extra steps), and
``best`` (the additions that helped on validation, together). ``+until`` (not in the ablation by
default; ``--final_variant`` names it for one task's final models): +learn's curriculum with the
short stage at a constant learning rate after warmup, at most 2000 steps, then the task's contexts
to step 2400. ``+stage`` (likewise): +until's short stage, then STAGE_STEPS on the task's contexts
from wherever it stopped, under a schedule of their own (``model.stage_schedule``: warmup and a
cosine over those steps, peaking at STAGE_RATE of the fine-tuning rate). ``+longstage``: +stage with
LONG_STAGE_STEPS task steps.
Baselines: ``full`` (the base itself), ``truncation`` (the base given only the context's end, as
many positions as each gist variant's cache holds: gists, sinks and window included) and
``no_context`` (the base asked without the context), beside each task's chance floor.

Stages, each a sweep over ``--run_root`` (finished cells kept, interrupted ones resumed, so the
command can be stopped and run again): ``ablation`` (every variant on ``--ablation_task``, on
``--ablation_seeds``) then ``final`` (the chosen variant, full attention and truncation on every
task, on ``--final_seeds``). Outputs (``--out``): ``results.csv`` (``task, method, ratio, seed,
exact_match``, cached positions, the effective ratio), ``plateau.csv`` (the step each model's answer
loss first fell under its threshold, ``--plateau_loss`` scaled per task, if it also ended under it;
the same on the task's own contexts; the end loss),
``speed.csv`` (train steps/s of each objective against the plain loss), ``validation.csv`` (as
results.csv, on the validation records), ``table.md`` (means with 95% bootstrap intervals over seeds
and records, per seed, paired differences against truncation, each task's variant chosen on its
validation records, and each seed against issue #32's goals: ``FULL_GOAL``, ``GOALS``) and
``long_context.png``. ``--test_records_seed`` draws fresh test records, for a recipe chosen after
its test scores were seen.

    python experiments/long_context.py --check_args                   # the cells, nothing runs
    python experiments/long_context.py --stage ablation               # resumable
    python experiments/long_context.py --stage final     # recall1, recall3, two_hop_chain
    python experiments/long_context.py --stage bases --tasks two_hop   # whether its bases train

Two-hop is reported as ``two_hop_chain`` (answered "place code", each token one lookup): plain
two-hop's full-attention bases stayed at chance, so its gist rows would measure nothing.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import functools
import hashlib
import json
import os
import random
import re
import shlex
import signal
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from gist_lightning import generate
from gist_lightning.data.long_recall import asks_unseen_key, fact_values, make_long_record
from gist_lightning.evaluation.stats import format_interval, paired_bootstrap
from gist_lightning.export import load_pretrained
from gist_lightning.files import write_text_atomic
from gist_lightning.long_context import (
    SegmentSettings,
    compress_context,
    compress_context_ids,
)
from gist_lightning.machine import cpu_model
from gist_lightning.masks import interleave_gists
from gist_lightning.sweeps import Cell, Stage, Sweep, SweepStopped
from gist_lightning.sweeps.cell import recorded_attempts
from gist_lightning.sweeps.engine import add_launcher_arguments, launcher_from
from gist_lightning.sweeps.grid import MAX_STEPS
from gist_lightning.tokens import encode_text, gist_token_id, special_frame

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [
    ROOT / "configs" / "tiny.yaml",
    ROOT / "configs" / "tiny-long.yaml",
    ROOT / "configs" / "tiny-long-recall.yaml",
]
RATIOS = (4, 8, 16)
# the tasks: (generator task, facts per context); each has a chance floor, answering any code in the
# context (two-hop with 2 facts: 2 pointers and 2 codes, so answering any code of the context is right half
# the time; with 1 fact the context holds one code and the task needs no second hop). two_hop_chain:
# two_hop's contexts and questions answered "place code" (LongRecall's generator), the form in which
# each answer token is one lookup; its floor is the same (any of the context's 2 chains)
TASKS = {"recall1": ("recall", 1), "recall3": ("recall", 3), "two_hop": ("two_hop", 2),
         "two_hop_chain": ("two_hop_chain", 2)}
# what a model can be trained on: one task, or (``--train_on mixture``) one model per seed for every
# task: recall and two-hop among 1, 2 or 3 facts per context, drawn per record
TRAINING = {**{t: ([g], f) for t, (g, f) in TASKS.items()}, "mixture": (["recall", "two_hop"], [1, 2, 3])}
# the final stage's tasks: two-hop as its chain, the form whose full-attention bases train (97.5-98%;
# plain two-hop's stayed at chance, 42.5-53%, so its gist rows would measure nothing)
DEFAULT_TASKS = ["recall1", "recall3", "two_hop_chain"]
# a task answered otherwise than the task whose records it shares (the chain: two-hop's records)
SHARES_RECORDS = {"two_hop_chain": "two_hop"}


def trained_on(task: str, args) -> str:
    """The training set of the models that answer ``task``: the task itself, or the mixture."""
    return "mixture" if args.train_on == "mixture" else task


def answers(training: str, task: str) -> bool:
    """Whether models trained on ``training`` answer ``task`` (the mixture: recall and two-hop, not
    the chain's answers)."""
    return training == task or (training == "mixture" and TASKS[task][0] in TRAINING[training][0])


# the bases' model: configs/tiny-long.yaml's ~0.9M-parameter LLaMA (at batch 32, 3e-4 constant,
# restated facts and the context loss, its 3-fact words base left the plateau at steps 950-3100 on
# 6-12-word contexts, 4 runs of 4, and kept the lookup on 70-120 words; at 1e-3 and 70-120 words
# from the start it never did: see docs/long-context.md). A larger one: --model_config
# (hidden_size 256, intermediate_size 512: ~3.1M, ~3x slower a step)
MODEL = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
LAYOUT = ["--model.segments.sink_tokens", "4", "--model.segments.recent_segments", "1"]
# what each gist variant adds to fine-tuning from the base (``{base}``: the base's export)
ADDITIONS = {
    "+layout": LAYOUT,
    "+ae": ["--model.objectives.autoencode_weight", "0.5"],
    "+importance": ["--model.objectives.teacher", "{base}", "--model.objectives.importance_weight", "0.5"],
    "+kd": ["--model.objectives.teacher", "{base}", "--model.objectives.distill_weight", "1.0"],
    "+short": [],  # a curriculum, not arguments: SHORT_TUNE_STEPS of the steps on the short contexts
    "+learn": [],  # a curriculum: the short contexts until learned (LEARN_CAP at most), then the task's
    "+budget": [],  # a control: +learn's steps (learn_budget), all on the task's contexts
    "+until": [],  # +learn's, the short stage at a constant rate (UNTIL_CAP at most), UNTIL_STEPS in all
    "+stage": [],  # +until's short stage, then STAGE_STEPS task steps under a schedule of their own
    "+longstage": [],  # +stage with LONG_STAGE_STEPS task steps
}
# rows that control for another row, not additions: never in the combination, never the final choice
CONTROLS = ("+budget",)
# rows added after the recorded ablation ran: not in --ablation_rows' default (--final_variant names them)
LATER = ("+until", "+stage", "+longstage")
# the curricula that decide a cell's stages: one at most
CURRICULA = ("learn", "until", "stage", "longstage")
# +short: of the fine-tuning's steps, these first on the bases' short contexts (1-2 segments, where
# the bases' lookup formed), the rest on the task's: the same number of steps as every other row
SHORT_TUNE_STEPS = 400
# +learn: the short contexts until the mean answer loss of LEARN_WINDOW steps is under the task's
# plateau threshold (gist_lightning.curriculum.StopWhenLearned), at most LEARN_CAP steps, then the
# task's contexts up to LEARN_CAP + the steps +short gives them (600): a budget of 1600 steps, the
# task's stage taking what the short one left. Why: recall3 seed 2's +short cell ended its 400
# short steps before the lookup was learned and never left the plateau; with 1000 it trained, as
# did seeds 0 and 1 (pilots, docs/long-context.md). It takes the place of +short where both are.
LEARN_CAP, LEARN_WINDOW = 1000, 200
# +until: +learn's curriculum with the short stage at a constant learning rate after warmup (5% of
# its cap), so the rate it learns at does not decay with its cap: +learn's cosine ran over the cap
# (1000), and on two_hop_chain seeds 0 and 2 reached it unlearned at 0.0-0.2 of the peak rate;
# pilots capped at 3000 (the cosine over 3000: 0.8-0.9 of the peak there) learned at steps 734-1104. At most
# UNTIL_CAP short steps, then the task's contexts up to UNTIL_STEPS (1300-1650 task steps for those
# stops: the pilots' 1000 left seed 0's task loss still falling; the task's cosine runs over all
# UNTIL_STEPS from the step the short stage stopped at, so a stage stopped at the cap leaves 400 task
# steps at under 7% of the peak rate). It takes +short's place; never with +learn.
UNTIL_CAP, UNTIL_STEPS = 2000, 2400
# +stage: +until's short stage, then STAGE_STEPS on the task's contexts from the step it stopped at
# (Stage(steps=...): the same task stage whatever that step; +until's were 1379-1607 steps on
# two_hop_chain), under a schedule of their own (model.stage_schedule: 5% warmup, the config's cosine
# over those steps) peaking at STAGE_RATE x --tune_learning_rate: +until's task stage started at
# 0.62-0.70 of the peak and decayed from there, which on two_hop_chain seed 0 never left the plateau
STAGE_STEPS, STAGE_RATE = 1500, 1.0
# +longstage: +stage with this many task steps. On two_hop_chain (Intel Xeon bases, sitting 9) +stage
# seed 0 left the plateau at step 1949, ~970 steps into its 1500-step task stage, and ended at 93% of
# its full model at 4x (the goal: 95%), its last ~530 steps on the cosine's tail; seeds 1 and 2 (98%
# and 97%) left it at 1199 and never. The row measures whether more task steps close that gap.
LONG_STAGE_STEPS = 2500


def learn_budget(args) -> int:
    """+learn's steps in all (the short stage's cap, then the task's up to --tune_steps less
    SHORT_TUNE_STEPS more: 1600 at the defaults): +budget trains as many."""
    return LEARN_CAP + args.tune_steps - SHORT_TUNE_STEPS


BASELINES = ("full", "truncation", "no_context")


def is_baseline(method: str) -> bool:
    """A baseline (the base evaluated another way: full, no context, truncation at a gist cache's
    size), not a gist model."""
    return method in BASELINES or method.startswith("truncation")


def truncation_of(method: str) -> str:
    """The truncation a gist model is compared with: as many positions as its cache holds (a layout's
    sinks and window counted: ``truncation+layout``)."""
    return "truncation+layout" if "layout" in method else "truncation"


# issue #32's goals, per seed: full attention at least FULL_GOAL % exact match; each gist model at
# least this % of its seed's full model at each ratio (1-fact recall: 95 / 95 / 85; the others: 95 at
# 4x, 90 at 8x), and above truncation at equal cache with its paired interval (over records) above 0
FULL_GOAL = 90.0
GOALS = {"recall1": {4: 95.0, 8: 95.0, 16: 85.0}}
GOALS_ELSE = {4: 95.0, 8: 90.0}
# the answer loss (per token, over the answer and its end) a model leaves the plateau under, per
# vocabulary: a code is 3-5 tokens, a word one, so guessing among 3 facts' values costs ~0.55 with
# words (the pilots' ws3k sat there at chance for 3000 steps) and more with codes
PLATEAU_LOSS = {"codes": 0.5, "words": 0.25}
# per training, a factor on it: two_hop_chain's answer is place, code and end, so a model that guesses
# the place between the context's 2 and looks its code up right sits at ln(2)/3 = 0.23 with words
# (with codes, 3-5 tokens more to the answer: ln(2)/7 = 0.10, so a tenth of codes' 0.5)
PLATEAU_SCALE = {"two_hop_chain": {"codes": 0.1, "words": 0.5}}


def plateau_loss(training: str, args) -> float:
    """The answer loss the models of ``training`` leave the plateau under (``--plateau_loss`` scaled)."""
    return args.plateau_loss * PLATEAU_SCALE.get(training, {}).get(args.vocabulary, 1.0)


def training_words(args) -> list[int]:
    """The training contexts' words (low, high): ``--train_context_words``, else ``--context_words``."""
    return list(args.train_context_words or args.context_words)


def task_args(training: str, args) -> list[str]:
    """The training set's data (``TRAINING``), and the layout every model of the experiment shares:
    segments of ``--segment_tokens`` raw tokens, 4x for validation and export, ratios 4, 8 and 16
    drawn in training."""
    generators, facts = TRAINING[training]
    gists = str(args.segment_tokens // 4)
    return [
        "--model.segments.segment_tokens",
        str(args.segment_tokens),
        "--model.segments.gists_per_segment",
        gists,
        "--model.num_gist_tokens",
        gists,
        "--model.segments.train_ratios",
        "[4, 8, 16]",
        "--data.init_args.tasks",
        json.dumps(generators),
        "--data.init_args.facts",
        json.dumps(facts),
        "--data.init_args.context_words",
        json.dumps(training_words(args)),
        "--data.init_args.vocabulary",
        args.vocabulary,
        "--data.init_args.batch_size",
        str(args.train_batch_size),
        "--data.init_args.limits.max_length",
        "1024",
    ]


def cell_tail(training: str, seed: int, args, base: bool = False) -> list[str]:
    """What every cell of ``training`` and ``seed`` ends with: its data, a base's or a gist model's
    recipe (:func:`recipe_args`), the seed, no bar, the shared cache."""
    return [
        *task_args(training, args),
        *recipe_args(args, base),
        "--seed_everything",
        str(seed),
        "--data.init_args.seed",  # the order of training batches too, not the initial weights alone
        str(seed),
        "--trainer.enable_progress_bar",
        "false",
        "--data.init_args.cache_dir",
        str(args.run_root / "cache"),
    ]


def variant_args(variant: str, placement: str) -> list[str]:
    """The fine-tuning overrides of ``variant`` (``scratch``, ``base``, ``base+ae``, ``best+ae+kd``...)
    on ``placement``."""
    out = ["--model.segments.placement", placement]
    for addition in variant.split("+")[1:]:
        out += ADDITIONS["+" + addition]
    return out


def run_name(model: str, task: str, seed: int) -> str:
    return f"{model}-{task}-seed{seed}"


def export_of(run_root: Path, model: str, task: str, seed: int) -> Path:
    return run_root / run_name(model, task, seed) / "run" / "export"


def recipe_args(args, base: bool) -> list[str]:
    """What a model trains with besides its data (docs/long-context.md, "Data"): each training fact
    restated with probability ``--restate`` and the context's own next-token loss weighted
    ``--context_weight`` for a base (the lookup's dense signal); ``--tune_restate`` and
    ``--tune_context_weight`` (default none: the answer's loss alone) for a gist model, which
    with the base's context loss learned nothing through its gists in 600 steps (the pilots' g1*)."""
    restate, weight = (args.restate, args.context_weight) if base else (args.tune_restate,
                                                                         args.tune_context_weight)
    return ["--data.init_args.restate", str(restate), "--model.objectives.context_weight", str(weight)]


def split_training(text: str, form: str) -> tuple[str, str]:
    """``TRAINING=<form>`` -> (training, what follows ``=``), or the argparse error naming ``form``."""
    training, sep, rest = text.partition("=")
    if not sep or training not in TRAINING:
        raise argparse.ArgumentTypeError(f"{text!r}: expected TRAINING={form}, TRAINING one of "
                                         f"{', '.join(TRAINING)}")
    return training, rest


def per_training(text: str, kind: type = dict) -> tuple[str, dict | list]:
    """argparse type of ``--task_model_config`` (``TRAINING=JSON`` object: the config fields) and of
    ``--task_base_args`` (``TRAINING=JSON`` list of strings: fit arguments) -> (training, value)."""
    training, fields = split_training(text, "JSON")
    what = "config" if kind is dict else "argument list"
    try:
        config = json.loads(fields)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{training}: its {what} is not JSON ({e})") from None
    if not isinstance(config, kind):
        raise argparse.ArgumentTypeError(f"{training}: its {what} must be a JSON "
                                         f"{'object' if kind is dict else 'list of strings'}")
    if kind is list and not all(isinstance(a, str) for a in config):
        raise argparse.ArgumentTypeError(f"{training}: its arguments must be strings")
    return training, config


def final_variant(text: str) -> tuple[str, str]:
    """argparse type of ``--final_variant``: ``TRAINING=VARIANT`` -> (training, variant): a recipe
    fine-tuned from the base (``base`` with at most one addition, ``best`` with two or more; no
    control; one curriculum (``+learn``, ``+until``, ``+stage``, ``+longstage``) at most)."""
    training, variant = split_training(text, "VARIANT")
    head, *adds = variant.split("+")
    recipes = [a for a in ADDITIONS if a not in CONTROLS]
    unknown = ["+" + a for a in adds if "+" + a not in recipes]
    why = (f"{', '.join(unknown)} is not one of its additions" if unknown
           else "an addition named twice" if len(set(adds)) < len(adds)
           else f"{', '.join('+' + c for c in CURRICULA)} are curricula for one stage: one at most"
           if len(set(adds) & set(CURRICULA)) > 1
           else "base takes one addition at most, best two or more"
           if (head == "base" and len(adds) > 1) or (head == "best" and len(adds) < 2)
           else None if head in ("base", "best") else "it starts neither with base nor with best")
    if why:
        raise argparse.ArgumentTypeError(
            f"{training}: {variant!r} is not a recipe fine-tuned from the base ({why}): base or best, "
            f"then additions from {' '.join(recipes)}")
    return training, variant


def trainings_of(args) -> list[str]:
    """The training sets ``--tasks`` need, in order, each once (the mixture serves every task)."""
    return list(dict.fromkeys(trained_on(t, args) for t in args.tasks))


def model_config_of(training: str, args) -> dict:
    """The HF config fields of ``training``'s base and scratch models: ``--task_model_config`` for
    that training, else ``--model_config`` (a harder task may need a larger model)."""
    return (args.task_model_configs or {}).get(training, args.model_config)


def base_stages(args) -> tuple[Stage, ...]:
    """The base's curriculum: ``--base_short_steps`` on short contexts (``--base_short_words``, with
    ``--base_short_facts`` facts each), where the lookup forms, no validation (so the export is the
    last stage's model, never a short-context one); then ``--base_steps`` more on the task's
    contexts, validated once at the end. Without short steps: one stage, as before."""
    return curriculum(args.base_short_steps, args.base_steps, args, args.base_short_facts)


def base_cell(task: str, seed: int, args) -> Cell:
    """The full-attention base of ``task``: ``pos_control`` over the segmented layout (so its
    vocabulary and positions are the gist models'), ratios drawn as theirs are; a constant
    learning rate after warmup, the curriculum of :func:`base_stages`."""
    return Cell(
        name=run_name("base", task, seed),
        args=(
            "--model.condition",
            "pos_control",
            "--model.model_config",
            json.dumps(model_config_of(task, args)),
            "--model.learning_rate",
            str(args.base_learning_rate),
            "--model.scheduler",
            "constant_with_warmup",
            *cell_tail(task, seed, args, base=True),
            *(args.task_base_args or {}).get(task, ()),
        ),
        stages=base_stages(args),
    )


def gist_cell(variant: str, placement: str, task: str, seed: int, args) -> Cell:
    """A gist model: ``scratch`` from random weights, every other variant fine-tuned from the base."""
    base = export_of(args.run_root, "base", task, seed)
    if variant == "scratch":
        source, steps = ["--model.model_config", json.dumps(model_config_of(task, args))], args.scratch_steps
    else:
        source, steps = (
            ["--model.model_config", "null", "--model.model_name_or_path", str(base),
             "--model.learning_rate", str(args.tune_learning_rate)],
            args.tune_steps,
        )
    # its base's export: to start from, and (scratch too) for the baselines its evaluation compares
    # it with, so it starts when that is done
    needs = (run_name("base", task, seed),)
    extra = [a.replace("{base}", str(base)) for a in variant_args(variant, placement)]
    short, stop = (args.tune_short_steps if variant != "scratch" else None), None
    adds = variant.split("+")[1:]
    if "short" in adds:
        short, steps = SHORT_TUNE_STEPS, steps - SHORT_TUNE_STEPS
    if "budget" in adds:  # a control: one stage on the task's contexts, as long as +learn's two
        if len(adds) > 1:
            raise ValueError(f"{variant}: +budget is a control of the plain row, not combined with others")
        short, steps = None, learn_budget(args)  # (not --tune_short_steps either)
    short_args: tuple[str, ...] = ()
    task_stage: tuple[int, tuple[str, ...]] | None = None
    curricula = [c for c in CURRICULA if c in adds]
    if len(curricula) > 1:
        raise ValueError(f"{variant}: {' and '.join('+' + c for c in curricula)} are curricula for one "
                         "stage; name one")
    if "learn" in adds:
        short, steps = LEARN_CAP, learn_budget(args) - LEARN_CAP
    elif curricula:  # +until (its task stage: the config's schedule, over every step), +stage, +longstage
        short, steps = UNTIL_CAP, UNTIL_STEPS - UNTIL_CAP
        short_args = ("--model.scheduler", "constant_with_warmup")
        if "stage" in adds or "longstage" in adds:
            task_stage = (STAGE_STEPS if "stage" in adds else LONG_STAGE_STEPS,
                          ("--model.stage_schedule", "true",
                           "--model.learning_rate", str(STAGE_RATE * args.tune_learning_rate)))
    if curricula:
        # the answer's own loss: train/lm_loss where objectives add terms to the loss
        objectives = any(a.startswith("--model.objectives.") and a.endswith("_weight") for a in extra) \
            or args.tune_context_weight
        stop = ("train/lm_loss" if objectives else "train/loss", plateau_loss(task, args))
    return Cell(
        name=run_name(method_name(variant, placement), task, seed),
        args=(
            *source,
            *extra,
            *cell_tail(task, seed, args),
        ),
        stages=curriculum(short, steps, args, stop=stop, short_args=short_args, task_stage=task_stage),
        needs=needs,
    )


def curriculum(short_steps: int | None, steps: int, args, short_facts: int | None = None,
               stop: tuple[str, float] | None = None, short_args: tuple[str, ...] = (),
               task_stage: tuple[int, tuple[str, ...]] | None = None) -> tuple[Stage, ...]:
    """``short_steps`` on the short contexts (``--base_short_words``; ``short_facts`` facts each, else
    the task's), unvalidated, then ``steps`` more on the task's, validated once at the end; without
    short steps, one stage. ``stop`` (monitor, threshold): the short stage ends earlier, once learned
    (``StopWhenLearned`` over ``LEARN_WINDOW`` steps), and the task's stage has the steps it left.
    ``short_args``: more arguments of the short stage alone. ``task_stage`` (steps, arguments): the
    task's stage is that many steps from wherever the short one stopped, with those arguments."""
    total = (short_steps or 0) + steps
    last = Stage(max_steps=total, args=("--trainer.val_check_interval", str(total)))
    if task_stage is not None:
        last = Stage(steps=task_stage[0], args=("--trainer.val_check_interval", MAX_STEPS, *task_stage[1]))
    if not short_steps:
        return (last,)
    short = ["--data.init_args.context_words", json.dumps(list(args.base_short_words)),
             "--trainer.limit_val_batches", "0"]
    if short_facts is not None:
        short += ["--data.init_args.facts", json.dumps(short_facts)]
    if stop is not None:
        short += ["--trainer.callbacks+=gist_lightning.curriculum.StopWhenLearned",
                  "--trainer.callbacks.monitor", stop[0], "--trainer.callbacks.below", str(stop[1]),
                  "--trainer.callbacks.window", str(LEARN_WINDOW)]
    return Stage(max_steps=short_steps, args=(*short, *short_args)), last


def method_name(variant: str, placement: str) -> str:
    """``scratch-coarse``, ``base-fine``, ``base-fine+ae``, ``best-fine+ae+kd``..."""
    if variant in ("scratch", "base"):
        return f"{variant}-{placement}"
    head, *adds = variant.split("+")
    return f"{head}-{placement}" + "".join("+" + a for a in adds)


def sweep(cells: list[Cell], args, extra: list[str], ev: Evaluations | None = None) -> Sweep:
    def finished(summary: dict) -> None:
        """Record the model (:func:`record_model`); whatever goes wrong there stops the sweep from
        starting cells (the running ones go on to their end) instead of ending the driver, which
        would take its running cells with it."""
        try:
            record_model(ev, args, summary["name"])
        except SystemExit as e:  # e.g. retrained weights that differ from the recorded ones
            raise SweepStopped(str(e)) from None
        except Exception as e:  # noqa: BLE001 - reported, and the sweep stops as above
            raise SweepStopped(f"{summary['name']}: its evaluation failed: {type(e).__name__}: {e}") from e

    return Sweep(
        cells,
        [str(c) for c in CONFIGS],
        args.run_root,
        launcher_from(args, args.run_root),
        extra,
        retries=args.retries,
        log=lambda m: print(m, flush=True),
        on_finished=finished if ev is not None else None,
    )


def still_to_train(cells: list[Cell], ev: Evaluations | None) -> list[Cell]:
    """``cells`` less those whose evaluations ``ev`` already holds (a finished model, evaluated, maybe
    by a sitting on another machine whose run folders are gone), and less the bases that none of the
    rest needs and that are evaluated too."""
    if ev is None:
        return list(cells)
    rest = [c for c in cells if not ev.models.get(c.name, {}).get("evaluated")]
    needed = {n for c in rest for n in c.needs}
    return [c for c in cells if c in rest or c.name in needed]


def run_or_list(cells: list[Cell], args, extra: list[str], ev: Evaluations | None = None) -> None:
    """Run the cells as one sweep (or, with --check_args, check and list them); each finished model is
    evaluated at once (:func:`record_model`), and a model ``ev`` holds is not trained again."""
    todo = still_to_train(cells, ev)
    for cell in cells:
        if cell not in todo:
            print(f"{cell.name}: evaluated in {ev.path} (steps {ev.models[cell.name].get('steps')}); not run")
    if not todo:
        return
    cells = todo
    sw = sweep(cells, args, extra, None if args.check_args else ev)
    try:
        sw.check()
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if args.check_args:
        for cell in sw.cells:
            last = cell.stages[-1]
            print(
                f"{cell.name}: {sw.describe(cell)}; {last.max_steps or f'{last.steps} more'} steps; "
                f"gist-lightning fit {shlex.join(sw.args(cell, create=False))}"
            )
        return
    try:
        code = sw.run()
    except ValueError as e:  # e.g. cells made with other arguments: refused before anything ran
        raise SystemExit(str(e)) from None
    if code > 128:
        raise SystemExit(f"stopped ({signal.Signals(code - 128).name}); run the same command again: "
                         "finished cells are kept, stopped ones resume from their last.ckpt")
    if code != 0:
        raise SystemExit(
            f"training did not finish; see {args.run_root}/<cell>/stdout.log and the lines above, and run "
            "this again (finished cells are kept, interrupted ones resume)"
        )


VALIDATION_SEED = 1  # records_of's seed of the validation records (the test records': --test_records_seed, 0)


def test_seed(args) -> int:
    """The generator seed of the test records (``--test_records_seed``; 0 where not given)."""
    seed = getattr(args, "test_records_seed", None)
    return 0 if seed is None else seed


def records_of(
    task: str, n: int, seed: int, context_words: tuple[int, int], vocabulary: str = "codes"
) -> list[dict]:
    """A fixed record set of ``task`` from a generator seed no training split uses (``seed`` 0:
    the test set; 1: validation records, what variants are chosen on), keys and values from
    ``vocabulary`` (LongRecall's), each asking a key that training asks (as ``validation_seen``;
    keys never asked are ``validation_unseen``'s: a model that answers asked keys at 96% answered
    those at chance, the base at 68%, and mixing them in hid both)."""
    generator, facts = TASKS[task]
    stream = SHARES_RECORDS.get(task, task)  # (the chain: two_hop's records, its answers)
    rng = random.Random(10_000 + 10_000 * seed + sorted(TASKS).index(stream))
    out = []
    while len(out) < n:
        record = make_long_record(generator, rng.randint(*context_words), rng, facts, vocabulary)
        if not asks_unseen_key(record, vocabulary):
            out.append(record)
    return out


def chance_floor(records: list[dict], vocabulary: str = "codes") -> float:
    """Exact match (%) of answering any code (value) that the context's facts give, uniformly (for
    two_hop_chain, any of its chains: one per code)."""
    return 100 * float(np.mean([1 / max(1, len(set(fact_values(r["instruction"], vocabulary))))
                                for r in records]))


def truncated_rows(
    tok, texts: list[str], settings: SegmentSettings, gist_id: int, positions: list[int]
) -> list[list[int]]:
    """Each context cut to its last raw tokens such that the row (the start tokens, the raw tokens
    and the full model's gists under ``settings``) holds at most ``positions[i]`` positions (the
    gist cache's size at the ratio tested); at least one raw token is kept."""
    before, _ = special_frame(tok)

    def row(raw):
        return before + interleave_gists(
            raw, settings.segment_tokens, settings.gists_per_segment, settings.placement, gist_id
        )

    rows = []
    for text, budget in zip(texts, positions):
        raw = encode_text(tok, text)
        keep = len(raw)
        while keep > 1 and len(row(raw[-keep:])) > budget:
            keep -= 1
        rows.append(row(raw[-keep:]))
    return rows


@torch.no_grad()
def evaluate(
    export: Path,
    method: str,
    records: list[dict],
    ratios,
    batch_size: int,
    max_new_tokens: int,
    budgets: dict[int, list[int]] | None = None,
) -> dict:
    """{ratio: (correct per record, cached positions per record)}. Gist variants answer from their
    caches at each ratio; ``full`` / ``no_context`` are the base with the whole context / none;
    ``truncation`` is the base given the context's end in ``budgets[ratio][i]`` positions."""
    model, tok, settings = load_pretrained(export)
    model.float()
    base = SegmentSettings(**settings["segments"])
    sparse = base.at_ratio(max(base.train_ratios or [round(base.ratio)]))
    gist_id = gist_token_id(tok)
    out = {}
    for ratio in ratios:
        correct, positions = [], []
        for i in range(0, len(records), batch_size):
            batch = records[i : i + batch_size]
            texts = [r["instruction"] for r in batch]
            if method == "truncation":  # the sparsest layout the base trained with: the most raw tokens
                rows = truncated_rows(tok, texts, sparse, gist_id, budgets[ratio][i : i + batch_size])
                cache = compress_context_ids(model, rows, gist_id, tok.pad_token_id, sparse, "pos_control")
            elif method in ("full", "no_context"):
                cache = compress_context(
                    model, tok, texts, base, "pos_control" if method == "full" else "neg_control"
                )
            else:
                cache = compress_context(model, tok, texts, base.at_ratio(ratio))
            answers = generate(model, tok, cache, [r["input"] for r in batch], max_new_tokens=max_new_tokens)
            correct += [float(a.strip() == r["output"]) for a, r in zip(answers, batch)]
            positions += cache.valid.sum(-1).tolist()
        out[ratio] = (correct, positions)
    return out


def bootstrap(matrix: np.ndarray) -> dict:
    """Mean and 95% interval (percent) of a (seeds, records) 0/1 matrix, seeds and records resampled."""
    return paired_bootstrap(100 * matrix)


END_LOGGED = 4  # the last logged answer losses (configs/tiny.yaml logs every 50 steps) a model ended at


def answer_losses(run: Path) -> list[tuple[int, float]]:
    """(step, answer loss) of each logged training step: ``train/lm_loss`` where objectives add
    terms to the loss, else ``train/loss``."""
    path = run / "metrics.csv"
    if not path.is_file():
        return []
    return [(int(row["step"]), float(loss)) for row in csv.DictReader(open(path))
            if (loss := row.get("train/lm_loss") or row.get("train/loss"))]


def end_loss(losses: list[tuple[int, float]]) -> float | None:
    """The mean of the last ``END_LOGGED`` of :func:`answer_losses` (None: nothing logged)."""
    last = [loss for _, loss in losses[-END_LOGGED:]]
    return round(float(np.mean(last)), 4) if last else None


def plateau_step(losses: list[tuple[int, float]], threshold: float, start: int = 0) -> int | None:
    """The first logged step from ``start`` on whose answer loss (of :func:`answer_losses`) is under
    ``threshold``, where the model also ended under it (:func:`end_loss`, a mean that lags: a model
    that gets under it in its last few logged steps has not left it yet): a curriculum's short
    contexts can take a model under it and the task's put it back (None: never, or back on the
    plateau at the end)."""
    end = end_loss(losses)
    if end is None or end >= threshold:
        return None
    return next((step for step, loss in losses if step >= start and loss < threshold), None)


def training_record(cell: Path, threshold: float, guessed_start: bool = True) -> dict:
    """What a finished cell's training did against the plateau ``threshold``: the step it left the
    plateau, the step it did so on the task's own contexts (its last stage: a curriculum's first
    stages are on short contexts), its end loss and the threshold; {} when nothing was logged.
    ``guessed_start=False``: no task step where the last stage's start is a guess
    (:func:`last_stage_start`)."""
    losses = answer_losses(cell / "run")
    if not losses:
        return {}
    record = {"plateau_loss": threshold, "plateau_step": plateau_step(losses, threshold)}
    start, read = last_stage_start(cell)
    if read or guessed_start:
        record["task_plateau_step"] = plateau_step(losses, threshold, start)
    return {**record, "end_loss": end_loss(losses)}


def last_stage_start(cell: Path) -> tuple[int, bool]:
    """The step a cell's last stage started from, and whether it was read rather than guessed: where
    the stage before it ended, as its export (``export-stage<i>``, the sweep's) records it; a stage
    stopped once learned (``+learn``, ``+until``) ends before its ``max_steps``, the guess when that
    export is gone. (The experiment's earlier stages are not validated, so their export is their last step,
    not a best checkpoint's.)"""
    stages = json.loads((cell / "cell.json").read_text())["stages"]  # (the sweep's record of the cell)
    if len(stages) < 2:
        return 0, True
    recorded = cell / f"stage{len(stages) - 1}.start"  # (a stage of steps records where it started)
    if recorded.is_file():
        return int(recorded.read_text()), True
    before = cell / "run" / f"export-stage{len(stages) - 2}" / "gist_config.json"
    source = json.loads(before.read_text()).get("source") if before.is_file() else None
    step = (source or {}).get("global_step")
    return (stage_end(cell, stages, len(stages) - 2), False) if step is None else (int(step), True)


def stage_end(cell: Path, stages: list[dict], i: int) -> int:
    """The step stage ``i`` of a cell trains to: its ``max_steps``, or (a stage of steps) where it
    started, as recorded, plus its steps (0 where nothing says)."""
    if stages[i].get("max_steps") is not None:
        return stages[i]["max_steps"]
    start = cell / f"stage{i}.start"
    return int(start.read_text()) + stages[i]["steps"] if start.is_file() else 0


class _StepClock(Callback):
    """Wall time of each training step after ``warmup`` steps."""

    def __init__(self, warmup: int):
        self.warmup, self.times, self._t = warmup, [], 0.0

    def on_train_batch_start(self, trainer, *args):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._t)


def objective_speed(base: Path, task: str, args, steps: int = 25, repeats: int = 3) -> list[dict]:
    """Train steps/s of fine-tuning from ``base`` with each objective (and the layout) against the
    plain loss, one process, one thread, the same batches (batch and context lengths of the task's
    training). Each row is timed ``repeats`` times, round ``i`` starting at row ``i`` (so no row is
    always timed first, after the process's own warmup): the median of a row's rounds (each the
    median step after 5), its lowest and highest, and the ratio of medians to the plain loss's."""
    from gist_lightning.data import LongRecall
    from gist_lightning.module import GistLitModule

    generators, facts = TRAINING[trained_on(task, args)]
    _, _, settings = load_pretrained(base)
    layout = {key.rsplit(".", 1)[1]: int(value) for key, value in zip(LAYOUT[::2], LAYOUT[1::2])}
    variants = [
        ("plain", None, {}),
        ("+layout", None, layout),
        ("+ae", {"autoencode_weight": 0.5}, {}),
        ("+importance", {"teacher": str(base), "importance_weight": 0.5}, {}),
        ("+kd", {"teacher": str(base), "distill_weight": 1.0}, {}),
    ]

    def step_times(objectives, more) -> list[float]:
        torch.manual_seed(0)
        segments = {**settings["segments"], "placement": "coarse", **more}
        module = GistLitModule(
            model_name_or_path=str(base),
            num_gist_tokens=segments["gists_per_segment"],
            segments=segments,
            learning_rate=1e-4,
            objectives=objectives,
        )
        data = LongRecall(
            tasks=generators,
            facts=facts,
            vocabulary=args.vocabulary,
            context_words=tuple(training_words(args)),
            train_size=256,
            validation_size=8,
            batch_size=args.train_batch_size,
            cache_dir=str(args.run_root / "cache-speed"),
            limits={"max_length": 1024},
        )
        clock = _StepClock(warmup=5)
        L.Trainer(
            max_steps=steps,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=[clock],
        ).fit(module, datamodule=data)
        return clock.times

    rounds: dict[str, list[list[float]]] = {name: [] for name, _, _ in variants}  # each round's step times
    for i in range(repeats):
        for name, objectives, more in variants[i % len(variants):] + variants[: i % len(variants)]:
            rounds[name].append(step_times(objectives, more))
    rates = {name: [1 / float(np.median(times)) for times in r] for name, r in rounds.items()}
    median = {name: round(float(np.median(r)), 3) for name, r in rates.items()}
    return [
        {
            "objective": name,
            "steps_per_second": median[name],
            "lowest": round(min(rates[name]), 3),
            "highest": round(max(rates[name]), 3),
            "repeats": repeats,
            "steps_timed": len(rounds[name][0]),
            "relative_to_plain": round(median[name] / median["plain"], 3),  # (of the figures shown)
        }
        for name, _, _ in variants
    ]


def context_tokens_of(records: list[dict], tok) -> float:
    """The mean context length of ``records``, in tokens: what a table's effective ratio (context tokens
    / every cached position, sinks and window included) divides."""
    return float(np.mean([len(encode_text(tok, r["instruction"])) for r in records]))


def result_rows(results: dict, context_tokens: dict) -> list[dict]:
    """The rows of ``results.csv`` (and ``validation.csv``): one per task, method, ratio and seed."""
    return [
        {
            "task": t,
            "method": m,
            "ratio": r,
            "seed": s,
            "exact_match": round(100 * np.mean(c), 2),
            "records": len(c),
            "cached_positions": round(float(np.mean(p)), 1),
            "effective_ratio": round(context_tokens[t] / float(np.mean(p)), 2) if np.mean(p) else "",
        }
        for (t, m, r, s), (c, p) in sorted(results.items())
    ]


def write_outputs(
    out: Path, results: dict, floors: dict, plateau: list[dict], speed: list[dict], context_tokens: dict,
    args, validation: dict | None = None, validation_tokens: dict | None = None,
) -> None:
    """results[(task, method, ratio, seed)] = (correct, positions) on the test records; ``validation``
    the same on the validation records (``validation.csv``, and which variant each task's are for),
    whose contexts hold ``validation_tokens[task]`` tokens on average (``context_tokens``: the test
    records')."""
    out.mkdir(parents=True, exist_ok=True)
    rows = result_rows(results, context_tokens)
    if validation and validation_tokens is None:
        raise ValueError("validation results need validation_tokens (their records' context tokens)")
    val_rows = result_rows({k: v for k, v in (validation or {}).items() if k[0] in validation_tokens},
                           validation_tokens) if validation else []
    for name, table in (("results.csv", rows), ("validation.csv", val_rows), ("plateau.csv", plateau),
                        ("speed.csv", speed)):
        if table:
            with open(out / name, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in table for k in r)))
                w.writeheader()
                w.writerows(table)
    seeds_of, steps_of = {}, {}
    for t, m, _, s in results:
        seeds_of.setdefault((t, m), set()).add(s)
    for p in plateau:  # the training steps of each model (a baseline's: its base's)
        if p.get("steps"):
            steps_of.setdefault((p["task"], p["model"]), set()).add(int(p["steps"]))

    def steps(t, m):
        model = "base" if is_baseline(m) else m
        got = steps_of.get((t, model)) or steps_of.get(("mixture", model))
        return "-" if not got else str(min(got)) if len(got) == 1 else f"{min(got)}-{max(got)}"

    def matrix(t, m, r):
        return np.array([results[(t, m, r, s)][0] for s in sorted(seeds_of[(t, m)])])

    lines = [
        f"# Long contexts: recipes by compression ratio ({args.records} test records per task"
        + (f", drawn from generator seed {test_seed(args)}" if test_seed(args) else "") + ")",
        "",
        "Exact match (%), mean over seeds and records with a 95% bootstrap interval (seeds and records "
        "resampled); in brackets under each ratio, the effective ratio (context tokens / every cached "
        "position); steps: the models' training steps (a baseline's: its base's). `truncation` holds as "
        "many positions as the plain gist cache at that ratio "
        "(`truncation+layout`: as the layout's). `full` and `no_context` do not depend on the ratio.",
        "",
    ]
    summary = {}
    for task in sorted({k[0] for k in results}):
        methods = sorted({k[1] for k in results if k[0] == task}, key=lambda m: (is_baseline(m), m))
        lines += [
            f"## {task} (chance floor {floors[task]:.1f}%"
            + (": the context holds one value, so copying any is right; no_context is the floor"
               if floors[task] >= 99.95 else "") + ")",
            "",
            "| method | seeds | steps | " + " | ".join(f"{r}x" for r in RATIOS)
            + " | vs truncation (4x, 8x, 16x) |",
            "|---|---|---|" + "---|" * (len(RATIOS) + 1),
        ]
        for m in methods:
            cells, diffs = [], []
            for r in RATIOS:
                if (task, m, r, min(seeds_of[(task, m)])) not in results:
                    cells.append("-")
                    continue
                b = bootstrap(matrix(task, m, r))
                summary[(task, m, r)] = b
                pos = np.mean([np.mean(results[(task, m, r, s)][1]) for s in seeds_of[(task, m)]])
                eff = f" ({context_tokens[task] / pos:.1f}x)" if pos else ""
                cells.append(f"{b['mean']:.1f} [{b['low']:.0f}, {b['high']:.0f}]{eff}")
                trunc = truncation_of(m)
                if (
                    not is_baseline(m)
                    and (task, trunc) in seeds_of  # (truncation is evaluated at every ratio)
                    and seeds_of[(task, trunc)] >= seeds_of[(task, m)]
                ):
                    paired = np.array(
                        [results[(task, m, r, s)][0] for s in sorted(seeds_of[(task, m)])]
                    ) - np.array([results[(task, trunc, r, s)][0] for s in sorted(seeds_of[(task, m)])])
                    diffs.append(format_interval(paired_bootstrap(100 * paired)))
            lines.append(
                f"| {m} | {len(seeds_of[(task, m)])} | {steps(task, m)} | "
                + " | ".join(cells)
                + " | "
                + ("; ".join(diffs) or "-")
                + " |"
            )
        lines += ["", "Per seed (exact match %):", "", "| method | ratio | per seed |", "|---|---|---|"]
        for m in methods:
            for r in RATIOS:
                if (task, m, r, min(seeds_of[(task, m)])) in results:
                    lines.append(
                        f"| {m} | {r}x | "
                        + ", ".join(
                            f"seed {s}: {100 * np.mean(results[(task, m, r, s)][0]):.1f}"
                            for s in sorted(seeds_of[(task, m)])
                        )
                        + " |"
                    )
        lines += choice_section(task, validation, args.final_seeds) if validation else []
        lines += goals_section(task, methods, results, seeds_of, plateau)
        lines.append("")
    if plateau:
        lines += [
            "## Leaving the plateau",
            "",
            "The first logged step with the answer's train loss under the threshold, where the model also "
            f"ended under it (the mean of its last {END_LOGGED} logged answer losses, a lagging mean); "
            "`never`: not under it, or back above it at the end (a curriculum's short contexts can take a "
            "model under it and the task's contexts put it back). `on the task's contexts`: the same from "
            "the first step of its last stage (a curriculum's first stages train on short contexts). `-`: "
            "recorded before end losses were (its step: the first under the threshold).",
            "",
            "| model | task | seed | threshold | step | on the task's contexts | loss at the end | of |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {p['model']} | {p['task']} | {p['seed']} | {_loss(p.get('plateau_loss'), 'g')} "
            f"| {_step(p, 'plateau_step')} | {_step(p, 'task_plateau_step')} | {_loss(p.get('end_loss'))} "
            f"| {p['steps']} |"
            for p in plateau
        ]
        lines.append("")
    if speed:
        lines += [
            "## Train steps/s of each objective and the layout (fine-tuning from a base, one thread)",
            "",
            "| objective | steps/s (median of rounds) | lowest, highest | x plain |",
            "|---|---|---|---|",
        ]
        lines += [  # (a record made before rounds: one round)
            f"| {r['objective']} | {r['steps_per_second']:.2f} | "
            f"{r.get('lowest', r['steps_per_second']):.2f}, {r.get('highest', r['steps_per_second']):.2f} "
            f"| {r['relative_to_plain']:.2f} |"
            for r in speed
        ]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    if summary:  # (nothing evaluated yet: nothing to plot)
        plot(out / "long_context.png", summary)


def choice_section(task: str, validation: dict, final_seeds: list[int]) -> list[str]:
    """The table's lines that choose ``task``'s variant on its validation records, never its test
    records: of the gist models evaluated there at every ratio on every one of the final stage's
    seeds (``--final_seeds``; a model's other seeds are left out), the one with the most right
    answers over those seeds, ratios and records (the best mean; on a tie, the first by name), with
    its paired difference to the next best; a model missing one of them is named, not a candidate.
    No lines where no gist model of the task was evaluated on them."""
    seeds_of: dict = {}
    for t, m, r, s in validation:
        if t == task and not is_baseline(m):
            seeds_of.setdefault(m, {}).setdefault(s, set()).add(r)
    if not seeds_of or not final_seeds:
        return []
    seeds = sorted(final_seeds)

    def on(m):  # (seeds, records) exact match of m on the validation records, averaged over ratios
        return np.mean([[validation[(task, m, r, s)][0] for s in seeds] for r in RATIOS], axis=0)

    def complete(m):
        return all(set(RATIOS) <= seeds_of[m].get(s, set()) for s in seeds)

    def right(m):  # (a count: exact, where float means of equal counts may differ in their last bit)
        return sum(sum(validation[(task, m, r, s)][0]) for r in RATIOS for s in seeds)

    candidates = sorted((m for m in seeds_of if complete(m)), key=lambda m: (-right(m), m))
    n = len(next(iter(validation[k][0] for k in validation if k[0] == task)))
    lines = ["", f"Chosen on validation records ({n} per seed, never the test records; exact match %, mean "
             f"over seeds {', '.join(map(str, seeds))} and records; the choice: the best mean over ratios):"]
    if candidates:
        head = " | ".join(f"{r}x" for r in RATIOS)
        lines += ["", f"| method | {head} | mean over ratios | per seed |",
                  "|---|" + "---|" * (len(RATIOS) + 2)]
    for m in candidates:
        per_ratio = [100 * np.mean([validation[(task, m, r, s)][0] for s in seeds]) for r in RATIOS]
        per_seed = ", ".join(f"seed {s}: {100 * np.mean(row):.1f}" for s, row in zip(seeds, on(m)))
        lines.append(f"| {m} | " + " | ".join(f"{v:.1f}" for v in per_ratio)
                     + f" | {100 * np.mean(on(m)):.1f} | {per_seed} |")
    fewer = sorted(set(seeds_of) - set(candidates))
    if fewer:  # (an ablation's rows: fewer seeds than the final stage's)
        shown = [f"{m} (seeds {', '.join(map(str, sorted(seeds_of[m])))})" for m in fewer]
        lines += ["", "Not candidates (not evaluated at every ratio on every one of these seeds): "
                  f"{', '.join(shown)}."]
    full = {s: validation[k][0] for s in seeds if (k := (task, "full", RATIOS[0], s)) in validation}
    if full:
        lines += ["", "full attention on these records: "
                  + ", ".join(f"seed {s} {100 * np.mean(c):.1f}" for s, c in full.items())]
    if not candidates:
        return lines + ["", "The choice: none (no gist model evaluated at every ratio on every seed)."]
    choice = (f"The choice: {candidates[0]} ({100 * np.mean(on(candidates[0])):.1f})")
    if len(candidates) > 1:
        d = paired_bootstrap(100 * (on(candidates[0]) - on(candidates[1])))
        choice += (f"; against the next, {candidates[1]}: {format_interval(d)} (paired over seeds and "
                   "records, mean over ratios)")
    return lines + ["", choice + "."]


def goals_section(task: str, methods: list[str], results: dict, seeds_of: dict,
                  plateau: list[dict]) -> list[str]:
    """The table's lines that check each seed against the goals (``FULL_GOAL``, ``GOALS``): per gist
    model and seed, its share of that seed's full model and its paired difference to truncation at
    the same cached positions (over records) at each ratio, the step it left the plateau, and what
    it misses, each named (what could not be checked too: no full model for the seed, a ratio not
    evaluated, a plateau not recorded). None where ``full`` is missing or no gist model is."""
    gist = [m for m in methods if not is_baseline(m)]
    if (task, "full") not in seeds_of or not gist:
        return []
    full_seeds = sorted(seeds_of[(task, "full")])
    full = {s: 100 * float(np.mean(next(results[(task, "full", r, s)][0] for r in RATIOS
                                         if (task, "full", r, s) in results))) for s in full_seeds}
    goals = GOALS.get(task, GOALS_ELSE)
    shown = ", ".join(f"{r}x {g:g}%" for r, g in goals.items())
    lines = ["", f"Against the goals (per seed: full attention at least {FULL_GOAL:g}%; of full at least "
             f"{shown}; above truncation with the paired interval over records above 0 at every ratio; "
             "left the plateau):",
             "", "full attention: " + ", ".join(
                 f"seed {s} {full[s]:.1f}" + ("" if full[s] >= FULL_GOAL else f" (under {FULL_GOAL:g})")
                 for s in full_seeds), "",
             "| method | seed | of full " + " / ".join(f"{r}x" for r in RATIOS)
             + " | vs truncation (" + ", ".join(f"{r}x" for r in RATIOS) + ") "
             "| left the plateau (task's contexts) | misses |",
             "|---|---|---|---|---|---|"]
    # the step it left the plateau on the task's own contexts (a curriculum's short stage can leave
    # it first), or where a record predates that field, its first step under the threshold; a model
    # trained on the mixture of tasks is recorded under "mixture"
    left: dict = {}
    mine = [p for p in plateau if p.get("task") in (task, "mixture")]
    for p in sorted(mine, key=lambda p: p["task"] == task):  # (the task's own record last: it wins)
        on_task = p.get("task_plateau_step", "")
        left[(p["model"], p["seed"])] = on_task if on_task != "" else p.get("plateau_step", "")
    for m in gist:
        trunc = truncation_of(m)
        for s in sorted(seeds_of[(task, m)]):
            shares, diffs, misses = [], [], []
            if s not in full:
                misses.append("no full model for this seed")
            elif full[s] < FULL_GOAL:
                misses.append(f"full {full[s]:.1f} < {FULL_GOAL:g}")
            for r in RATIOS:
                if (task, m, r, s) not in results:
                    shares.append("-")
                    diffs.append("-")
                    misses.append(f"{r}x not evaluated")
                    continue
                ours = results[(task, m, r, s)][0]
                if s in full and full[s]:
                    share = 100 * 100 * float(np.mean(ours)) / full[s]
                    shares.append(f"{share:.1f}%")
                    if r in goals and not share >= goals[r]:  # (two decimals: 94.97 is not 95)
                        misses.append(f"{r}x {share:.2f}% < {goals[r]:g}%")
                else:
                    shares.append("-")
                if (task, trunc, r, s) in results:
                    d = paired_bootstrap(100 * (np.asarray(ours, float)
                                                - np.asarray(results[(task, trunc, r, s)][0], float))[None])
                    diffs.append(format_interval(d))
                    if not d["low"] > 0:
                        misses.append(f"{r}x vs truncation {format_interval(d)}")
                else:
                    diffs.append("-")
                    misses.append(f"{r}x: no truncation")
            step = left.get((m, s), "")
            if step is None:  # (recorded, and never under the threshold at the end)
                misses.append("never left the plateau")
            elif step == "":
                misses.append("plateau not recorded")
            lines.append(f"| {m} | {s} | {' / '.join(shares)} | {'; '.join(diffs)} | "
                         f"{'-' if step == '' else step if step is not None else 'never'} | "
                         f"{'; '.join(misses) or 'none'} |")
    return lines


def _loss(value: float | str | None, form: str = ".3f") -> str:
    return "-" if value in (None, "") else format(value, form)


def _step(p: dict, key: str) -> str:
    """A plateau step of the table: ``-`` where the record predates that field ("")."""
    value = p.get(key, "")
    return "-" if value == "" else str(value or "never")


def plot(path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    tasks = sorted({t for t, _, _ in summary})
    fig, axes = plt.subplots(1, len(tasks), figsize=(7.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in sorted({m for t, m, _ in summary if t == task}):
            pts = [(r, summary[(task, method, r)]) for r in RATIOS if (task, method, r) in summary]
            y = [b["mean"] for _, b in pts]
            err = [[b["mean"] - b["low"] for _, b in pts], [b["high"] - b["mean"] for _, b in pts]]
            ax.errorbar([r for r, _ in pts], y, yerr=err, marker="o", capsize=3, label=method)
        ax.set(
            xscale="log",
            xticks=list(RATIOS),
            xticklabels=[f"{r}x" for r in RATIOS],
            ylim=(0, 100),
            xlabel="compression ratio",
            ylabel="exact match (%)",
            title=f"{task} (95% CI)",
        )
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # (beside: lines cross)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def differing(recorded: dict, now: dict, trained: set[str] = frozenset()) -> list[str]:
    """The fields whose values differ between two settings dicts. ``PER_TRAINING`` fields hold a value
    per training set: another value for a training that nothing recorded was trained on
    (``trained``: those that were) is no difference (the two-hop model and its bases' arguments can
    be chosen after the 3-fact ablation)."""
    out = sorted(k for k in {*recorded, *now} if recorded.get(k) != now.get(k))
    for key in PER_TRAINING:
        if key in out:
            was, new = recorded.get(key) or {}, now.get(key) or {}
            if not {t for t in {*was, *new} if was.get(t) != new.get(t)} & set(trained):
                out.remove(key)
    return out


# what the models of --run_root depend on (the settings of evaluations and reports aside): a cell
# finished under other values would otherwise be kept and reported as if trained under these
TRAINING_SETTINGS = ("context_words", "train_context_words", "train_on", "segment_tokens", "model_config",
                     "task_model_configs", "task_base_args",
                     "base_steps", "tune_steps", "scratch_steps", "train_batch_size", "base_learning_rate",
                     "tune_learning_rate", "restate", "context_weight", "tune_restate",
                     "tune_context_weight", "base_short_steps", "tune_short_steps",
                     "base_short_words", "base_short_facts", "vocabulary", "fit_args")
PER_TRAINING = ("task_model_configs", "task_base_args")  # {training: value}, or None
# what else an evaluation needs (test_records_seed: recorded where given; records made before it: 0)
EVALUATION_SETTINGS = ("records", "validation_records", "test_records_seed", "plateau_loss")


def check_run_root(run_root: Path, settings: dict) -> None:
    """Record the training settings in ``<run_root>/settings.json``, or refuse (naming the fields)
    a run folder whose models were trained under others; nothing in it is changed then."""
    path = run_root / "settings.json"
    now = json.loads(json.dumps({k: settings[k] for k in TRAINING_SETTINGS}))
    if path.is_file():
        recorded = json.loads(path.read_text())
        trained = {parsed[1] for d in run_root.iterdir() if (parsed := parse_run_name(d.name))}
        differ = differing(recorded, now, trained)
        if differ:
            raise SystemExit(
                f"{path}: its models were trained under other settings ({', '.join(differ)} differ); "
                "pass another --run_root, or the settings it records"
            )
        if recorded == now:
            return
    run_root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(now, indent=1) + "\n")  # (a task's model added: recorded)


class Evaluations:
    """What the experiment measured, kept in ``<out>/evaluations.json`` beside its outputs (and
    committed with them): every evaluation (per record: correct, cached positions), what each model's
    training did (plateau step, steps), the objectives' speed, the settings all of it was made under.
    A re-run evaluates only what is new, and a later sitting on a fresh checkout, without the run
    folders, still reports what earlier sittings measured. A file made under other settings is
    refused (naming the fields that differ), never mixed or overwritten."""

    def __init__(self, path: Path, settings: dict):
        self.path, self.settings = path, json.loads(json.dumps(settings))
        data = (
            json.loads(path.read_text())
            if path.is_file()
            else {"settings": self.settings, "evaluations": {}, "models": {}, "speed": []}
        )
        trained = {m.get("task") for m in data["models"].values()}
        differ = differing(data["settings"], self.settings, trained)
        if differ:
            raise SystemExit(
                f"{path}: measured under other settings ({', '.join(differ)} differ); pass another --out, "
                "or the settings it records"
            )
        self.done, self.models, self.speed = data["evaluations"], data["models"], data["speed"]

    def save(self) -> None:
        """Write what this process holds, merged with what another process (a report beside the
        driver, a second driver on another run folder) wrote meanwhile: under a lock, each writer
        adds its records and loses none of the other's."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".json.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.is_file():
                there = json.loads(self.path.read_text())
                differ = [k for k in differing(there["settings"], self.settings) if k not in PER_TRAINING]
                if differ:  # (another process created it meanwhile, under other settings)
                    raise SystemExit(f"{self.path}: written meanwhile under other settings "
                                     f"({', '.join(differ)} differ); nothing of this process's was added")
                self.settings.update(merged_per_training(there, self.settings, self.path))
                self.done.update({k: v for k, v in there["evaluations"].items() if k not in self.done})
                self.models.update({k: v for k, v in there["models"].items() if k not in self.models})
                if not self.speed:
                    self.speed[:] = there["speed"]
            tmp = self.path.with_suffix(f".json.tmp{os.getpid()}")
            tmp.write_text(json.dumps({"settings": self.settings, "evaluations": self.done,
                                       "models": self.models, "speed": self.speed}))
            tmp.replace(self.path)

    def get(self, key: str, compute) -> dict:
        if key not in self.done:
            self.done[key] = {str(r): v for r, v in compute().items()}
            self.save()
        return {int(r): tuple(v) for r, v in self.done[key].items()}

    def results(self, split: str = "test") -> dict:
        """{(task, method, ratio, seed): (correct, positions)} of every evaluation on ``split``."""
        out = {}
        for key, by_ratio in self.done.items():
            where, task, method, seed = key.split("/")
            if where == split:
                out.update({(task, method, int(r), int(seed[4:])): tuple(v) for r, v in by_ratio.items()})
        return out


def merged_per_training(there: dict, settings: dict, path: Path) -> dict:
    """The ``PER_TRAINING`` settings of a record that ``there`` (what ``path`` holds now) and a writer
    with ``settings`` add to, each training's once: two drivers (the 3-fact cells on one run folder,
    the two-hop base with its own model on another) each keep the other's, whichever writes last.
    One training with two values, a model of it recorded, is refused."""
    trained, out = {m.get("task") for m in there["models"].values()}, {}
    for key in PER_TRAINING:
        was, mine = there["settings"].get(key) or {}, settings.get(key) or {}
        clash = sorted(t for t in {*mine} & trained if was.get(t) != mine[t])  # (no entry: the default)
        if clash:
            raise SystemExit(f"{path}: {', '.join(clash)} was trained with another {key} entry than this "
                             "run's; pass another --out, or the recorded one")
        out[key] = {**was, **mine} or None
    return out


def experiment_settings(args, extra: list[str]) -> dict:
    """What an evaluation depends on, besides the task, method and seed: how its models were trained
    (``TRAINING_SETTINGS``) and how they are evaluated."""
    keys = [k for k in (*TRAINING_SETTINGS, *EVALUATION_SETTINGS) if k != "fit_args"]
    settings = {**{k: getattr(args, k) for k in keys}, "fit_args": list(extra)}
    if not settings["test_records_seed"]:
        del settings["test_records_seed"]  # (0 or not given: as records made before it)
    return settings


def evaluate_all(
    ev: Evaluations, task: str, seed: int, methods: list[str], records: list[dict], split: str, args
) -> dict:
    """{(method, ratio): (correct, positions)} of the gist methods and baselines on ``records`` (of
    ``task``; the models are those of its training set)."""
    out, training = {}, trained_on(task, args)
    base = export_of(args.run_root, "base", training, seed)
    for m in methods:
        res = ev.get(
            f"{split}/{task}/{m}/seed{seed}",
            lambda m=m: evaluate(
                export_of(args.run_root, m, training, seed), m, records, RATIOS, args.batch_size, 8
            ),
        )
        out.update({(m, r): v for r, v in res.items()})
    for m in ("full", "no_context"):
        res = ev.get(
            f"{split}/{task}/{m}/seed{seed}", lambda m=m: evaluate(base, m, records, (4,), args.batch_size, 8)
        )
        out.update({(m, r): res[4] for r in RATIOS})
    for trunc in ("truncation", "truncation+layout"):
        like = [m for m in methods if truncation_of(m) == trunc]
        if like:  # as many positions as that gist cache held, record by record
            budgets = {r: out[(like[0], r)][1] for r in RATIOS}
            res = ev.get(
                f"{split}/{task}/{trunc}/seed{seed}",
                lambda b=budgets: evaluate(base, "truncation", records, RATIOS, args.batch_size, 8, b),
            )
            out.update({(trunc, r): v for r, v in res.items()})
    return out


def choose_variant(ev: Evaluations, task: str, seeds: list[int], placement: str, candidates: list[str],
                   records: list[dict], args) -> tuple[str, dict]:
    """The final stage's variant: of ``candidates`` (the plain placement, each addition, their
    combination), the one with the best validation exact match over ``seeds`` and ratios (the first
    listed on a tie): the combination of the additions that helped alone is a candidate, not the
    choice, since additions need not add up. Also each one's mean (%), by method name."""
    methods = {method_name(v, placement): v for v in candidates}
    scores = {s: evaluate_all(ev, task, s, list(methods), records, "validation", args) for s in seeds}
    means = {m: round(100 * float(np.mean([mean_em(scores[s], m) for s in seeds])), 2) for m in methods}
    return methods[max(methods, key=lambda m: means[m])], means


def combination(gains: dict[str, float]) -> tuple[str, list[str]]:
    """From each row's validation gain over the plain placement (points): the combination of the
    additions that helped (``best+...``; one alone is ``base+...``; none, ``base``) and the final
    stage's candidates (the plain placement, each addition, the combination where there is one).
    A control (``CONTROLS``) is neither: it measures another row, it is not a recipe. Of the
    curricula that helped (``CURRICULA``: one at most in a recipe), the combination takes the one
    that helped most."""
    helped = [a for a, g in gains.items() if g > 0 and a not in CONTROLS]
    curricula = [a for a in helped if a[1:] in CURRICULA]  # (one at most in a recipe: the best of them)
    helped = [a for a in helped if a not in curricula or a == max(curricula, key=gains.__getitem__)]
    best = "best" + "".join(helped) if len(helped) > 1 else ("base" + helped[0] if helped else "base")
    candidates = ["base"] + ["base" + a for a in gains if a not in CONTROLS]
    return best, candidates + [best] * best.startswith("best")


def mean_em(scores: dict, method: str) -> float:
    return float(np.mean([np.mean(scores[(method, r)][0]) for r in RATIOS]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--stage",
        choices=["ablation", "final", "bases", "report"],
        default="ablation",
        help="ablation: every variant on --ablation_task; final: the chosen variant on every task; "
        "bases: only the full-attention bases of --tasks on --final_seeds (does each train?); "
        "report: write the outputs of what has been evaluated",
    )
    p.add_argument("--tasks", nargs="+", choices=list(TASKS),
                   help=f"the final stage's tasks (default: {' '.join(DEFAULT_TASKS)}; with --train_on "
                        "mixture, two-hop itself: the mixture is not trained on the chain)")
    p.add_argument(
        "--train_on",
        choices=["task", "mixture"],
        default="task",
        help="task: models trained per task; mixture: one model per seed (and variant) for every task, "
        "trained on recall and two-hop among 1-3 facts",
    )
    p.add_argument(
        "--train_context_words",
        type=int,
        nargs=2,
        default=None,
        help="training contexts' words (default: --context_words; shorter ones among them help a base "
        "leave the loss plateau)",
    )
    p.add_argument(
        "--vocabulary",
        choices=["codes", "words"],
        default="words",
        help="the facts' keys and values (data.vocabulary): codes of 2-4 digits, or words of one token",
    )
    p.add_argument("--ablation_task", default="recall3", choices=list(TASKS))
    p.add_argument("--ablation_seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument(
        "--ablation_rows",
        nargs="+",
        default=["scratch", *(a for a in ADDITIONS if a not in LATER)],
        choices=["scratch", *ADDITIONS],
        help="the ablation's optional rows (cut to fit a budget; coarse and fine from the base always run)",
    )
    p.add_argument("--final_seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--final_variant",
        type=final_variant,
        action="append",
        metavar="TRAINING=VARIANT",
        help="the final stage trains VARIANT (e.g. best+layout+ae+importance+short+until) for one task's "
        "models instead of the chosen one (choice.json; its placement); repeatable. Its rows are "
        "reported under their own name, beside the chosen variant's recorded ones",
    )
    p.add_argument("--base_steps", type=int, default=1000,
                   help="each base's training steps on the task's contexts (after the short ones)")
    p.add_argument("--tune_steps", type=int, default=1000, help="fine-tuning steps of each gist variant")
    p.add_argument("--scratch_steps", type=int, default=2000, help="steps of the from-scratch variant")
    p.add_argument("--tune_short_steps", type=int, default=None,
                   help="fine-tuning steps on short contexts (--base_short_words) before --tune_steps on the "
                   "task's, as the bases train (default: none)")
    p.add_argument(
        "--placement",
        choices=["auto", "coarse", "fine"],
        default="auto",
        help="the placement the additions go on (auto: the better one on validation records)",
    )
    p.add_argument("--records", type=int, default=200, help="test records per task")
    p.add_argument("--validation_records", type=int, default=100, help="records the choices are made on")
    p.add_argument("--test_records_seed", type=int, default=None,
                   help="generator seed of the test records (default 0, the recorded experiments'): another "
                   "draws fresh test records, to measure again, with a new --out, a recipe chosen after "
                   f"its test scores were seen (2 or more; {VALIDATION_SEED} draws the validation records)")
    p.add_argument(
        "--context_words",
        type=int,
        nargs=2,
        default=[70, 120],
        help="contexts' words (low high): ~130-230 tokens, 8-14 segments of 16 tokens",
    )
    p.add_argument(
        "--model_config",
        type=json.loads,
        default=MODEL,
        help="the bases' (and scratch's) HF config fields, JSON (default: ~0.9M parameters)",
    )
    p.add_argument(
        "--task_model_config",
        type=per_training,
        action="append",
        metavar="TRAINING=JSON",
        help="another model for one task's models (a task, or mixture), e.g. two_hop='{...}'; "
        "repeatable; the others keep --model_config",
    )
    p.add_argument(
        "--task_base_args",
        type=functools.partial(per_training, kind=list),
        action="append",
        metavar="TRAINING=JSON",
        help="fit arguments for one task's bases alone, a JSON list, e.g. "
        "two_hop='[\"--data.init_args.hop_questions\", \"0.5\"]'; repeatable",
    )
    p.add_argument(
        "--segment_tokens",
        type=int,
        default=16,
        help="raw tokens per segment (a multiple of 16: 4x, 8x and 16x keep segment_tokens/4, /8, /16 gists)",
    )
    p.add_argument(
        "--plateau_loss",
        type=float,
        default=None,
        help="the answer loss a model leaves the plateau under (default: 0.5 for codes; 0.25 for words, "
        "whose one-token answers sit at ~0.55 when a model picks one of 3 facts' values at random; "
        "two_hop_chain's models: half of it with words, a tenth with codes)",
    )
    p.add_argument("--speed", action="store_true", help="also time each objective's training steps")
    p.add_argument("--speed_repeats", type=int, default=3,
                   help="--speed's rounds: every row timed in each, each round starting at another row")
    p.add_argument("--run_root", type=Path, default=ROOT / "runs" / "long-context")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "long-context-recipes",
                   help="where the outputs and evaluations.json go (commit them: a later sitting on a fresh "
                   "machine trains only what it does not hold)")
    p.add_argument("--batch_size", type=int, default=50, help="records per evaluation batch")
    p.add_argument("--train_batch_size", type=int, default=32, help="records per training batch")
    p.add_argument("--base_learning_rate", type=float, default=3e-4,
                   help="the bases' learning rate (constant after a 5%% warmup)")
    p.add_argument("--tune_learning_rate", type=float, default=3e-4,
                   help="the peak learning rate of fine-tuning from a base (configs/tiny.yaml's schedule)")
    p.add_argument("--restate", type=float, default=1.0,
                   help="the bases' probability that a training fact is stated twice (data.restate)")
    p.add_argument("--context_weight", type=float, default=20.0,
                   help="the bases' weight of the context's own next-token loss (objectives.context_weight)")
    p.add_argument("--tune_restate", type=float, default=0.0, help="--restate of the gist models")
    p.add_argument("--tune_context_weight", type=float, default=0.0,
                   help="--context_weight of the gist models")
    p.add_argument("--base_short_steps", type=int, default=4000,
                   help="the bases' first steps, on short contexts (--base_short_words); 0: none")
    p.add_argument("--base_short_words", type=int, nargs=2, default=[6, 12],
                   help="the short contexts' words (low high)")
    p.add_argument("--base_short_facts", type=int, default=None,
                   help="facts per short context (default: the task's)")
    p.add_argument(
        "--check_args",
        action="store_true",
        help="check every fit's arguments, list the cells of the stage and their state; run nothing",
    )
    add_launcher_arguments(p)  # the trainings run as sweeps: --cells_at_once, --launcher slurm, ...
    p.set_defaults(cells_at_once=2, threads_per_cell=1)
    args, extra = p.parse_known_args(argv)  # unknown arguments go to every fit
    args.context_words = list(args.context_words)
    for flag, given in (("--task_model_config", args.task_model_config),
                        ("--task_base_args", args.task_base_args), ("--final_variant", args.final_variant)):
        twice = sorted({t for t, _ in given or () if [u for u, _ in given].count(t) > 1})
        if twice:  # (a dict would keep the last silently)
            p.error(f"{flag} names {', '.join(twice)} more than once; give each training once")
    if args.tasks is None:
        args.tasks = [SHARES_RECORDS.get(t, t) if args.train_on == "mixture" else t for t in DEFAULT_TASKS]
    unanswered = [t for t in args.tasks if not answers(trained_on(t, args), t)]
    if unanswered:
        p.error(f"--train_on {args.train_on} trains no model that answers {', '.join(unanswered)} "
                f"(the mixture: {', '.join(TRAINING['mixture'][0])})")
    if args.final_variant and args.stage != "final":
        p.error(f"--final_variant names the final stage's models; --stage is {args.stage}")
    trained = trainings_of(args)
    untrained = sorted({t for t, _ in args.final_variant or ()} - set(trained))
    if untrained:
        p.error(f"--final_variant names {', '.join(untrained)}, which --tasks and --train_on do not train "
                f"(they train {', '.join(trained)})")
    args.task_model_configs = dict(args.task_model_config or ()) or None  # None: recorded as before
    args.task_base_args = dict(args.task_base_args or ()) or None
    if args.plateau_loss is None:
        args.plateau_loss = PLATEAU_LOSS[args.vocabulary]
    if args.segment_tokens < 16 or args.segment_tokens % 16:
        p.error(f"--segment_tokens must be a multiple of 16 (16x keeps segment_tokens/16 gists); got "
                f"{args.segment_tokens}")
    if args.speed_repeats < 1:
        p.error(f"--speed_repeats must be >= 1 round; got {args.speed_repeats}")
    if args.test_records_seed and args.test_records_seed <= VALIDATION_SEED:
        p.error(f"--test_records_seed must be 0 (the recorded test records) or above {VALIDATION_SEED} "
                f"(fresh ones); got {args.test_records_seed} ({VALIDATION_SEED} draws the validation "
                "records, and a negative seed records another split uses)")
    torch.set_num_threads(1)
    settings = experiment_settings(args, extra)  # (a check reads results, and writes none)
    try:
        ev = Evaluations(args.out / "evaluations.json", settings)
    except SystemExit as e:
        if not args.check_args:
            raise
        ev = None  # a check lists the cells all the same, as if nothing were recorded
        print(f"{e} (listed as if nothing were recorded)", flush=True)
    if not args.check_args:
        check_run_root(args.run_root, settings)
    choice_path = args.out / "choice.json"
    task, seeds = args.ablation_task, args.ablation_seeds
    training = trained_on(task, args)
    if args.stage == "ablation":
        first = [base_cell(training, s, args) for s in seeds] + [
            gist_cell(v, pl, training, s, args)
            for s in seeds
            for v, pl in (("scratch", "coarse"), ("base", "coarse"), ("base", "fine"))
            if v != "scratch" or "scratch" in args.ablation_rows
        ]
        run_or_list(first, args, extra, ev)
        if args.check_args:
            placement = "coarse" if args.placement == "auto" else args.placement
        else:
            val = records_of(task, args.validation_records, VALIDATION_SEED, tuple(args.context_words),
                             args.vocabulary)
            scores = {
                s: evaluate_all(ev, task, s, ["base-coarse", "base-fine"], val, "validation", args)
                for s in seeds
            }
            means = {  # exact match %, over seeds and ratios
                pl: round(100 * float(np.mean([mean_em(scores[s], f"base-{pl}") for s in seeds])), 2)
                for pl in ("coarse", "fine")
            }
            placement = max(means, key=means.get) if args.placement == "auto" else args.placement
            print(f"placement: {placement} (validation exact match over ratios: {means})", flush=True)
        bases = [base_cell(training, s, args) for s in seeds]  # finished: kept, as what the rest needs
        rows = [a for a in ADDITIONS if a in args.ablation_rows]
        additions = [gist_cell("base" + a, placement, training, s, args) for s in seeds for a in rows]
        run_or_list(bases + additions, args, extra, ev)
        if args.check_args:
            return 0
        plain = f"base-{placement}"
        val_scores = {
            s: evaluate_all(ev, task, s, [plain] + [plain + a for a in rows], val, "validation", args)
            for s in seeds
        }
        gains = {  # percentage points of exact match over the plain placement, over seeds and ratios
            a: round(100 * float(np.mean([mean_em(val_scores[s], plain + a) - mean_em(val_scores[s], plain)
                                          for s in seeds])), 2)
            for a in rows
        }
        best, candidates = combination(gains)
        print(
            f"validation gains over {plain} (points): {gains}; "
            f"their combination: {method_name(best, placement)}",
            flush=True,
        )
        if best.startswith("best"):
            best_cells = [gist_cell(best, placement, training, s, args) for s in seeds]
            run_or_list(bases + best_cells, args, extra, ev)
        variant, validation = choose_variant(ev, task, seeds, placement, candidates, val, args)
        print(f"validation exact match over seeds and ratios: {validation}; the final stage takes "
              f"{method_name(variant, placement)}", flush=True)
        choice_path.parent.mkdir(parents=True, exist_ok=True)
        choice_path.write_text(
            json.dumps({"placement": placement, "variant": variant, "gains": gains, "combination": best,
                        "validation": validation}, indent=1)
        )
    elif args.stage == "final":
        if not choice_path.is_file():
            raise SystemExit(f"{choice_path}: no choice yet; run --stage ablation first")
        choice = json.loads(choice_path.read_text())
        trainings = trainings_of(args)
        variants = dict(args.final_variant or ())
        cells = [  # each base beside its gist model: a sitting cut short leaves whole pairs behind it
            cell
            for t in trainings
            for s in args.final_seeds
            for cell in (base_cell(t, s, args),
                         gist_cell(variants.get(t, choice["variant"]), choice["placement"], t, s, args))
        ]
        run_or_list(cells, args, extra, ev)
        if args.check_args:
            return 0
    elif args.stage == "bases":
        trainings = trainings_of(args)
        run_or_list([base_cell(t, s, args) for t in trainings for s in args.final_seeds], args, extra, ev)
        if args.check_args:
            return 0
    report(ev, args)
    return 0


RUN_NAME = re.compile(r"^(?P<model>.+)-(?P<training>" + "|".join(TRAINING) + r")-seed(?P<seed>\d+)$")


def parse_run_name(name: str) -> tuple[str, str, int] | None:
    """(model, training, seed) of a cell's name (:func:`run_name`), None for another folder's."""
    m = RUN_NAME.match(name)
    return (m["model"], m["training"], int(m["seed"])) if m else None


def weights_digest(export: Path) -> str:
    """sha256 of an export's weights: every tensor's name, dtype, shape and bytes, in name order (the
    same model trained again gives the same digest only when it is the same model, bit for bit)."""
    from safetensors.torch import load_file

    paths = sorted(export.glob("*.safetensors"))
    if not paths:
        raise SystemExit(f"{export}: no *.safetensors weights to take the digest of")
    h = hashlib.sha256()
    for path in paths:
        tensors = load_file(path)
        for key in sorted(tensors):
            t = tensors[key].contiguous()
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def trained_on_cpus(cell: Path) -> list[str]:
    """The CPU types a cell's attempts trained on (its ``attempts.json``; attempts recorded before
    cells named their CPU are left out)."""
    return sorted({a["cpu"] for a in recorded_attempts(cell) if a.get("cpu")})


def evaluate_splits(ev: Evaluations, args, model: str, training: str, seed: int) -> None:
    """A model's evaluations (a base's: its baselines) on each task it answers, on the test records
    and on the validation records (what a choice between variants is made on: the ablation's, and
    the final stage's where a task has several variants)."""
    methods = [] if model == "base" else [model]
    for task in TASKS:
        if trained_on(task, args) != training or not answers(training, task):
            continue
        for split, of, n in (("test", test_seed(args), args.records),
                             ("validation", VALIDATION_SEED, args.validation_records)):
            records = records_of(task, n, of, tuple(args.context_words), args.vocabulary)
            evaluate_all(ev, task, seed, methods, records, split, args)


def unvalidated(ev: Evaluations, args, name: str) -> list[str]:
    """The tasks a recorded gist model answers that it has no validation evaluation on (recorded
    before every model was evaluated on validation records)."""
    model, training, seed = parse_run_name(name)
    return [t for t in TASKS if model != "base" and trained_on(t, args) == training and answers(training, t)
            and f"validation/{t}/{model}/seed{seed}" not in ev.done]


def holds(export: Path, digest: str | None) -> bool:
    """Whether ``export`` holds the weights whose digest (:func:`weights_digest`) is ``digest``."""
    return bool(digest) and any(export.glob("*.safetensors")) and weights_digest(export) == digest


def validate_recorded(ev: Evaluations, args, name: str) -> None:
    """Give a recorded gist model the evaluations it lacks (the validation records', and any test
    one), where its folder and its base's still hold the weights the record names (else it says why
    not, and changes nothing)."""
    model, training, seed = parse_run_name(name)
    entry, base = ev.models[name], run_name("base", training, seed)
    base_digest = entry.get("base_sha256") or ev.models.get(base, {}).get("weights_sha256")
    for what, export, recorded in (
        ("its", export_of(args.run_root, model, training, seed), entry.get("weights_sha256")),
        ("its base's", export_of(args.run_root, "base", training, seed), base_digest),
    ):
        if not holds(export, recorded):
            print(f"{name}: not evaluated on validation records: {what} folder does not hold the weights "
                  "the record names", flush=True)
            return
    evaluate_splits(ev, args, model, training, seed)
    print(f"{name}: evaluated on validation records", flush=True)


def record_model(ev: Evaluations, args, name: str) -> None:
    """Evaluate a finished model as soon as it is (its folder may not outlive the sitting): on each
    task it answers, the test and validation records (:func:`evaluate_splits`), with the baselines
    its evaluation needs (its base's full, no-context and truncation at its cache's
    size); then record what its training did and the digest of its weights (and a gist model's, of
    its base's). A base trained again (its folder lost with an earlier machine) must come out the
    same, bit for bit, as the base the recorded models were fine-tuned from; else this stops,
    naming both digests, and nothing recorded is changed."""
    model, training, seed = parse_run_name(name)
    run = args.run_root / name / "run"
    digest = weights_digest(run / "export")
    recorded = ev.models.get(name, {}).get("weights_sha256")
    cpus = trained_on_cpus(args.run_root / name)
    if recorded and recorded != digest:
        now = " and ".join(cpus) or f"a CPU its attempts do not name (this machine: {cpu_model()})"
        was = " and ".join(ev.models[name].get("cpus") or []) or "a CPU the record does not name"
        raise SystemExit(
            f"{name}: its weights now (sha256 {digest[:16]}) differ from those {ev.path} records "
            f"({recorded[:16]}), which its evaluations (and the models fine-tuned from it) were made "
            "with; train it under the recorded settings on the recorded machine (the same CPU type: "
            f"floating point differs between CPUs; it trained on {now}, the record's on {was}), or "
            "pass another --out"
        )
    base = run_name("base", training, seed)
    base_digest = None
    if model != "base":
        base_digest = ev.models.get(base, {}).get("weights_sha256") or weights_digest(
            export_of(args.run_root, "base", training, seed)
        )
    evaluate_splits(ev, args, model, training, seed)
    done = json.loads((run / "done.json").read_text())
    spec = json.loads((args.run_root / name / "cell.json").read_text())  # (the sweep's record of the cell)
    threshold = plateau_loss(training, args)
    ev.models[name] = {
        "model": model,
        "task": training,
        "seed": seed,
        "plateau_loss": threshold,  # (the threshold: PLATEAU_SCALE may change)
        "plateau_step": None,  # (and, from its metrics.csv, the steps and end loss)
        **training_record(args.run_root / name, threshold),
        "steps": stage_end(args.run_root / name, spec["stages"], len(spec["stages"]) - 1),  # (ran to its end)
        "minutes": done.get("minutes"),
        "weights_sha256": digest,
        **({"base_sha256": base_digest} if base_digest else {}),
        **({"cpus": cpus} if cpus else {}),  # (what it trained on: a retrain is bit for bit on the same)
        "evaluated": True,
    }
    ev.save()
    print(f"{name}: evaluated; recorded in {ev.path}", flush=True)


def report(ev: Evaluations, args) -> None:
    """Evaluate every finished model of ``--run_root`` that ``ev`` does not hold yet (what earlier
    sittings evaluated is kept in it) and write the outputs of everything ``ev`` holds."""
    from gist_lightning.tokens import load_tokenizer

    floors, context_tokens, validation_tokens = {}, {}, {}
    tok = load_tokenizer("suite")  # the experiment's tokenizer (configs/tiny.yaml): context lengths
    words = tuple(args.context_words)
    for task in TASKS:
        records = records_of(task, args.records, test_seed(args), words, args.vocabulary)
        floors[task] = chance_floor(records, args.vocabulary)
        context_tokens[task] = context_tokens_of(records, tok)
        val = records_of(task, args.validation_records, VALIDATION_SEED, words, args.vocabulary)
        validation_tokens[task] = context_tokens_of(val, tok)
    finished = [d.parent.parent.name for d in args.run_root.glob("*/run/done.json")]
    for name in sorted(finished, key=lambda n: (not n.startswith("base-"), n)):  # bases first
        if parse_run_name(name) and not ev.models.get(name, {}).get("evaluated"):
            record_model(ev, args, name)
        elif parse_run_name(name):  # recorded earlier, perhaps before a field was, or by older code
            if unvalidated(ev, args, name):
                validate_recorded(ev, args, name)
            entry, cell = ev.models[name], args.run_root / name
            # (a task step guessed from max_steps never replaces a recorded one)
            found = training_record(cell, entry.get("plateau_loss") or plateau_loss(entry["task"], args),
                                    guessed_start="task_plateau_step" not in entry)
            if not found or all(entry.get(k) == v for k, v in found.items()):  # (no metrics.csv: kept)
                continue
            recorded, export = entry.get("weights_sha256"), cell / "run" / "export"
            if recorded and not holds(export, recorded):
                print(f"{name}: its folder holds other weights than the record's; the record is kept",
                      flush=True)
                continue
            entry.update(found)
            print(f"{name}: plateau steps and end loss from its metrics.csv", flush=True)
    ev.save()
    if args.speed:
        base = export_of(args.run_root, "base", trained_on(args.ablation_task, args), args.ablation_seeds[0])
        ev.speed[:] = objective_speed(base, args.ablation_task, args, repeats=args.speed_repeats)
        ev.save()
    fields = ("model", "task", "seed", "plateau_loss", "plateau_step", "task_plateau_step", "end_loss",
              "steps", "minutes")
    known = {k: m for k, m in ev.models.items() if m.get("task") in TRAINING}
    plateau = [{f: known[k].get(f, "") for f in fields} for k in sorted(known)]  # "": not recorded
    for p in plateau:  # a model recorded before thresholds were: today's (as when it was, unless changed)
        if p["plateau_loss"] in (None, ""):
            p["plateau_loss"] = plateau_loss(p["task"], args)
    results = {k: v for k, v in ev.results("test").items() if k[0] in TASKS}
    unknown = sorted({*(str(m.get("task")) for m in ev.models.values() if m.get("task") not in TRAINING),
                      *(k[0] for k in ev.results("test") if k[0] not in TASKS)})
    if unknown:  # recorded by a newer version of this script (another driver): left in the json
        print(f"{ev.path}: left out of the report, tasks this version does not know: {unknown}", flush=True)
    validation = {k: v for k, v in ev.results("validation").items() if k[0] in TASKS}
    write_outputs(args.out, results, floors, plateau, ev.speed, context_tokens, args, validation,
                  validation_tokens)
    print(f"wrote {args.out}/results.csv, table.md, long_context.png")


if __name__ == "__main__":
    raise SystemExit(main())
