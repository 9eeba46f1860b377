#!/usr/bin/env bash
# LoRA adapters on the (frozen) language model's linear layers, the projector trained fully, the vision tower frozen
# (2U1's meanings, see the README). The adapter and the projector are saved in OUTPUT_DIR; scripts/merge_lora.sh
# folds them into the base model. Extra flags are passed on, e.g. --bits 4 (QLoRA), or --freeze_vision_tower False
# --vision_lr 2e-6 to train the vision tower fully as well (2U1's finetune_lora.sh).
#
#   DATA_PATH=data/train.json IMAGE_FOLDER=data/images scripts/finetune_lora.sh
set -euo pipefail

DATA_PATH=${DATA_PATH:-data/train.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-data/images}
OUTPUT_DIR=${OUTPUT_DIR:-output/phi3v_lora}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # PYTHON, MODEL, NUM_GPUS, run_custom_recipe

run_custom_recipe \
    --lora_enable \
    --freeze_vision_tower \
    --lora_rank 128 --lora_alpha 256 --lora_dropout 0.05 \
    --lora_namespan_exclude "['lm_head', 'embed_tokens']" \
    --num_crops 16 \
    --learning_rate 2e-4 \
    --projector_lr 2e-5 \
    --num_train_epochs 1 \
    "$@"
