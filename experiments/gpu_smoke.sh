#!/usr/bin/env bash
# GPU smoke of the real path, for a machine with 1+ NVIDIA GPU (a few minutes):
#   bf16 ZeRO-2 and ZeRO-3 steps of a small LLaMA-shaped model with the gist mask, a validation
#   pass with generation through the gist cache, ZeRO checkpoint -> HF conversion, a reload,
#   and the caching benchmark on a LLaMA-7B-shaped model in bf16.
#   bash experiments/gpu_smoke.sh [OUT_DIR]      (figures are appended to OUT_DIR/gpu_smoke.txt)
set -euo pipefail
OUT=${1:-experiments/results/gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu_smoke.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$LOG"
SMALL='{"model_type": "llama", "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 512}'
for STAGE in 2 3; do
  RUN="$OUT/zero$STAGE"
  START=$(date +%s)
  gist-lightning fit --config configs/tiny.yaml --config "configs/strategies/deepspeed-zero$STAGE.yaml" \
    --trainer.devices 1 --trainer.max_steps 40 --trainer.val_check_interval 40 \
    --trainer.logger.init_args.save_dir "$RUN" --trainer.default_root_dir "$RUN" \
    --model.model_config "$SMALL" --data.max_validation_records 32 --data.cache_dir "$OUT/cache" 2>&1 | tail -12 | tee -a "$LOG"
  echo "zero$STAGE fit+validate: $(( $(date +%s) - START ))s" | tee -a "$LOG"
  CKPT=$(ls -d "$RUN"/tiny/version_0/checkpoints/last.ckpt)
  gist-lightning export --ckpt "$CKPT" --out "$RUN/hf" --dtype bfloat16 | tee -a "$LOG"
  python - "$RUN/hf" <<'PY' | tee -a "$LOG"
import sys, torch
from gist_lightning import compress, generate
from gist_lightning.export import load_pretrained
model, tok, s = load_pretrained(sys.argv[1], dtype=torch.bfloat16)
model = model.cuda()
cache = compress(model, tok, ["Reverse the list.", "Remove every cat."], s["num_gist_tokens"])
print("reload ok:", generate(model, tok, cache, ["cat dog owl", "cat fox cat"], max_new_tokens=8))
PY
done
python experiments/bench_caching.py --shape llama-7b --dtype bfloat16 --device cuda --out "$OUT" | tee -a "$LOG"
