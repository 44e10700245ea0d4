"""The shared DataModule: connecting to the model's facts, named validation loaders, limits and
drops, loaders, and what happens without a model."""

from __future__ import annotations

import pytest

from gist_lightning.data import EmbeddedSuite, LengthLimits
from gist_lightning.data.suite import human_records
from gist_lightning.module import GistLitModule
from gist_lightning.splits import SPLITS, VALIDATION_SPLITS
from gist_lightning.tokens import gist_token_id


@pytest.fixture
def suite_module(tmp_path, tiny_models):
    """(a small EmbeddedSuite, a connected tiny LLaMA module) factory: ``suite_module(k=1, **data)``."""

    def make(num_gist_tokens=1, condition="gist", **data_args):
        args = dict(cache_dir=str(tmp_path / "cache"), train_size=300, validation_size=20, batch_size=8,
                    eval_batch_size=16)
        data = EmbeddedSuite(**{**args, **data_args})
        module = GistLitModule(model_config=tiny_models["llama"], num_gist_tokens=num_gist_tokens,
                               condition=condition)
        data.connect(**module.data_facts())
        data.prepare_data()
        return data, module

    return make


def test_connect_then_setup_gives_named_loaders(suite_module):
    dm, module = suite_module(num_gist_tokens=3)
    dm.setup("fit")
    assert {s: len(d) for s, d in dm.datasets.items()} == {
        "train": 300, "validation_seen": 20, "validation_unseen": 20,
        "validation_human": len(human_records())}
    assert dm.validation_names == VALIDATION_SPLITS and tuple(dm.datasets) == SPLITS
    gist = gist_token_id(module.tokenizer)
    batch = next(iter(dm.train_dataloader()))
    assert (batch["input_ids"] == gist).sum(-1).tolist() == [3] * 8
    loaders = dm.val_dataloader()
    assert len(loaders) == 3
    vb = next(iter(loaders[2]))
    assert "y_true" in vb and vb["prefix_ids"][:, -3:].eq(gist).all()
    assert dm.tokenizer is module.tokenizer and dm.tokenizer.pad_token_id != dm.tokenizer.eos_token_id


def test_without_a_model_the_data_says_what_it_needs(tmp_path):
    dm = EmbeddedSuite(cache_dir=str(tmp_path / "cache"), train_size=30, validation_size=5)
    dm.prepare_data()  # generating the files needs no tokenizer
    dm.setup("fit")  # Lightning's hook waits for the model's connect
    for loader in (dm.train_dataloader, dm.val_dataloader):
        with pytest.raises(RuntimeError,
                           match=r"connect\(tokenizer, encoder_decoder, num_gist_tokens, condition\)"):
            loader()


def test_reconnecting_other_facts_retokenizes(suite_module, tiny_models):
    dm, _ = suite_module(num_gist_tokens=1)
    dm.setup("validate")
    one = dm.datasets["validation_seen"][0]
    five = GistLitModule(model_config=tiny_models["llama"], num_gist_tokens=5)
    dm.connect(**five.data_facts())
    assert dm.datasets == {}
    dm.setup("validate")
    assert len(dm.datasets["validation_seen"][0]["gists"]) == 5 and len(one["gists"]) == 1
    same = dm.datasets
    dm.connect(**five.data_facts())  # the same facts keep the tokenized splits
    assert dm.datasets is same
    other_condition = GistLitModule(model_config=tiny_models["llama"], num_gist_tokens=5,
                                    condition="neg_control")
    dm.connect(**other_condition.data_facts())  # the condition changes the masks only, built per batch
    assert dm.datasets is same and dm.collator(for_generation=False).condition == "neg_control"


def test_examples_that_cannot_fit_are_dropped_and_counted(suite_module):
    dm, _ = suite_module(limits=LengthLimits(max_length=22), human_limits=LengthLimits(max_length=700))
    dm.setup("fit")
    assert dm.dropped["train"] > 0 and dm.dropped["validation_human"] == 0
    assert len(dm.datasets["train"]) == 300 - dm.dropped["train"]
    for row in dm.datasets["train"]:
        assert len(row["prefix"]) + len(row["gists"]) + len(row["suffix"]) + len(row["target"]) <= 22


