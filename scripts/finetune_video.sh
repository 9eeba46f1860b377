#!/usr/bin/env bash
# Fine-tuning on video records ({"video": "clip.mp4", ...}): MAX_NUM_FRAMES frames per video, each frame an image
# of at most 4 crops (num_crops 4 keeps 10 frames within the context), the vision tower frozen. Extra flags are
# passed on, e.g. --lora_enable.
#
#   DATA_PATH=data/videos.json IMAGE_FOLDER=data/videos scripts/finetune_video.sh
set -euo pipefail

DATA_PATH=${DATA_PATH:-data/train_video.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-data/videos}
OUTPUT_DIR=${OUTPUT_DIR:-output/phi3v_video}
MAX_NUM_FRAMES=${MAX_NUM_FRAMES:-10}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # PYTHON, MODEL, NUM_GPUS, run_custom_recipe

run_custom_recipe \
    --freeze_vision_tower \
    --num_crops 4 \
    --max_num_frames "$MAX_NUM_FRAMES" \
    --learning_rate 2e-5 \
    --projector_lr 2e-5 \
    --num_train_epochs 1 \
    "$@"
