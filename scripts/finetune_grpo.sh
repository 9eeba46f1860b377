#!/usr/bin/env bash
# GRPO with verifiable rewards on your records (LLaVA-format or the project's jsonl; the last answer of each record is
# the reference the rewards see), LoRA on the language model, the vision tower frozen, no reference model (beta 0).
# Extra flags are passed on, e.g. --reward_funcs accuracy_reward my_rewards.py --reward_weights 1.0 0.5,
# --beta 0.04, --num_generations 16, --eval_data_path data/eval.json; a task recipe's data and metric (--task) run
# with the recipe's own command (README: "Reinforcement fine-tuning (GRPO)").
#
#   MODEL=output/phi3v_full DATA_PATH=data/train.json IMAGE_FOLDER=data/images scripts/finetune_grpo.sh
set -euo pipefail

DATA_PATH=${DATA_PATH:-data/train.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-data/images}
OUTPUT_DIR=${OUTPUT_DIR:-output/phi3v_grpo}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # PYTHON, MODEL, NUM_GPUS, run_recipe

run_recipe finetune_hf_trainer_grpo.py \
    --lora_enable \
    --freeze_vision_tower \
    --lora_rank 64 --lora_alpha 128 --lora_dropout 0.05 \
    --num_crops 16 \
    --num_generations 8 \
    --max_completion_length 256 \
    --learning_rate 1e-5 \
    --num_train_epochs 1 \
    "$@"
