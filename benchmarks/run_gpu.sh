#!/usr/bin/env bash
# The GPU rows of the benchmarks (issue #6, items 1, 2 and 4) on one CUDA GPU; results land in
# benchmarks/results/*_cuda_*.{json,md}. Parts, each a few minutes on one H100 (run them all with no argument):
#   step      step cost of every method, PreActResNet-18 (32×32) and ResNet-50 (224×224), fp32 and bf16
#   compile   step cost of natural and Free-8 with torch.compile, fp32 and bf16 + channels_last
#   overhead  raw PyTorch loop vs FreeAdversarialModule under a Trainer
#   run       the whole Free-8 run: 10 epochs of CIFAR-10-shaped data, with the fastest set-up of "compile"
set -euo pipefail
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1
parts=${*:-step compile overhead run}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for part in $parts; do
  case $part in
    step)
      python step_cost.py --model preact_resnet18 --device cuda --precision 32-true
      python step_cost.py --model preact_resnet18 --device cuda --precision bf16-mixed
      python step_cost.py --model preact_resnet18 --device cuda --precision bf16-mixed --channels-last
      python step_cost.py --model resnet50 --device cuda --batches 6 --rounds 2 --precision 32-true
      python step_cost.py --model resnet50 --device cuda --batches 6 --rounds 2 --precision bf16-mixed --channels-last ;;
    compile)
      python step_cost.py --model preact_resnet18 --device cuda --precision 32-true --compile --methods natural free
      python step_cost.py --model preact_resnet18 --device cuda --precision bf16-mixed --channels-last --compile \
        --methods natural free ;;
    overhead)
      python lightning_overhead.py --model preact_resnet18 --device cuda --precision bf16-mixed
      python lightning_overhead.py --model resnet50 --device cuda --precision bf16-mixed --channels-last \
        --warmup 3 --batches 12 --repeats 2 ;;
    run)
      # The faster compiled set-up of the "compile" part (its Free-8 ms per optimizer step).
      best=$(python - <<'PY'
import json
runs = {"32-true": "results/step_cost_preact_resnet18_cuda_32-true_compile.json",
        "bf16-mixed --channels-last": "results/step_cost_preact_resnet18_cuda_bf16-mixed_cl_compile.json"}
step = {k: next(r["step_ms"] for r in json.load(open(v))["rows"] if r["method"].startswith("Free")) for k, v in runs.items()}
print(min(step, key=step.get))
PY
)
      echo "full run with --precision $best --compile"
      # shellcheck disable=SC2086
      python free_cifar10_run.py --device cuda --precision $best --compile --workers 12 ;;
    *) echo "unknown part $part: use step, compile, overhead or run" >&2; exit 2 ;;
  esac
done
