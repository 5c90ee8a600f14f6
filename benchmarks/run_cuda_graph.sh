#!/usr/bin/env bash
# The GPU part of the CUDA-graph work on one CUDA GPU (an H200 here; name the overhead results after yours), in one call (results land in benchmarks/results/ and, when
# $OUT is set, are copied there): the GPU tests of the graph path (equality to eager, resume, fall-backs), the
# overhead benchmark with the graph row, the whole Free-8 run with cuda_graph=True, and one epoch of the same run
# eagerly for a side-by-side step time.
set -uo pipefail
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1 PYTHONPATH="$(cd .. && pwd)${PYTHONPATH:+:$PYTHONPATH}"
out=${OUT:-results}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch, lightning; print('torch', torch.__version__, '| lightning', lightning.__version__)"
(cd .. && timeout 150 python -m pytest -q -s -p no:cacheprovider tests/test_cuda_graph.py tests/test_cuda.py) 2>&1 | tee "$out/gpu_tests.log"
timeout 110 python lightning_overhead.py --model preact_resnet18 --device cuda --precision bf16-mixed \
  --out results/lightning_overhead_preact_resnet18_cuda_bf16-mixed_h200 2>&1 | grep -v "it/s" | tee "$out/overhead.log"
timeout 210 python free_cifar10_run.py --device cuda --precision bf16-mixed --channels-last --cuda-graph --workers 12 2>&1 | tee "$out/run_graph.log"
timeout 110 python free_cifar10_run.py --device cuda --precision bf16-mixed --channels-last --workers 12 --epochs 1 \
  --out results/free_cifar10_run_cuda_bf16-mixed_1epoch_eager 2>&1 | tee "$out/run_eager.log"
if [ "$out" != results ]; then cp results/free_cifar10_run_cuda_bf16-mixed_cuda_graph.json \
  results/lightning_overhead_preact_resnet18_cuda_bf16-mixed_h200.json results/free_cifar10_run_cuda_bf16-mixed_1epoch_eager.json \
  "$out"/; fi
ls "$out"