def test_limits_given_as_a_mapping_are_read(suite_module):
    """LightningCLI hands a dataclass argument of a subclass over as a plain mapping."""
    dm, _ = suite_module(limits={"max_length": 30})
    assert dm.limits_for("train") == LengthLimits(max_length=30)
    assert dm.limits_for("validation_human").max_length == 768


def test_limits_beyond_the_models_positions_are_refused(suite_module):
    from gist_lightning.errors import ContextLengthError

    with pytest.raises(ContextLengthError,
                       match=r"data.human_limits.max_length=900 exceeds the model's 768 positions"):
        suite_module(human_limits=LengthLimits(max_length=900))


def test_packing_fills_rows_with_every_training_example_once(suite_module, tiny_models):
    dm, module = suite_module(packing=True, limits={"max_length": 96})
    dm.setup("fit")
    rows = dm.packed_rows()
    assert sorted(i for row in rows for i in row) == list(range(len(dm.datasets["train"])))
    assert len(rows) < len(dm.datasets["train"]) / 2  # several examples per row
    gist = gist_token_id(module.tokenizer)
    seen = 0
    for batch in dm.train_dataloader():
        assert batch["input_ids"].shape[1] <= 96
        segments = batch["segment_ids"]
        for i in range(segments.shape[0]):
            n = int(segments[i].max())
            # one gist span per example
            assert (batch["input_ids"][i] == gist).sum().item() == n
            seen += n
    assert seen == len(dm.datasets["train"])
    t5 = GistLitModule(model_config=tiny_models["t5"])
    with pytest.raises(ValueError, match="data.packing"):
        dm.connect(**t5.data_facts())


@pytest.mark.parametrize("size, ranks", [(24, 1), (24, 2), (23, 2)])
def test_a_loader_restored_mid_epoch_yields_the_rest_of_its_ranks_share(size, ranks):
    """The training order depends only on (seed, epoch); each data-parallel rank draws every
    ``ranks``-th index of it (the order padded by repeats to a multiple of ``ranks``), one process the
    whole order; a loader restored after 2 batches yields the batches its rank had left, and one
    restored after an epoch's last batch the whole next epoch. The sampler is a DistributedSampler, so
    Lightning keeps it under DDP/DeepSpeed/FSDP instead of wrapping it in one that a restored loader
    cannot skip."""
    import torch
    from torch.utils.data import DistributedSampler

    from gist_lightning.data.datamodule import _EPOCH_SEED_STRIDE, EpochSampler, ResumableLoader

    epoch = [3]

    def loader(rank: int, batches_done: int = 2) -> ResumableLoader:
        sampler = EpochSampler(size, seed=7, epoch_fn=lambda: epoch[0], num_replicas=ranks, rank=rank)
        assert isinstance(sampler, DistributedSampler)
        return ResumableLoader(list(range(size)), batch_size=4, sampler=sampler,
                               progress_fn=lambda: batches_done)

    def indices(loader) -> list[int]:
        return [i for batch in loader for i in batch.tolist()]

    shares = [indices(loader(r)) for r in range(ranks)]
    assert sorted(set(i for share in shares for i in share)) == list(range(size))
    assert {len(share) for share in shares} == {-(-size // ranks)}  # the same number of steps on each rank
    for rank, share in enumerate(shares):
        restored = loader(rank)
        restored.load_state_dict(loader(rank).state_dict())  # 2 batches of epoch 3 processed
        assert indices(restored) == share[8:]
        # saved after the last batch of epoch 3, resumed in epoch 4 (Lightning moves on): all of it
        state = loader(rank, batches_done=len(restored)).state_dict()
        epoch[0] = 4
        restored = loader(rank)
        restored.load_state_dict(state)
        assert indices(restored) == indices(loader(rank)) != share  # reshuffled per epoch
        epoch[0] = 3
    if ranks == 1:  # one process keeps the order it always had
        g = torch.Generator().manual_seed(7 + _EPOCH_SEED_STRIDE * 3)
        assert shares[0] == torch.randperm(size, generator=g).tolist()
