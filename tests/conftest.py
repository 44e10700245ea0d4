"""Shared test helpers, as fixtures: tiny tokenizers and models of every supported family built
from configs (no download), tiny run configs, a model trained until its answers depend on the
instruction and the input (made once per test session), the experiments' scripts and a one-node SLURM."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, PreTrainedTokenizerFast

from gist_lightning import add_gist_token, compress, generate
from gist_lightning.families import FAMILIES, model_class

ROOT = Path(__file__).resolve().parents[1]

CORPUS = [
    "Instruction: reverse the list of words",
    "Input: apple banana cherry dog egg fig grape",
    "Output: the quick brown fox jumps over the lazy dog",
    "Write a haiku about autumn leaves and rain. Translate this sentence into French.",
    "count the words, sort them, put cat first, remove every dog < > / GIST PAD",
] * 4

# One tiny random config per supported family (and variants worth their own row), built without
# download: (model_type, config fields, tokenizer framing). Adding a family to the registry means
# adding its line here; test_families checks that every registry entry has one. Sliding windows
# are 8 positions, shorter than the test instructions.
_SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
_WINDOW = dict(sliding_window=8)
_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
           relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0)
TINY_FAMILIES = {
    "llama": ("llama", _SMALL, "llama"),
    "llama3-rope": ("llama", dict(_SMALL, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}), "llama"),
    "mistral": ("mistral", dict(_SMALL, num_key_value_heads=1, **_WINDOW), "llama"),
    "mixtral": ("mixtral", dict(_SMALL, num_local_experts=4, num_experts_per_tok=2, **_WINDOW), "llama"),
    "qwen2": ("qwen2",
              dict(_SMALL, num_hidden_layers=3, use_sliding_window=True, max_window_layers=1, **_WINDOW),
              "neox"),
    "qwen3": ("qwen3",
              dict(_SMALL, num_hidden_layers=3, head_dim=8, use_sliding_window=True, max_window_layers=1,
                            **_WINDOW), "neox"),
    "qwen3-no-sliding": ("qwen3", dict(_SMALL, head_dim=8), "neox"),  # layer_types, all full attention
    "qwen3_moe": ("qwen3_moe",
                  dict(_SMALL, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                    use_sliding_window=True, **_WINDOW), "neox"),
    "gemma2": ("gemma2", dict(_SMALL, num_hidden_layers=3, head_dim=8, **_WINDOW), "llama"),
    "gemma3_text": ("gemma3_text", dict(_SMALL, num_hidden_layers=3, head_dim=8, **_WINDOW,
                                        layer_types=["sliding_attention", "full_attention",
                                                     "sliding_attention"]), "llama"),
    "phi3": ("phi3", dict(_SMALL, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                   "partial_rotary_factor": 0.5}, **_WINDOW), "llama"),
    "olmo2": ("olmo2", _SMALL, "neox"),
    "smollm3": ("smollm3", dict(_SMALL, num_hidden_layers=4, use_sliding_window=True, **_WINDOW), "llama"),
    "granite": ("granite",
                dict(_SMALL, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3,
                                logits_scaling=2.0), "llama"),
    "gpt_neox": ("gpt_neox", dict(_SMALL, rotary_pct=0.25), "neox"),
    "t5": ("t5", _T5, "t5"),
    "mt5": ("mt5", _T5, "t5"),
    "umt5": ("umt5", _T5, "t5"),
}
ALL_FAMILIES = list(TINY_FAMILIES)

# run-sized models for the training tests (the HF config fields of model.model_config)
TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 768}
TINY_T5 = {"model_type": "t5", "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4}


def build_tokenizer(style: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer framed like LLaMA (BOS before), T5 (EOS after) or GPT-NeoX (none),
    without a pad token (add_gist_token must supply one)."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    if style == "llama":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    elif style == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_hf_config(family: str, vocab_size: int, attn: str = "sdpa", **overrides):
    """A tiny random config of ``family`` (a key of ``TINY_FAMILIES``)."""
    model_type, fields, _ = TINY_FAMILIES[family]
    # the checkpoints' special ids lie outside a tiny vocabulary; add_gist_token sets the pad id
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab_size, max_position_embeddings=256,
                               pad_token_id=None, bos_token_id=None, eos_token_id=None, **fields)
    cfg._attn_implementation = attn
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _make_pair(family: str, attn: str | None = None, seed: int = 0, **overrides):
    attn = attn or FAMILIES[TINY_FAMILIES[family][0]].preferred_attention
    tokenizer = build_tokenizer(TINY_FAMILIES[family][2])
    torch.manual_seed(seed)
    cfg = tiny_hf_config(family, len(tokenizer), attn, **overrides)
    if cfg.is_encoder_decoder:
        cfg.pad_token_id = tokenizer.eos_token_id  # replaced by add_gist_token's new pad id
        cfg.eos_token_id = tokenizer.eos_token_id
    model = model_class(cfg).from_config(cfg, attn_implementation=attn)
    gist_id = add_gist_token(tokenizer, model)
    if cfg.is_encoder_decoder:
        model.config.decoder_start_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer, gist_id


@pytest.fixture
def make_pair():
    """``make_pair(family, attn=None, seed=0, **config_overrides) -> (model, tokenizer, gist_id)``:
    fresh random weights of a ``TINY_FAMILIES`` entry (attention: ``attn``, or sdpa where the family
    takes it), gist token added, eval mode."""
    return _make_pair


@pytest.fixture
def require_attention():
    """``require_attention(family, attn)``: skip unless the registry accepts ``attn`` for the family
    (the refusal itself is tested in test_families)."""

    def check(family: str, attn: str) -> None:
        model_type = TINY_FAMILIES[family][0]
        if attn not in FAMILIES[model_type].attention:
            pytest.skip(f"{model_type} refuses {attn}: {FAMILIES[model_type].attention_why}")

    return check


@pytest.fixture
def make_tokenizer():
    """``make_tokenizer(style)``: a tiny tokenizer framed like "llama", "t5" or "neox", without a pad
    token."""
    return build_tokenizer


@pytest.fixture
def tiny_models() -> dict[str, dict]:
    """Run-sized model configs (``model.model_config``) by name: ``llama`` and ``t5``."""
    return {"llama": dict(TINY_LLAMA), "t5": dict(TINY_T5)}


@pytest.fixture
def make_hf_config():
    """``make_hf_config(family, vocab_size, attn="sdpa", **overrides)``: a tiny random HF config."""
    return tiny_hf_config


@pytest.fixture(params=ALL_FAMILIES)
def family(request):
    """Every entry of ``TINY_FAMILIES``: each supported family, and variants."""
    return request.param


@pytest.fixture
def tiny_family_table():
    return TINY_FAMILIES


def _run_config(folder: Path, model_config: dict | None = None, **trainer) -> Path:
    """A tiny ``gist-lightning fit`` config in ``folder``: the embedded suite at 256 training records,
    ``TINY_LLAMA`` unless ``model_config``, 12 steps validated at 6 and 12 unless ``trainer`` says
    otherwise."""
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 12, "val_check_interval": 6,
                    "check_val_every_n_epoch": None, "num_sanity_val_steps": 0, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(folder / "runs"),
                    "logger": {"class_path": "gist_lightning.loggers.CSVLogger",
                               "init_args": {"save_dir": str(folder / "runs"), "name": "t"}}, **trainer},
        "model": {"model_config": model_config or TINY_LLAMA, "learning_rate": 1e-2, "max_new_tokens": 8},
        "data": {"class_path": "gist_lightning.data.EmbeddedSuite",
                 "init_args": {"cache_dir": str(folder / "cache"), "train_size": 256, "validation_size": 16,
                               "batch_size": 16, "eval_batch_size": 8, "max_validation_records": 16}},
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def run_config(tmp_path):
    """``run_config(model_config=None, **trainer) -> Path`` of a tiny fit config in ``tmp_path``."""
    return lambda model_config=None, **trainer: _run_config(tmp_path, model_config, **trainer)


def ranks_errors(stderr: str, limit: int = 3000) -> str:
    """What a failed multi-process run printed, for an assertion message: the first traceback (the
    rank that failed first; the others' tracebacks only say that a peer closed its connection)
    and the end of the output."""
    first = stderr.find("Traceback")
    if first < 0 or first >= len(stderr) - 2 * limit:  # (within the end: the end alone holds it)
        return stderr[max(first, 0):][-2 * limit:]
    return f"{stderr[first:first + limit]}\n[...]\n{stderr[-limit:]}"


def metrics_rows(run: Path) -> list[dict]:
    """The rows of a run folder's metrics.csv, each without its empty cells."""
    import csv

    with open(run / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if v} for row in csv.DictReader(f)]


