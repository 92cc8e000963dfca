#!/usr/bin/env bash
# The GPU check, one command from the repo root, at most 7 minutes on an H100/H200:
#   once, with network:  bash ../shared/device/prepare.sh      (.whl/ and .shared/, both git-ignored)
#   on the GPU machine:  bash bench/gpu_check.sh               (with .whl/ and .shared/ copied there; limit 450 s)
# CPU dry run of the same steps (tiny model, tiny sizes, no install; tests/test_bench_smoke.py runs it):
#   GPU_CHECK_DRY=1 OUT=/tmp/gpu-check bash bench/gpu_check.sh
#
# Steps, in order of importance, each with its own limit (seconds; the sum is 400 with the model fallback, under 420):
#   install   20  the wheels in .whl/ into /tmp/site (no index)
#   headline 150  bench/gpu.py --sections trainer: `medqa train`'s Trainer path on the full-size random BioGPT
#                 and the real records' lengths, packed and compiled first (a cold compile is 75-150 s), then
#                 packed eager if time is left; $OUT/gpu.json is written after each variant
#   scoring   70  bench/gpu.py --merge --sections eval,generate: scoring (batch 16, token budget), greedy
#                 generation (dynamic cache at batch 1 and 32, static cache at batch 1: one compile); adds to
#                 $OUT/gpu.json after each part and completes the epoch projections with evaluation
#   model     15  only when the headline died before saving the random model: bench/gpu.py --sections model
#   prepare   20  medqa prepare: configs/biogpt.yaml on the GenMedGPT records and the headline's saved model
#   train     85  medqa train: at most 30 steps, logged every step, evaluated every 10 (the compile reads the
#                 headline's inductor cache)
#   evaluate  40  medqa evaluate: 8 questions, 16 PubMedQA questions, 32 scored examples, dynamic KV cache
# Whatever a step leaves is copied to $OUT after it, whatever its exit status, and again on exit:
# steps.txt (how each step ended), all.log, gpu.json, train_metrics.jsonl (finetune_checkpoints/metrics.jsonl),
# train_metrics.json, report.json and report.md (evaluate).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
export HF_DATASETS_DISABLE_PROGRESS_BARS=1
ROOT=$PWD; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DRY=${GPU_CHECK_DRY:-0}
# The dry run keeps the steps and their order; its limits are multiplied by GPU_CHECK_SCALE (default 6: shared
# CPU cores are that much slower than the GPU machine for the tiny model's steps).
SCALE=1; [ "$DRY" = 1 ] && SCALE=${GPU_CHECK_SCALE:-6}
WORK=${GPU_CHECK_WORK:-/tmp/medqa-gpu-check}; RUN=$WORK/run; rm -rf "$RUN"; mkdir -p "$WORK"
S=$ROOT/.shared; [ -d "$S" ] || S=$ROOT/../shared
DATA=$S/data/genmedgpt5k_SYNTHETIC_chatdoctor5k.json; [ -f "$DATA" ] || DATA=$ROOT/data/real/healthcaremagic_500.json

collect() {  # copy whatever exists now; never fails
  cp "$RUN/outputs/finetune_checkpoints/metrics.jsonl" "$OUT/train_metrics.jsonl" 2>/dev/null
  cp "$RUN/outputs/finetune/metrics.json" "$OUT/train_metrics.json" 2>/dev/null
  cp "$RUN/outputs/report.json" "$OUT/" 2>/dev/null
  cp "$RUN/outputs/report.md" "$OUT/" 2>/dev/null
  true
}
trap collect EXIT
step() {  # step NAME LIMIT command...: runs it under its limit, logs, records how it ended, collects
  local name=$1 t=$(( $2 * SCALE )); shift 2; local s; s=$(date +%s); echo "===== $name (limit ${t}s)" >> "$OUT/all.log"
  timeout -k 3 "$t" "$@" 2>&1 | tr '\r' '\n' | grep --line-buffered -v "INFO medqa: config:\|it/s\]$\|s/it\]$" >> "$OUT/all.log"
  local rc=${PIPESTATUS[0]}
  echo "STEP $name rc=$rc $(( $(date +%s) - s ))s (limit ${t}s)" | tee -a "$OUT/steps.txt"; collect; }

if [ "$DRY" = 1 ]; then
  PY=${PYTHON:-python3}; export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
  B="--device cpu --tiny"; MODEL=$WORK/biogpt-random-tiny
  SIZE="train.tokens_per_step=1024 train.batch_size=2 train.max_steps=3 lora.r=8"; NP=1; RECORDS=200
  echo "dry run on CPU: $(nproc) cores" > "$OUT/env.txt"
else
  PY=python3; B=""; MODEL=$WORK/biogpt-random; SIZE="train.max_steps=30"; NP=8; RECORDS=0
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/env.txt" 2>&1
  step install 20 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$ROOT/src TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
fi
$PY -c "import torch,transformers,peft,datasets;print('torch',torch.__version__,'transformers',transformers.__version__,'cuda',torch.cuda.is_available())" >> "$OUT/env.txt" 2>&1

G="$PY bench/gpu.py $B --work $WORK --out $OUT/gpu.json --results-dir $OUT"
step headline 150 $G --sections trainer --trainer-variants packed_compiled,packed_eager
step scoring 70 $G --merge --sections eval,generate
[ -f "$MODEL/config.json" ] || step model 15 $G --sections model  # only if the headline died before saving it

M="$PY -m medqa"
C="--config configs/biogpt.yaml workdir=$RUN model.name_or_path=$MODEL data.source=$DATA data.num_proc=$NP data.max_records=$RECORDS"
step prepare 20 $M prepare $C
step train 85 $M train $C $SIZE train.epochs=1 train.logging_steps=1 train.eval_steps=10 scoring.max_examples=32
step evaluate 40 $M evaluate $C scoring.max_examples=32 evaluate.num_questions=8 evaluate.pubmedqa_questions=16 \
  evaluate.samples_in_report=2 generate.max_new_tokens=48 generate.static_cache=false
ls -la "$OUT"
