"""Test-only: run Lightning's DeepSpeedStrategy on CPU processes (gloo), so that the real DeepSpeed
engine (ZeRO-2/3 partitioning, checkpoints) is exercised where no GPU exists.

Lightning refuses DeepSpeed without CUDA in ``setup_environment`` and checks GPU indices in
``setup_distributed``; DeepSpeed itself runs on its CPU accelerator. Run as a script (Lightning's
launcher re-runs the command line on every rank):

    DS_ACCELERATOR=cpu python tests/deepspeed_cpu.py STAGE DEVICES OUT_DIR MODEL_CONFIG_JSON
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)  # DeepSpeed reads the index as its device rank

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        # DeepSpeed's shared-memory all-reduce is a C++ op compiled on first use (~90 s of g++ on a
        # machine without its build cache, in every cold CI run); gloo does the same reductions.
        # (By module name: the attribute ``deepspeed.comm.torch`` is the torch package.)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()


def main(stage: int, devices: int, out: Path, model_config: dict) -> None:
    from gist_lightning.cli import default_callbacks
    from gist_lightning.data import EmbeddedSuite
    from gist_lightning.evaluation.callbacks import RougeCallback
    from gist_lightning.module import GistLitModule

    L.seed_everything(0)
    dm = EmbeddedSuite(cache_dir=str(out / "cache"), train_size=64, validation_size=5, batch_size=8,
                       eval_batch_size=4, max_validation_records=5)
    module = GistLitModule(model_config=model_config, learning_rate=1e-3, max_new_tokens=4)
    callbacks = [c for c in default_callbacks() if not isinstance(c, ModelCheckpoint)]
    callbacks.append(ModelCheckpoint(dirpath=out / "checkpoints", filename="zero", save_last=False))
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=CPUDeepSpeedStrategy(stage=stage,
                        process_group_backend="gloo"), max_steps=4, val_check_interval=4,
                        num_sanity_val_steps=0,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(out), callbacks=callbacks)
    trainer.fit(module, datamodule=dm)
    if stage == 2 and trainer.is_global_zero:  # ZeRO-2 keeps full weights on every rank
        ids = torch.tensor([[dm.tokenizer.bos_token_id, 5, 6, 7, module.gist_token_id, 8, 9]])
        logits = module.model(input_ids=ids).logits
        torch.save(logits.detach().float(), out / "logits.pt")
    rouge = next(c for c in trainer.callbacks if isinstance(c, RougeCallback))
    if trainer.is_global_zero:
        (out / "rouge.txt").write_text(repr(rouge.last))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4]))
