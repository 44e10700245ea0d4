#!/usr/bin/env bash
# GPU smoke of the real path, for a machine with 1+ NVIDIA GPU:
#   bash experiments/gpu_smoke.sh [OUT_DIR [RUNS_DIR]]
# (defaults experiments/results/gpu and runs/gpu_smoke, relative to the repository root)
# Figures go to OUT_DIR: machine.txt (nvidia-smi, torch/CUDA versions), times.txt (one line per step:
# seconds, cap, ok / FAILED / TIMED OUT), logs/<step>.log and the benchmarks' tables
# (experiments/results/gpu/README.md lists them). Checkpoints, exports, the random base model and
# the data cache go to RUNS_DIR (git-ignored). A failed step does not stop the others; the script
# exits 1 at the end if any failed.
#
# Time budget: every step runs under a cap (`timeout`) and no cap reaches past SMOKE_BUDGET_S
# (default 540 s) from the start, so the script stops by then; SMOKE_STEPS picks the steps (below).
# Per step, measured on an H200 (2026-12-04, experiments/results/gpu/times.txt), each with ~10 s of
# Python/torch/Lightning start-up:
#   machine            4 s
#   zero2, zero3       55 s, 40 s: 25M-param LLaMA, DeepSpeed init, 30 steps, 3 x 16 validation answers
#   export, reload     ~20 s + ~17 s per stage
#   qwen3-base         17 s: a random Qwen3-0.6B shape (~440M params, suite vocabulary) saved in bf16
#   lora, qlora        51 s to its first validation (then failed: hub kernels, fixed since), qlora not
#                      measured (no bitsandbytes there): 20 steps of batch 16, gradient checkpointing
#   bench_attention    149 s: 1B LLaMA shape, S in {1024, 4096}, 5 modes x (2 + 3) steps, flex compilation
#   bench_caching      > 75 s (stopped there): LLaMA-7B shape in bf16, 16 prompts, 3 repeats
#   bench_serve        > 32 s (stopped there): 3 server starts, 128 requests at concurrency 16, <= 20 s each
#   bench_generate     not measured (guess ~120 s): 100M shape, batch 1/32, 32 new tokens, 9 methods,
#                      5 interleaved rounds, CUDA graphs for the compiled library and ceiling
#   bench_serve_docs   not measured (guess ~90 s): 2 server starts, 16 streams, 4 documents of 2-4K tokens
#   total              ~900 s: over one device call (600 s); run it in two parts, e.g.
#                      SMOKE_STEPS="machine zero2 zero2-export zero2-reload zero3 zero3-export zero3-reload
#                      qwen3-base lora qlora bench_attention", then the benchmarks after it
# Offline GPU machines (no registry): experiments/offline_wheels.sh prepares the packages to carry.
# Checked on CPU: tests/test_gpu_smoke.py runs this script with `gist-lightning`, `python` and
# `nvidia-smi` replaced by recorders, then parses every recorded `gist-lightning fit` command
# (--print_config), every `gist-lightning export` command and every benchmark command (--check_args).
# Keep commands literal (no `eval`, no commands built in strings) so that check sees what runs here.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-experiments/results/gpu}
RUNS=${2:-runs/gpu_smoke}
BUDGET_S=${SMOKE_BUDGET_S:-540}
mkdir -p "$OUT/logs" "$RUNS"
# SMOKE_STEPS="zero2 lora ...": run only the steps named (default: all); the others are listed in
# times.txt as "not selected". The whole script outlasts one device call (H200, measured: ~900 s
# against a 600 s call), so it is run in parts (README.md in the output folder). A part that names
# `machine` starts machine.txt and times.txt afresh; any other part adds its lines to times.txt.
# Steps that need an earlier one in the same part (a fresh machine has nothing): zero*-export and
# zero*-reload need zero*; lora and qlora need qwen3-base.
STEPS=(machine zero2 zero2-export zero2-reload zero3 zero3-export zero3-reload qwen3-base lora qlora
       bench_attention bench_caching bench_serve bench_generate bench_serve_docs)
