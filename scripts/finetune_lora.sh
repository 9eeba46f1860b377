#!/usr/bin/env bash
# LoRA on the language model's linear layers and the projector; the vision tower frozen. The adapter is saved in
# OUTPUT_DIR; scripts/merge_lora.sh folds it into the base model. Extra flags are passed on, e.g. --bits 4 (QLoRA).
#
#   DATA_PATH=data/train.json IMAGE_FOLDER=data/images scripts/finetune_lora.sh
set -euo pipefail

MODEL=${MODEL:-microsoft/Phi-3.5-vision-instruct}
DATA_PATH=${DATA_PATH:-data/train.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-data/images}
OUTPUT_DIR=${OUTPUT_DIR:-output/phi3v_lora}
NUM_GPUS=${NUM_GPUS:-1}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

torchrun --standalone --nproc_per_node="$NUM_GPUS" "$ROOT/finetune_hf_trainer_custom.py" \
    --model_id "$MODEL" \
    --data_path "$DATA_PATH" \
    --image_folder "$IMAGE_FOLDER" \
    --output_dir "$OUTPUT_DIR" \
    --bf16 \
    --lora_enable \
    --freeze_vision_tower \
    --lora_rank 128 --lora_alpha 256 --lora_dropout 0.05 \
    --lora_namespan_exclude "['lm_head', 'embed_tokens']" \
    --num_crops 16 \
    --learning_rate 2e-4 \
    --projector_lr 2e-5 \
    --num_train_epochs 1 \
    "$@"
