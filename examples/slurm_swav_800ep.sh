#!/bin/bash
# SwAV ResNet-50, 800 epochs, global batch 4096 (recipe swav_800ep): 8 nodes x 8 GPUs x 64 images.
#
#   sbatch examples/slurm_swav_800ep.sh /data/imagenet/train /checkpoints/swav_800ep
#
# One SLURM task per GPU; `swav pretrain` reads SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID and takes the
# first host of the node list as the master (port 20000 + job id % 20000, or $MASTER_PORT), so no launcher
# is needed. The output folder must be on a file system every node sees: rank 0 writes each checkpoint
# once (model, optimiser, every rank's queue and RNG state) and every rank reads it on --resume.
#
# Preemption / time limit: SLURM sends SIGUSR1 two minutes before the end; every rank saves at the next
# step boundary and exits with 138, and the job requeues itself and resumes from that checkpoint.
# A rank that fails (an exception, NaN) stops the others within run.dist_timeout_minutes at most; the
# job then exits non-zero and is not requeued.
#
# Many small files on a network file system are slow: pack the data into shards once and train from them
#   swav pack-shards /data/imagenet/train /data/imagenet-shards --num-shards 1024   (a multiple of 64 ranks)
#   ... --data shards:/data/imagenet-shards
#
#SBATCH --job-name=swav_800ep
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=10
#SBATCH --mem=450G
#SBATCH --time=72:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --output=%x-%j.out

set -u
DATA=${1:?usage: sbatch slurm_swav_800ep.sh DATA OUTPUT_DIR}
OUT=${2:?usage: sbatch slurm_swav_800ep.sh DATA OUTPUT_DIR}

# 64 x 64 = 4096 images per step; base_lr 4.8 and the rest of the recipe assume exactly this global batch
srun --kill-on-bad-exit=1 python -m swav pretrain \
    --recipe swav_800ep \
    --data "$DATA" \
    --output-dir "$OUT" \
    --workers "$SLURM_CPUS_PER_TASK" \
    --resume \
    --set run.dist_timeout_minutes=10
status=$?

if [ "$status" -eq 138 ] || [ "$status" -eq 143 ]; then  # stopped by SIGUSR1 / SIGTERM after saving
    echo "preempted (exit $status): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
