#!/usr/bin/env bash
# Every GPU figure of the README's performance table, one stage after another, each written to OUT as soon as it
# is measured (OUT/NAME.json, and all output in OUT/log.txt), then one table of them:
#     bash tools/gpu_bench.sh OUT                    # all stages: about 10 minutes on one H100, most of it compiling
#     bash tools/gpu_bench.sh OUT e2e run            # some of them; python tools/bench.py table OUT prints the table
# Stages: tests (tests/test_gpu.py), train_b16, train_b32 (ours vs open_clip, bf16, compile, fused AdamW),
# memory (largest ViT-B-16 batch, eager), e2e (ViT-B-32 from JPEG shards), run (train.py, ViT-B-16, 2 steps).
# B16=tiny B32=tiny bash tools/gpu_bench.sh OUT runs the same stages at the tiny size (on a CPU too).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash tools/gpu_bench.sh OUT_DIR [STAGE ...]}
shift
stages=${*:-tests train_b16 train_b32 memory e2e run}
B16=${B16:-ViT-B-16}
B32=${B32:-ViT-B-32}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available()
else 'cpu', '| date', __import__('datetime').date.today())" 2>&1 | tee -a "$out/log.txt"
for stage in $stages; do
    echo "== $stage" | tee -a "$out/log.txt"
    case $stage in  # each stage has a time limit, so one that hangs cannot take the others' time
        tests)     cmd=(timeout 120 python -m pytest -q tests/test_gpu.py) ;;
        train_b16) cmd=(timeout 170 python tools/bench.py train --model="$B16" --json="$out/train_b16.json") ;;
        train_b32) cmd=(timeout 150 python tools/bench.py train --model="$B32" --json="$out/train_b32.json") ;;
        memory)    cmd=(timeout 120 python tools/bench.py memory --model="$B16" --json="$out/memory.json") ;;
        e2e)       cmd=(timeout 120 python tools/bench.py e2e --model="$B32" --e2e_images=1024
                        --json="$out/e2e.json") ;;
        run)       cmd=(timeout 180 python tools/bench.py run --model="$B16" --json="$out/run.json") ;;
        profile)   cmd=(timeout 100 python tools/bench.py train --model="$B16" --openclip=0 --steps=5 --profile=1) ;;
        *)         echo "unknown stage $stage"; exit 2 ;;
    esac
    "${cmd[@]}" 2>&1 | tee -a "$out/log.txt"
done
python tools/bench.py table "$out" | tee -a "$out/log.txt"
