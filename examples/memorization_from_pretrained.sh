#!/bin/bash
# The README's measured memorization experiment from a pretrained checkpoint (issue 17), on 2 CPU cores:
#  1. a base model: the tiny Llama pretrained for 1200 steps on Wikipedia articles 64..399 of ../shared/data/
#     wiki_dev.jsonl (with a sentencepiece tokenizer trained on all 400), exported by our pipeline to HF format;
#  2. continued training of that export on articles 0..31 (one per row), standard loss and goldfish k = 4, h = 13
#     for 100 epochs, then the sweep k = 3, 4, 8, 32, 128 at h = 13 for 40 epochs, each evaluated with the base
#     itself as the control; articles 32..63 held out.
# Run from the repository root with the package installed (pip install -e ".[train,eval]"). OUT defaults to
# runs/memorization_from_pretrained. On the busy 2-core machine of the README's tables the base took 10.5 minutes,
# the 100-epoch experiment 24 minutes and the 40-epoch sweep 31.
set -euo pipefail
WIKI=${WIKI:-../shared/data/wiki_dev.jsonl}
OUT=${OUT:-runs/memorization_from_pretrained}
mkdir -p "$OUT"

python - "$WIKI" "$OUT" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1], encoding="utf-8")]
with open(f"{sys.argv[2]}/background.jsonl", "w") as f:  # what the base is pretrained on
    for r in rows[64:]:
        f.write(json.dumps({"text": r["text"]}) + "\n")
with open(f"{sys.argv[2]}/wiki64.jsonl", "w") as f:  # 32 members, then 32 held out
    for r in rows[:64]:
        f.write(json.dumps({"text": r["text"]}) + "\n")
PY

goldfish-train-tokenizer --input "$WIKI" --out "$OUT/tok" --vocab_size 4096
goldfish-prepare-data --input "$OUT/background.jsonl" --tokenizer "$OUT/tok.model" --out "$OUT/bg_data"
goldfish-pretrain --deepspeed_config configs/deepspeed/zero3_cpu.json --model_config configs/models/tiny.json \
  --data "$OUT/bg_data" --tokenizer "$OUT/tok.model" --seq_len 256 --max_steps 1200 --warmup_steps 50 --lr 2e-3 \
  --min_lr 2e-4 --no-goldfish --eval_interval 0 --save_interval 1200 --keep_checkpoints 1 --out_dir "$OUT/base" \
  --no-progress

goldfish-memorization-experiment --init_from_hf "$OUT/base/hf" --data "$OUT/wiki64.jsonl" --num_docs 32 \
  --num_heldout 32 --epochs 100 --seq_len 256 --suffix_len 50 --goldfish 4,13 --no-progress --out "$OUT/k4"
goldfish-memorization-experiment --init_from_hf "$OUT/base/hf" --data "$OUT/wiki64.jsonl" --num_docs 32 \
  --num_heldout 32 --epochs 40 --seq_len 256 --suffix_len 50 --goldfish 3,13 4,13 8,13 32,13 128,13 \
  --no-progress --out "$OUT/sweep"