def assert_same_outputs(got: Path, want: Path) -> None:
    """Two run folders hold the same prediction files, each once with the same content, and the same
    metrics rows, none missing and none twice (a killed and resumed run against the uninterrupted one)."""
    names = sorted(p.name for p in (want / "predictions").iterdir())
    assert sorted(p.name for p in (got / "predictions").iterdir()) == names
    for name in names:
        assert (got / "predictions" / name).read_text() == (want / "predictions" / name).read_text(), name
    assert metrics_rows(got) == metrics_rows(want)


# -- a model whose answers depend on the instruction and on the input -------------------------------
# Tests that compare two ways of computing the same metric (1 vs 2 processes, a checkpoint vs its
# export) need such a model: an untrained one answers every record alike, so the two ways agree
# whatever instruction either of them used.
TRAINED_STEPS = 1200
PROBE_INSTRUCTIONS = ["Repeat the list.", "Reverse the list.", "What is the last word?", "Remove every cat."]
PROBE_INPUTS = ["dog cat owl", "apple pear plum lemon", "cat red"]


def _random_export(folder: Path, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from gist_lightning.export import export_pretrained
    from gist_lightning.tokens import load_tokenizer

    tok = load_tokenizer("suite")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok) + 2, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=512))
    add_gist_token(tok, model)
    return export_pretrained(model, tok, folder / "export", num_gist_tokens=1, condition="gist")


