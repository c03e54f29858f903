#!/bin/bash
# SwAV with torchrun on several nodes (any cluster, no SLURM needed). Run this same script on every node:
#
#   NNODES=8 NODE_RANK=<0..7> MASTER=<host of node 0> ./examples/torchrun_multinode.sh DATA OUTPUT_DIR
#
# 8 nodes x 8 GPUs x 64 images = the official global batch 4096 (recipe swav_800ep); with fewer GPUs,
# scale the learning rate with the global batch or use swav_200ep_bs256 (4 x 64 = 256, with a queue).
# On CPUs, torchrun starts gloo processes instead (try it on one machine: NNODES=1 GPUS=2).
#
# The output folder must be shared by all nodes (rank 0 writes each checkpoint once; every rank reads it
# on --resume). If one process fails, torchrun stops the others on its node and the other nodes' ranks
# stop when their next collective fails, or after run.dist_timeout_minutes; the job exits non-zero.
set -eu
DATA=${1:?usage: torchrun_multinode.sh DATA OUTPUT_DIR}
OUT=${2:?usage: torchrun_multinode.sh DATA OUTPUT_DIR}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER=${MASTER:-127.0.0.1}
GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
if [ "$GPUS" -eq 0 ]; then GPUS=1; fi  # no GPU: one gloo process per node unless GPUS is set
RECIPE=${RECIPE:-swav_800ep}

exec python -m torch.distributed.run \
    --nnodes "$NNODES" \
    --node_rank "$NODE_RANK" \
    --nproc_per_node "$GPUS" \
    --rdzv_backend c10d \
    --rdzv_endpoint "$MASTER:29500" \
    --rdzv_id "swav-$RECIPE" \
    --max_restarts 0 \
    -m swav pretrain \
        --recipe "$RECIPE" \
        --data "$DATA" \
        --output-dir "$OUT" \
        --resume \
        --set run.dist_timeout_minutes=10
