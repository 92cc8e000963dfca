#!/usr/bin/env bash
# The GPU check for the training fast path (issue 11), one `run` of the device tool from the repo root:
#   bash bench/gpu_check.sh        (after ../shared/device/prepare.sh here; carry=[".whl", ".shared"])
# 1. bench/gpu.py on the full-size random BioGPT: scoring (batch 16 vs token budget), generation (dynamic vs
#    static cache, batch 1 and 32), and `medqa train`'s own Trainer path (unpacked grouped, packed eager, packed
#    compiled), with the projected HealthCareMagic-100k epoch; writes $OUT/<card>.json (commit it under
#    bench/results/ and its table into BENCHMARKS.md).
# 2. The real CLI on CUDA with the shipped GPU config (packing, token budget, compile on): prepare -> train ->
#    evaluate, on the synthetic GenMedGPT records and the real BioGPT tokenizer.
# Each step has its own time limit; steps.txt says how each ended; all.log holds the output.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
ROOT=$PWD; OUT=${OUT:-/tmp/out}; mkdir -p $OUT; PY=python3; S=$ROOT/.shared
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$ROOT/src TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
$PY -c "import torch,transformers,peft,datasets;print('torch',torch.__version__,'transformers',transformers.__version__,'cuda',torch.cuda.is_available())" >> $OUT/env.txt 2>&1
step() { local name=$1 t=$2; shift 2; local s=$(date +%s); echo "===== $name" >> $OUT/all.log
  timeout $t "$@" 2>&1 | tr '\r' '\n' | grep -v "INFO medqa: config:\|it/s\]$\|s/it\]$" >> $OUT/all.log; local rc=${PIPESTATUS[0]}
  echo "STEP $name rc=$rc $(( $(date +%s)-s ))s" | tee -a $OUT/steps.txt; }
step bench 330 $PY bench/gpu.py --out $OUT/gpu.json --results-dir $OUT --repeats 2 --skip-hand-loop
step model 60 $PY - <<'PYEOF'
import shutil, torch
from transformers import BioGptConfig, BioGptForCausalLM
cfg = BioGptConfig(vocab_size=42384, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                   max_position_embeddings=1024, pad_token_id=1, bos_token_id=0, eos_token_id=2)
torch.manual_seed(0)
with torch.device("cuda"):
    m = BioGptForCausalLM(cfg)
m.to("cpu").save_pretrained("/tmp/biogpt-rand")
for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
    shutil.copy(f"assets/biogpt-tokenizer/{f}", "/tmp/biogpt-rand/")
PYEOF
M="$PY -m medqa"
C="--config configs/biogpt.yaml workdir=/tmp/run model.name_or_path=/tmp/biogpt-rand data.source=$S/data/genmedgpt5k_SYNTHETIC_chatdoctor5k.json data.num_proc=8 scoring.max_examples=256"
step prepare 60 $M prepare $C
step train_fast 150 $M train $C train.epochs=1 train.eval_steps=100000
step evaluate 60 $M evaluate $C evaluate.num_questions=32
cp /tmp/run/outputs/finetune/metrics.json $OUT/train_metrics.json 2>/dev/null
cp /tmp/run/outputs/finetune/metrics.jsonl $OUT/train_metrics.jsonl 2>/dev/null
cp /tmp/run/outputs/report.md $OUT/ 2>/dev/null; ls -la $OUT
