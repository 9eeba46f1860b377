#!/usr/bin/env bash
# Fine-tuning on video records ({"video": "clip.mp4", ...}): MAX_NUM_FRAMES frames per video, each frame an image
# of at most 4 crops (num_crops 4 keeps 10 frames within the context), the vision tower frozen. Extra flags are
# passed on, e.g. --lora_enable.
#
#   DATA_PATH=data/videos.json IMAGE_FOLDER=data/videos scripts/finetune_video.sh
set -euo pipefail

MODEL=${MODEL:-microsoft/Phi-3.5-vision-instruct}
DATA_PATH=${DATA_PATH:-data/train_video.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-data/videos}
OUTPUT_DIR=${OUTPUT_DIR:-output/phi3v_video}
NUM_GPUS=${NUM_GPUS:-1}
MAX_NUM_FRAMES=${MAX_NUM_FRAMES:-10}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The project's virtual environment unless PYTHON names another interpreter (no activated venv needed).
PYTHON=${PYTHON:-$(if [ -x "$ROOT/.venv/bin/python" ]; then echo "$ROOT/.venv/bin/python"; else echo python3; fi)}

"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NUM_GPUS" "$ROOT/finetune_hf_trainer_custom.py" \
    --model_id "$MODEL" \
    --data_path "$DATA_PATH" \
    --image_folder "$IMAGE_FOLDER" \
    --output_dir "$OUTPUT_DIR" \
    --bf16 \
    --freeze_vision_tower \
    --num_crops 4 \
    --max_num_frames "$MAX_NUM_FRAMES" \
    --learning_rate 2e-5 \
    --projector_lr 2e-5 \
    --num_train_epochs 1 \
    "$@"
