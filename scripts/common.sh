# Sourced by scripts/finetune*.sh: the interpreter, the model, the GPU count, and the launch of a recipe
# (finetune_hf_trainer_custom.py, _dpo.py, _grpo.py) with the data flags every launcher passes. Each variable can
# be set from outside.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The project's virtual environment unless PYTHON names another interpreter (no activated venv needed).
PYTHON=${PYTHON:-$(if [ -x "$ROOT/.venv/bin/python" ]; then echo "$ROOT/.venv/bin/python"; else echo python3; fi)}
MODEL=${MODEL:-microsoft/Phi-3.5-vision-instruct}
NUM_GPUS=${NUM_GPUS:-1}

# run_recipe SCRIPT FLAG...: torchrun (--standalone: a free rendezvous port, so two runs on one host do not collide)
# of a community-flag recipe (custom, DPO, GRPO) on $DATA_PATH / $IMAGE_FOLDER, writing $OUTPUT_DIR, in bf16, with
# the launcher's flags.
run_recipe() {
    local script="$1"
    shift
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NUM_GPUS" \
        "$ROOT/$script" \
        --model_id "$MODEL" \
        --data_path "$DATA_PATH" \
        --image_folder "$IMAGE_FOLDER" \
        --output_dir "$OUTPUT_DIR" \
        --bf16 \
        "$@"
}

run_custom_recipe() { run_recipe finetune_hf_trainer_custom.py "$@"; }
