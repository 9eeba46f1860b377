#!/usr/bin/env bash
# LoRA adapters on the language model, the CLIP vision tower and the projector (--vision_lora), their own weights
# frozen, the vision adapters at a lower learning rate (2U1's finetune_lora_vision.sh). Extra flags are passed on.
#
#   DATA_PATH=data/train.json IMAGE_FOLDER=data/images scripts/finetune_lora_vision.sh
set -euo pipefail

MODEL=${MODEL:-microsoft/Phi-3.5-vision-instruct}
DATA_PATH=${DATA_PATH:-data/train.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-data/images}
OUTPUT_DIR=${OUTPUT_DIR:-output/phi3v_lora_vision}
NUM_GPUS=${NUM_GPUS:-1}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The project's virtual environment unless PYTHON names another interpreter (no activated venv needed).
PYTHON=${PYTHON:-$(if [ -x "$ROOT/.venv/bin/python" ]; then echo "$ROOT/.venv/bin/python"; else echo python3; fi)}

"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NUM_GPUS" "$ROOT/finetune_hf_trainer_custom.py" \
    --model_id "$MODEL" \
    --data_path "$DATA_PATH" \
    --image_folder "$IMAGE_FOLDER" \
    --output_dir "$OUTPUT_DIR" \
    --bf16 \
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
