#!/usr/bin/env bash
# One prepared call for a lent GPU machine (PyTorch and torchvision installed, no network): the tests that
# exercise CUDA, then the real-JPEG throughput with each of the data-side options on and off.
#   STAGES="tests engine" bash benchmarks/gpu_check.sh PHOTOS_DIR OUT_DIR   (call 1: 150 + 330 s, plus up
#                                  to 15 s per stage to stop it and the seconds of nvidia-smi: give it 540 s)
#   STAGES=loop bash benchmarks/gpu_check.sh PHOTOS_DIR OUT_DIR             (call 2: 480 s at most)
#   optional limits after OUT_DIR: TESTS_S ENGINE_S LOOP_S (defaults 150 330 480); STAGES is required, as
#   all three stages together exceed one 10-minute call. Run from the repository root.
# With a lent machine's 15 minutes in all (its start-up included), call 1 is the one to make: the CUDA tests
# and `swav pretrain`'s own throughput, the figure the speed issue asks for; call 2 only if time is left.
# PHOTOS_DIR: JPEGs (e.g. a copy of ../shared/data/photos-500x375); OUT_DIR receives the logs and JSON,
# written as each row finishes (a stage cut by its time limit keeps what it measured). Compiling ResNet-50
# took about 2 minutes on an H100/H200; inductor's on-disk cache makes later compiles in the same call faster.
set -u
photos=${1:?usage: gpu_check.sh PHOTOS_DIR OUT_DIR [TESTS_S ENGINE_S LOOP_S]}
out=${2:?usage: gpu_check.sh PHOTOS_DIR OUT_DIR [TESTS_S ENGINE_S LOOP_S]}
tests_s=${3:-150}
engine_s=${4:-330}
loop_s=${5:-480}
stages=${STAGES:?set STAGES="tests engine" (call 1) or STAGES=loop (call 2)}
for stage in $stages; do
  case "$stage" in tests|engine|loop) ;; *) echo "unknown stage '$stage' (tests, engine, loop)"; exit 2 ;; esac
done
[ -f benchmarks/gpu_train_step.py ] || { echo "run from the repository root"; exit 2; }
find "$photos" -maxdepth 1 -type f \( -iname '*.jpg' -o -iname '*.jpeg' \) | grep -q . \
  || { echo "no JPEG files (.jpg, .jpeg) in $photos (carried to this machine?)"; exit 2; }
run_stage() { case " $stages " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
mkdir -p "$out"
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/gpu.txt" 2>&1
python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__)" >> "$out/gpu.txt" 2>&1
# CUDA paths: device pipeline in every precision, resume, deferred NaN stop, decode race, prefetch thread,
# compiled colour stage (each of these files also runs its CPU cases)
if run_stage tests; then
  # --maxfail: one failing test does not hide the others (a lent GPU is rare), three end the stage
  timeout -k 15 "$tests_s" python3 -m pytest -q --maxfail=3 -p no:cacheprovider tests/test_devices.py tests/test_check_sync.py \
      "tests/test_batch_augment.py::test_compiled_dense_stage_in_a_background_thread_matches_eager[cuda]" \
      > "$out/tests.log" 2>&1
  echo "tests rc=$?" >> "$out/tests.log"
  tail -3 "$out/tests.log"
fi
# 1. `swav pretrain` itself on real JPEGs (device pipeline, run.compile, deferred check, batch 128): the
#    background batch thread on (the default on a GPU) and off
if run_stage engine; then
  timeout -k 15 "$engine_s" python3 benchmarks/gpu_train_step.py --skip-diagnostics --skip-synthetic --decodes \
      --data "$photos" --workers 14 --batch-sizes 128 --compile-jpeg --engine-steps 50 \
      --engine-check-sync deferred --engine-prefetch 1 0 --json "$out/engine.json" > "$out/engine.log" 2>&1
  echo "engine rc=$?" >> "$out/engine.log"
  tail -5 "$out/engine.log"
fi
# 2. the benchmark loop (model compiled once): colour stage eager/compiled x prefetch off/on, after the
#    diagnostics (sync audit, colour stage and decode + crop timings)
if run_stage loop; then
  timeout -k 15 "$loop_s" python3 benchmarks/gpu_train_step.py --skip-synthetic --steps 10 --warmup 3 \
      --data "$photos" --workers 14 --batch-sizes 128 --decodes gpu --jpeg-colour masked compiled \
      --jpeg-prefetch 0 1 --compile-jpeg --json "$out/loop.json" > "$out/loop.log" 2>&1
  echo "loop rc=$?" >> "$out/loop.log"
  tail -8 "$out/loop.log"
fi
