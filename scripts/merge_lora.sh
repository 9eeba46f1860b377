#!/usr/bin/env bash
# Merge a LoRA adapter (the OUTPUT_DIR of finetune_lora*.sh) into its base model and save the full model, with the
# processor files, in the official layout. BASE_MODEL defaults to the base named in the adapter's config.
#
#   ADAPTER_DIR=output/phi3v_lora OUTPUT_DIR=output/phi3v_lora_merged scripts/merge_lora.sh
set -euo pipefail

ADAPTER_DIR=${ADAPTER_DIR:-output/phi3v_lora}
OUTPUT_DIR=${OUTPUT_DIR:-${ADAPTER_DIR}_merged}
BASE_MODEL=${BASE_MODEL:-}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # ROOT, PYTHON

"$PYTHON" "$ROOT/scripts/merge_lora.py" \
    --adapter_dir "$ADAPTER_DIR" \
    --output_dir "$OUTPUT_DIR" \
    ${BASE_MODEL:+--base_model "$BASE_MODEL"} \
    "$@"
