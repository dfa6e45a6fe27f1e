#!/bin/bash
# SLURM: one llmtune launcher per node; each launches one training process per GPU of its node.
# Use it on a SLURM cluster for multi-node runs; edit the #SBATCH lines, the recipe and the config.
#   sbatch accelerate_configs/slurm_multi_node.sh recipes/methods/full.yaml
#SBATCH --job-name=llmtune
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; it starts the per-GPU processes itself
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=llmtune-%j.out
set -euo pipefail

RECIPE=${1:?usage: sbatch slurm_multi_node.sh RECIPE [key=value ...]}
shift
CONFIG=${LLMTUNE_ACCELERATE_CONFIG:-multi_node}   # or deepspeed_zero3, ... (its machine fields are overridden below)
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# Every node must write to the same run directory, on a shared file system.
OUTPUT_DIR=${LLMTUNE_OUTPUT_DIR:-runs/$(basename "$RECIPE" .yaml)-slurm-$SLURM_JOB_ID}

# SLURM_NODEID differs per node, so it is expanded inside each task, not here.
srun --kill-on-bad-exit=1 bash -c "llmtune train '$RECIPE' $* train.output_dir='$OUTPUT_DIR' \
  --accelerate-config '$CONFIG' \
  --num-machines $SLURM_NNODES --machine-rank \$SLURM_NODEID --main-process-ip $MAIN_IP \
  --num-processes $((SLURM_NNODES * ${SLURM_GPUS_ON_NODE:-8}))"
