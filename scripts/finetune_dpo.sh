#!/usr/bin/env bash
# DPO on preference pairs (2U1/Qwen-VL-Series-Finetune's format: prompt, chosen, rejected, image or video) with LoRA on
# the language model, the vision tower frozen; the reference is the same model with its adapters disabled. Start
# from your SFT result (MODEL=output/phi3v_full, or merge a LoRA SFT first). Extra flags are passed on, e.g.
# --loss_type ipo --beta 0.3, --rpo_alpha 1.0, --bits 4 (QLoRA), or --lora_enable False --precompute_ref_log_probs
# (full fine-tuning without a second model in memory); see the README's "Preference tuning (DPO)".
#
#   MODEL=output/phi3v_full DATA_PATH=data/pairs.json IMAGE_FOLDER=data/images scripts/finetune_dpo.sh
set -euo pipefail

DATA_PATH=${DATA_PATH:-data/pairs.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-data/images}
OUTPUT_DIR=${OUTPUT_DIR:-output/phi3v_dpo}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # PYTHON, MODEL, NUM_GPUS, run_recipe

run_recipe finetune_hf_trainer_dpo.py \
    --lora_enable \
    --freeze_vision_tower \
    --lora_rank 64 --lora_alpha 128 --lora_dropout 0.05 \
    --num_crops 16 \
    --beta 0.1 \
    --loss_type sigmoid \
    --learning_rate 5e-6 \
    --num_train_epochs 1 \
    "$@"
