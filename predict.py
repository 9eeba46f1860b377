"""Use a fine-tuned Phi-3.5-vision: answer one prompt (streamed), or every record of a data file (scored).

The model is any of: a run's --output_dir (full fine-tuning, or a LoRA adapter: its base model comes from the
adapter's adapter_config.json, or --base_model), the merged model of a LoRA run (<output_dir>/merged), a checkpoint
folder, or the base model itself (hub id or folder).

    # one prompt about one or more images, or about a video's frames; the answer is streamed to stdout
    python predict.py --model output --prompt "Is this meme hateful?" --image meme.jpg
    python predict.py --model output --prompt "Which is bigger?" --image a.jpg --image b.png
    python predict.py --model output --prompt "What is the person doing?" --video clip.mp4 --num_frames 8

    # every record of a project-format jsonl (or LLaVA JSON): predictions.jsonl, and the metric of the answers
    python predict.py --model output --jsonl data/test.jsonl --metric accuracy --output predictions.jsonl

Images without tags in the prompt are put in front of it (<|image_1|>, <|image_2|>, ... in the order given).
Generation is greedy and stops at the end of the assistant turn.
"""

import argparse
import json
import os

from phi3v.errors import exit_on_input_error, exit_with_error
from phi3v.evaluation import generate_answers

# Loading, prompt building (LLaVA <image> tags too) and generation: one path shared with serve.py (the chat page).
from phi3v.inference import (
    DTYPES,
    GenerationSettings,
    RecordPrompts,
    answer,
    conversation,
    load_for_inference,
    pick_device_and_dtype,
    text_streamer,
)
from phi3v.media import check_media, open_image
from phi3v.metrics import gold_choice_accuracy, mean_anls, mean_exact_match
from phi3v.records import load_records


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model", "--model_name_or_path", dest="model", default="microsoft/Phi-3.5-vision-instruct",
                        help="fine-tuned output folder (full model or LoRA adapter), merged model, or base model")
    parser.add_argument("--base_model", help="base model of a LoRA adapter (default: the adapter's own record of it)")
    single = parser.add_argument_group("one prompt (streamed)")
    single.add_argument("--prompt", help="the question; <|image_k|> tags are added in front when it has none")
    single.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    single.add_argument("--video", help="a video file; --num_frames evenly spaced frames become the images")
    single.add_argument("--num_frames", type=int, default=8,
                        help="frames sampled from a video, at most (also for video records of --jsonl)")
    single.add_argument("--system", help="an optional system message")
    batch = parser.add_argument_group("a data file (batched, scored)")
    batch.add_argument("--jsonl", help="records in the project's jsonl format or LLaVA JSON")
    batch.add_argument("--image_folder", help="root of the relative image paths (default: images/ beside the file)")
    batch.add_argument("--output", default="predictions.jsonl", help="one line per record: id, prediction, answer")
    batch.add_argument("--metric", choices=["accuracy", "anls", "exact", "none"], default="exact",
                       help="accuracy: answers parsed onto the set of gold answers; anls: DocVQA's; "
                            "exact: exact match, ignoring case, whitespace runs and end periods")
    batch.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_crops", type=int, help="max 336px crops per image (default: the processor's)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--use_flash_attention", action="store_true", help="flash-attn 2 if installed, else SDPA")
    args = parser.parse_args(argv)
    if (args.prompt is None) == (args.jsonl is None):
        parser.error("give either --prompt (with --image / --video) or --jsonl")
    if args.image and args.video:
        parser.error("give --image or --video, not both")
    if args.jsonl is None and (args.image_folder or args.metric != "exact"):
        parser.error("--image_folder and --metric go with --jsonl")
    return args


# ------------------------------------------------------------------------------------------------ one prompt
def read_images(args) -> list:
    """The --image files, or --num_frames evenly spaced frames of the --video, as RGB images."""
    if args.video:
        from phi3v.video import read_video_frames

        return [open_image(frame, args.video) for frame in read_video_frames(args.video, args.num_frames, True)]
    return [open_image(path, "--image") for path in args.image]


def stream_answer(model, processor, images, args) -> str:
    """The greedy answer to --prompt about `images`, streamed to stdout as it is generated."""
    messages = conversation([(args.prompt, len(images), None)], args.system)  # <image> tags: user_message
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, num_crops=args.num_crops)
    return answer(model, processor, messages, images, settings, text_streamer(processor))


# ------------------------------------------------------------------------------------------------ a data file
def read_records(args) -> list[dict]:
    """The --jsonl records (media paths relative to --image_folder, default images/ beside the file, for LLaVA
    JSON as for the project's jsonl), their image and video files checked before the model loads."""
    folder = args.image_folder or os.path.join(os.path.dirname(os.path.abspath(args.jsonl)), "images")
    return check_media(load_records(args.jsonl, folder))


def score(predictions, metric) -> float:
    """The metric of the predictions against their records' answers (the last assistant turn of each)."""
    if metric == "accuracy":  # as the classification recipes: parse each prediction onto the set of gold answers
        return gold_choice_accuracy(predictions)
    texts, golds = [p["prediction"] for p in predictions], [p.get("answers") or [p["answer"]] for p in predictions]
    return (mean_anls if metric == "anls" else mean_exact_match)(texts, golds)


def predict_file(model, processor, records, args) -> dict:
    prompts = RecordPrompts(records, processor, num_crops=args.num_crops, max_num_frames=args.num_frames)
    predictions = generate_answers(model, processor, prompts, args.batch_size, args.max_new_tokens,
                                   num_crops=args.num_crops, description="predict")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        for item in predictions:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    print(f"wrote {len(predictions)} predictions to {args.output}")
    if args.metric == "none":
        return {}
    result = {args.metric: score(predictions, args.metric), "num_samples": len(predictions),
              "model": args.model, "data": args.jsonl}
    metrics_path = os.path.splitext(args.output)[0] + "_metrics.json"
    with open(metrics_path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"{args.metric} = {result[args.metric]:.4f} on {len(predictions)} samples (written to {metrics_path})")
    return result


def main(argv=None):
    args = parse_args(argv)
    device, dtype = pick_device_and_dtype(args.device, args.dtype)
    try:  # bad inputs and model folders fail here, before any generation, with a one-line error
        inputs = read_records(args) if args.jsonl else read_images(args)
        model, processor = load_for_inference(args.model, args.base_model, dtype, device, args.use_flash_attention)
    except (FileNotFoundError, ValueError) as error:  # BadSampleError and VideoError are ValueErrors
        exit_with_error(error)  # `predict.py: error: ...`, exit status 2, as every entry point (phi3v.errors)
    if args.jsonl:
        return exit_on_input_error(predict_file)(model, processor, inputs, args)  # a record that does not read
    try:
        return stream_answer(model, processor, inputs, args)
    except ValueError as error:  # image tags that do not match the images, a prompt over the model's limit
        exit_with_error(error)


if __name__ == "__main__":
    main()
