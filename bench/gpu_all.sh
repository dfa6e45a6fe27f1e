#!/usr/bin/env bash
# Every GPU check in one go, for a lent GPU machine that has torch but lacks some of llmtune's
# packages (they travel as wheels in .whl/, see bench/RESULTS.md). Writes what it sees under $OUT
# (or ./gpu-out): the SFT benchmark tables, then the RLHF GPU recipe (sft -> reward -> ppo) on a
# random model with Qwen2.5-0.5B's dimensions, since the hub cannot be reached there.
#   bash bench/gpu_all.sh
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="$PWD:/tmp/site"
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, trl, peft, accelerate, datasets, deepspeed, pyarrow; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__, 'deepspeed', deepspeed.__version__, 'pyarrow', pyarrow.__version__)"
  nproc; uptime
} >"$OUT/env.txt" 2>&1

# The SFT ratio against plain TRL, then the sharded engines (separate, so one failing keeps the rest).
timeout 150 python3 bench/gpu_sft.py --cases plain_trl,plain 2>&1 | tee "$OUT/sft_plain.md"
timeout 150 python3 bench/gpu_sft.py --cases deepspeed_zero2,deepspeed_zero3 --steps 20 2>&1 | tee "$OUT/sft_zero.md"

# The RLHF GPU recipe, stage step counts capped so it fits the lease.
model=/tmp/qwen05-random
python3 -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; from gpu_sft import build_model, QWEN25_05B; build_model(Path('$model'), QWEN25_05B, 256)"
start=$(date +%s)
timeout 180 python3 -m llmtune.cli train recipes/rlhf/gpu.yaml model.name=$model train.output_dir=/tmp/rlhf-run stages.2.train.max_steps=10 2>&1 | tee "$OUT/rlhf.log"
echo "rlhf wall: $(( $(date +%s) - start )) s" | tee -a "$OUT/rlhf.log"
find /tmp/rlhf-run -maxdepth 2 -name summary.json | head -3 | while read -r f; do echo "== $f"; cat "$f"; done >"$OUT/rlhf_summaries.txt" 2>&1
find /tmp/rlhf-run -maxdepth 2 -name metrics.jsonl | while read -r f; do echo "== $f"; tail -3 "$f"; done >>"$OUT/rlhf_summaries.txt" 2>&1
