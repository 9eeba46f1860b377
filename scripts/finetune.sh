#!/usr/bin/env bash
# Full fine-tuning on LLaVA-format data: language model, projector and vision tower all trained, the vision tower
# at a 10x lower learning rate. Any finetune_hf_trainer_custom.py flag can be added (or overridden) at the end:
#
#   DATA_PATH=data/train.json IMAGE_FOLDER=data/images NUM_GPUS=8 scripts/finetune.sh --num_train_epochs 2
set -euo pipefail

MODEL=${MODEL:-microsoft/Phi-3.5-vision-instruct}
DATA_PATH=${DATA_PATH:-data/train.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-data/images}
OUTPUT_DIR=${OUTPUT_DIR:-output/phi3v_full}
NUM_GPUS=${NUM_GPUS:-1}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The project's virtual environment unless PYTHON names another interpreter (no activated venv needed).
PYTHON=${PYTHON:-$(if [ -x "$ROOT/.venv/bin/python" ]; then echo "$ROOT/.venv/bin/python"; else echo python3; fi)}

# --standalone: a free rendezvous port on this machine, so two runs on one host do not collide.
"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NUM_GPUS" "$ROOT/finetune_hf_trainer_custom.py" \
    --model_id "$MODEL" \
    --data_path "$DATA_PATH" \
    --image_folder "$IMAGE_FOLDER" \
    --output_dir "$OUTPUT_DIR" \
    --bf16 \
    --num_crops 16 \
    --learning_rate 2e-5 \
    --vision_lr 2e-6 \
    --projector_lr 2e-5 \
    --num_train_epochs 1 \
    "$@"