@pytest.fixture(scope="session")
def random_export(tmp_path_factory) -> Path:
    """An exported gist model (tiny LLaMA, k=1) with random weights and the suite tokenizer: for tests
    where nothing depends on what the model answers (its answers run to max_tokens, no EOS)."""
    return _random_export(tmp_path_factory.mktemp("random"), seed=0)


@pytest.fixture(scope="session")
def other_random_export(tmp_path_factory) -> Path:
    """Another model like :func:`random_export` (other random weights): a second model on one store."""
    return _random_export(tmp_path_factory.mktemp("random-other"), seed=1)


def _shared_folder(tmp_path_factory, name: str):
    """(folder, lock): a folder every pytest-xdist worker of this run shares (under the run's base
    temp), built under the lock; in one process, a folder of its own and no lock."""
    from contextlib import nullcontext

    from filelock import FileLock

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return tmp_path_factory.mktemp(name), nullcontext()
    root = tmp_path_factory.getbasetemp().parent  # this run's, shared by its workers
    return root / name, FileLock(str(root / f"{name}.lock"))


def _train_export(folder: Path) -> Path:
    from gist_lightning.data import EmbeddedSuite
    from gist_lightning.export import export_pretrained
    from gist_lightning.module import GistLitModule

    L.seed_everything(0)
    module = GistLitModule(model_config=dict(TINY_LLAMA, hidden_size=64, intermediate_size=128),
                           learning_rate=3e-3, warmup_ratio=0.05)
    data = EmbeddedSuite(cache_dir=str(folder / "cache"), train_size=8000, validation_size=40, batch_size=32)
    trainer = L.Trainer(accelerator="cpu", max_steps=TRAINED_STEPS, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(folder))
    trainer.fit(module, datamodule=data)
    return export_pretrained(module.model, module.tokenizer, folder / "export", num_gist_tokens=1,
                             condition="gist")


