#!/usr/bin/env bash
# LoRA adapters on the language model, the CLIP vision tower and the projector (--vision_lora), their own weights
# frozen, the vision adapters at a lower learning rate (2U1's finetune_lora_vision.sh). Extra flags are passed on.
#
#   DATA_PATH=data/train.json IMAGE_FOLDER=data/images scripts/finetune_lora_vision.sh
set -euo pipefail

DATA_PATH=${DATA_PATH:-data/train.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-data/images}
OUTPUT_DIR=${OUTPUT_DIR:-output/phi3v_lora_vision}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # PYTHON, MODEL, NUM_GPUS, run_custom_recipe

run_custom_recipe \
    --lora_enable \
    --vision_lora \
    --lora_rank 128 --lora_alpha 256 --lora_dropout 0.05 \
    --lora_namespan_exclude "['lm_head', 'embed_tokens']" \
    --num_crops 16 \
    --learning_rate 2e-4 \
    --vision_lr 2e-5 \
    --projector_lr 2e-5 \
    --num_train_epochs 1 \
    "$@"
