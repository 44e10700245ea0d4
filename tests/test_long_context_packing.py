"""Packed rows of long contexts with a ratio drawn per batch: every example of a packed row gets the
batch's layout, and the loss is the masked forward of those rows."""

from __future__ import annotations

import torch

from gist_lightning.data import LongRecall
from gist_lightning.long_context import SegmentSettings, masked_forward
from gist_lightning.module import GistLitModule


def test_packed_rows_draw_one_ratio_per_batch(tmp_path):
    settings = SegmentSettings(segment_tokens=16, gists_per_segment=4, placement="coarse",
                               train_ratios=(2, 8))
    config = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024}
    module = GistLitModule(model_config=config, num_gist_tokens=4, segments=settings)
    module.configure_model()
    dm = LongRecall(cache_dir=str(tmp_path), train_size=48, validation_size=4, context_words=(20, 40),
                    batch_size=2, packing=True, limits={"max_length": 400}, human_limits={"max_length": 700})
    dm.prepare_data()
    dm.connect(**module.data_facts())
    batches = list(dm.train_dataloader())
    assert {b["gists_per_segment"] for b in batches} == {8, 2}  # 16 / (2, 8)
    gist = module.gist_token_id
    for b in batches:
        g = b["gists_per_segment"]
        for row, seg in zip(b["input_ids"], b["segment_ids"]):
            for s in seg.unique().tolist():
                if s:  # every packed example holds whole segments of the drawn layout
                    assert int((row[seg == s] == gist).sum()) % g == 0
        assert b["segment_ids"].max() >= 2  # several examples per row
    b = next(b for b in batches if b["gists_per_segment"] != 4)
    with torch.no_grad():
        want = masked_forward(module.model, b["input_ids"], b["attention_mask"], gist,
                              settings.at_ratio(16 // b["gists_per_segment"]), segment_ids=b["segment_ids"],
                              labels=b["labels"]).loss
        assert torch.equal(module._loss(b), want)