@pytest.fixture(scope="session")
def trained_export(tmp_path_factory) -> Path:
    """An exported gist model (tiny LLaMA, k=1) trained on the embedded suite for 1200 steps
    (about a minute on 2 cores; once per test run: xdist workers share it), checked here to answer
    by instruction and input: for every probe input, at least two different answers over four
    instructions, and for every instruction a different answer to each input."""
    from gist_lightning.export import load_pretrained

    folder, lock = _shared_folder(tmp_path_factory, "trained")
    export = folder / "export"
    with lock:
        if not (folder / "trained.done").is_file():
            _train_export(folder)
            (folder / "trained.done").write_text("")

    model, tok, _ = load_pretrained(export)
    cache = compress(model, tok, PROBE_INSTRUCTIONS, 1)
    answers = {(t, x): generate(model, tok, cache.select([i]), [x], max_new_tokens=8)[0]
               for i, t in enumerate(PROBE_INSTRUCTIONS) for x in PROBE_INPUTS}
    by_instruction = {x: {answers[t, x] for t in PROBE_INSTRUCTIONS} for x in PROBE_INPUTS}
    by_input = {t: {answers[t, x] for x in PROBE_INPUTS} for t in PROBE_INSTRUCTIONS}
    assert all(len(v) >= 2 for v in by_instruction.values()), f"answers ignore the instruction: {answers}"
    assert all(len(v) == len(PROBE_INPUTS) for v in by_input.values()), f"answers ignore the input: {answers}"
    return export


@pytest.fixture
def load_experiment():
    """``load_experiment("sweep")``: the module ``experiments/sweep.py``, imported from its file."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"experiments_{name}",
                                                      ROOT / "experiments" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


# -- a real scheduler: the one-node SLURM of experiments/slurm_local.sh ------------------------------
SLURM_LOCAL = ROOT / "experiments" / "slurm_local.sh"


@dataclass(frozen=True)
class SlurmCluster:
    env: dict[str, str]  # what a client needs (SLURM_CONF), to add to the environment of sbatch & co.
    partition: str  # the default partition of the cluster; its one node has the machine's CPUs


@pytest.fixture(scope="session")
def slurm_cluster():
    """A one-node SLURM on this machine (``experiments/slurm_local.sh start``: Debian's slurm-wlm and
    munge, installed where missing, on their own config, munged and ports): reused where it already
    runs, stopped at the end of the session where this session started it. Skipped with the reason
    where it cannot be installed or started (no root, apt fails, the node is not up within 60 s);
    with ``GIST_REQUIRE_SLURM=1`` (CI) that fails instead."""

    def unavailable(reason: str):
        if os.environ.get("GIST_REQUIRE_SLURM") == "1":
            pytest.fail(f"GIST_REQUIRE_SLURM=1 and {reason}")
        pytest.skip(reason)

    def script(command: str) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(["bash", str(SLURM_LOCAL), command], capture_output=True, text=True,
                                  timeout=900, env=dict(os.environ, GIST_SLURM_WAIT_S="60"))
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess([], 1, "", f"slurm_local.sh {command} ran past 900 s")

    was_running = script("status").returncode == 0
    started = script("start")
    if started.returncode != 0:
        if not was_running:
            script("stop")  # what it started before it gave up
        unavailable(f"no SLURM here: {(started.stderr.strip().splitlines() or ['start failed'])[-1]}")
    exported = dict(line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines()
                    if line.startswith("export "))
    yield SlurmCluster(env={"SLURM_CONF": exported["SLURM_CONF"]}, partition=exported["GIST_SLURM_PARTITION"])
    if not was_running:
        script("stop")


# -- the order files run in under pytest-xdist ------------------------------------------------------
# `make test-all` gives whole files to two workers, in collection order: the longest files first (as
# measured on 2 cores, with compile caches cold as in CI: the flex and compiled-decoding files take
# minutes of compiling there and seconds on a warm machine), so that the run does not end with one
# worker alone on a long file while the other idles. A serial run keeps pytest's own order.
# (test_multigpu second: its worker trains the shared trained_export while the other runs test_resume)
LONGEST_FIRST = ["test_resume.py", "test_multigpu.py", "test_resume_strategies.py",
                 "test_serving_scaleout.py", "test_experiments.py", "test_long_context.py",
                 "test_backends.py", "test_serving_server.py", "test_sweeps.py", "test_module.py",
                 "test_slurm_cluster.py", "test_cli.py", "test_serving_hostile.py", "test_benchmarks.py",
                 "test_evaluation_callbacks.py", "test_masks.py"]


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order kept
