"""Merge a LoRA adapter into its base model and save the full model in the official layout, with processor files.

The base is loaded unquantized (also for adapters trained with --bits 4 / 8: merging into quantized weights would
lose precision), the adapter applied and folded in (merge_and_unload). The processor comes from the adapter folder
when the run saved one there (it holds the run's num_crops), else from the base.

    python scripts/merge_lora.py --adapter_dir output/phi3v_lora --output_dir output/phi3v_lora_merged
"""

import argparse
import os

import torch

from phi3v import Phi3VForCausalLM, Phi3VProcessor
from phi3v.errors import exit_with_error
from phi3v.model_setup import load_adapter, recorded_base_model

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def base_model_of(adapter_dir: str) -> str:
    """The base model named in the adapter's adapter_config.json."""
    try:
        base = recorded_base_model(adapter_dir)
    except FileNotFoundError as error:
        exit_with_error(error)
    if not base:
        exit_with_error(f"{os.path.join(adapter_dir, 'adapter_config.json')} does not name its base model; "
                        "pass --base_model")
    return base


def merge(adapter_dir: str, output_dir: str, base_model: str | None = None, dtype: str = "bfloat16") -> str:
    base_model = base_model or base_model_of(adapter_dir)
    model = Phi3VForCausalLM.from_pretrained(base_model, dtype=DTYPES[dtype])
    merged = load_adapter(model, adapter_dir).merge_and_unload()  # refuses an adapter of another base model
    merged.save_pretrained(output_dir)
    has_processor = os.path.isfile(os.path.join(adapter_dir, "preprocessor_config.json"))
    Phi3VProcessor.from_pretrained(adapter_dir if has_processor else base_model).save_pretrained(output_dir)
    return output_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--adapter_dir", required=True, help="folder with adapter_config.json (a LoRA run's output)")
    parser.add_argument("--output_dir", required=True, help="where the merged model goes")
    parser.add_argument("--base_model", default=None, help="default: base_model_name_or_path of the adapter config")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of the merged weights")
    args = parser.parse_args()
    try:  # an adapter of another base model, a missing folder: one line, nothing written
        merge(args.adapter_dir, args.output_dir, args.base_model, args.dtype)
    except (FileNotFoundError, ValueError) as error:
        exit_with_error(error)  # `merge_lora.py: error: ...`, exit status 2, as every entry point (phi3v.errors)
    print(f"merged model saved to {args.output_dir}")


if __name__ == "__main__":
    main()