read -ra WANTED -d '' <<< "${SMOKE_STEPS:-}" || true  # names split by any blanks, lines too
among() { local x=$1 s; shift; for s; do [[ $s == "$x" ]] && return 0; done; return 1; }  # among X LIST...
known() { among "$1" "${STEPS[@]}"; }
selected() { ((${#WANTED[@]} == 0)) || among "$1" "${WANTED[@]}"; }
for w in "${WANTED[@]}"; do
  known "$w" || { echo "gpu_smoke.sh: SMOKE_STEPS names no step $w (steps: ${STEPS[*]})" >&2; exit 2; }
done
if selected machine; then
  : > "$OUT/times.txt"
fi
if ((${#WANTED[@]})); then
  echo "# SMOKE_STEPS=\"${WANTED[*]}\" ($(date -u '+%F %T') UTC)" >> "$OUT/times.txt"
fi
FAILED=()

# step NAME CAP_S COMMAND...: run COMMAND under min(CAP_S, what is left of the budget), its output
# in logs/NAME.log (its last lines on the console), and its wall time in times.txt
step() {
  local name=$1 cap=$2 left=$((BUDGET_S - SECONDS)) start=$SECONDS status=ok code=0
  shift 2
  known "$name" || { echo "gpu_smoke.sh: step $name is not in STEPS" >&2; exit 2; }
  if ! selected "$name"; then
    printf '%-16s    0 s  not selected (SMOKE_STEPS)\n' "$name" | tee -a "$OUT/times.txt"
    return
  fi
  ((cap < left)) || cap=$left
  if ((cap <= 0)); then
    FAILED+=("$name")
    printf '%-16s    0 s  (the %d s budget is spent) SKIPPED\n' "$name" "$BUDGET_S" | tee -a "$OUT/times.txt"
    return
  fi
  echo "== $name (cap ${cap}s): $*"
  timeout "$cap" "$@" > "$OUT/logs/$name.log" 2>&1 || code=$?
  tail -n 8 "$OUT/logs/$name.log"
  if ((code == 124)); then status="TIMED OUT"; elif ((code != 0)); then status="FAILED ($code)"; fi
  [[ $status == ok ]] || FAILED+=("$name")
  printf '%-16s %4d s  (cap %d s) %s\n' "$name" $((SECONDS - start)) "$cap" "$status" | tee -a "$OUT/times.txt"
}

if selected machine; then
  { nvidia-smi || true; } > "$OUT/machine.txt"
fi
step machine 20 python - "$OUT/machine.txt" <<'PY'
import importlib.metadata as md, platform, sys, torch
with open(sys.argv[1], "a") as f:
    print(f"{platform.platform()}; python {platform.python_version()}; torch {torch.__version__}, CUDA "
          f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; GPUs: "
          f"{[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}", file=f)
    for name in ("transformers", "lightning", "deepspeed", "peft", "bitsandbytes"):
        try:
            print(f"{name} {md.version(name)}", file=f)
        except md.PackageNotFoundError:
            print(f"{name} not installed", file=f)
PY

# 1. bf16 ZeRO-2 and ZeRO-3 steps of a small LLaMA-shaped model with the gist mask, a validation pass
#    with generation through the gist cache, ZeRO checkpoint -> HF conversion, and a reload.
SMALL='{"model_type": "llama", "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 512}'
for STAGE in 2 3; do
  RUN="$RUNS/zero$STAGE"
  step "zero$STAGE" 90 gist-lightning fit \
    --config configs/tiny.yaml --config "configs/strategies/deepspeed-zero$STAGE.yaml" --trainer.devices 1 \
    --trainer.max_steps 30 --trainer.val_check_interval 30 \
    --trainer.logger.init_args.save_dir "$RUN" --trainer.default_root_dir "$RUN" \
    --model.model_config "$SMALL" --data.max_validation_records 16 --data.cache_dir "$RUNS/cache"
  # a DeepSpeed checkpoint is a folder of shards; export consolidates it
  step "zero$STAGE-export" 30 gist-lightning export --ckpt "$RUN/tiny/version_0/checkpoints/last.ckpt" \
    --out "$RUN/hf" --dtype bfloat16
  step "zero$STAGE-reload" 30 python - "$RUN/hf" <<'PY'
import sys, torch
from gist_lightning import compress, generate
from gist_lightning.export import load_pretrained
model, tok, s = load_pretrained(sys.argv[1], dtype=torch.bfloat16)
model = model.cuda()
cache = compress(model, tok, ["Reverse the list.", "Remove every cat."], s["num_gist_tokens"])
print("reload ok:", generate(model, tok, cache, ["cat dog owl", "cat fox cat"], max_new_tokens=8))
PY
done

# 2. LoRA and QLoRA steps with the shipped Qwen3-0.6B preset. PEFT needs a pretrained base
#    (model.peft refuses model_config), so a random model of Qwen3-0.6B's shape is saved first, with
#    the suite tokenizer (no download); the data is the embedded suite instead of Alpaca+.
BASE="$RUNS/qwen3-0.6b-random"
step qwen3-base 40 python - "$BASE" <<'PY'
import sys, torch
from transformers import Qwen3Config, Qwen3ForCausalLM
from gist_lightning.tokens import load_tokenizer
tok = load_tokenizer("suite")
# Qwen/Qwen3-0.6B's config.json, but its 151936-token vocabulary (this tokenizer's instead)
config = Qwen3Config(vocab_size=len(tok), hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                     num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=2048,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
torch.manual_seed(0)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(sys.argv[1])
tok.save_pretrained(sys.argv[1])
print(f"saved {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters to {sys.argv[1]}")
PY
step lora 80 gist-lightning fit --config configs/qwen3-0.6b-lora.yaml --model.model_name_or_path "$BASE" \
  --model.max_new_tokens 16 --data gist_lightning.data.EmbeddedSuite --data.cache_dir "$RUNS/cache" \
  --data.max_validation_records 16 --trainer.max_steps 20 --trainer.accumulate_grad_batches 1 \
  --trainer.val_check_interval 20 --trainer.default_root_dir "$RUNS/lora" \
  --trainer.logger.init_args.save_dir "$RUNS/lora"
step qlora 90 gist-lightning fit --config configs/qwen3-0.6b-lora.yaml --model.model_name_or_path "$BASE" \
  --model.peft.quantize nf4 \
  --model.max_new_tokens 16 --data gist_lightning.data.EmbeddedSuite --data.cache_dir "$RUNS/cache" \
  --data.max_validation_records 16 --trainer.max_steps 20 --trainer.accumulate_grad_batches 1 \
  --trainer.val_check_interval 20 --trainer.default_root_dir "$RUNS/qlora" \
  --trainer.logger.init_args.save_dir "$RUNS/qlora"

# 3. Benchmarks.
step bench_attention 170 python experiments/bench_attention.py --device cuda --shape 1b --dtype bfloat16 \
  --lengths 1024 4096 --steps 3 --warmup 2 --out "$OUT/bench_attention/bench_attention-1b-cuda.md"
step bench_caching 120 python experiments/bench_caching.py --shape llama-7b --dtype bfloat16 --device cuda \
  --num_prompts 16 --repeats 3 --out "$OUT/bench_caching"
step bench_serve 100 python experiments/bench_serve.py --device cuda --dtype bfloat16 \
  --requests 128 --concurrency 16 --time_limit 20 --out "$OUT/bench_serve"
step bench_generate 120 python experiments/bench_generate.py --device cuda --dtype bfloat16 --shape 100m \
  --batch 1 32 --new_tokens 32 --repeats 5 --out "$OUT/bench_generate"
step bench_serve_docs 90 python experiments/bench_serve.py --device cuda --dtype bfloat16 --long_documents \
  --shape 100m --streams 16 --documents 4 --out "$OUT/bench_serve_docs"

echo "total: ${SECONDS}s of a ${BUDGET_S}s budget" | tee -a "$OUT/times.txt"
if ((${#FAILED[@]})); then
  echo "FAILED: ${FAILED[*]} (see $OUT/logs/)" | tee -a "$OUT/times.txt"
  exit 1
fi
