#!/usr/bin/env bash
# Full fine-tuning on LLaVA-format data: language model, projector and vision tower all trained, the vision tower
# at a 10x lower learning rate. Any finetune_hf_trainer_custom.py flag can be added (or overridden) at the end:
#
#   DATA_PATH=data/train.json IMAGE_FOLDER=data/images NUM_GPUS=8 scripts/finetune.sh --num_train_epochs 2
set -euo pipefail

DATA_PATH=${DATA_PATH:-data/train.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-data/images}
OUTPUT_DIR=${OUTPUT_DIR:-output/phi3v_full}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # PYTHON, MODEL, NUM_GPUS, run_custom_recipe

run_custom_recipe \
    --num_crops 16 \
    --learning_rate 2e-5 \
    --vision_lr 2e-6 \
    --projector_lr 2e-5 \
    --num_train_epochs 1 \
    "$@"
