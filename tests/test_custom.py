"""finetune_hf_trainer_custom.py, phi3v.optim and the scripts/ launchers on a tiny checkpoint and the README's LLaVA
examples. The launcher runs are subprocesses started together (module fixture); option handling, parameter groups and
data errors are checked in-process, which is much cheaper."""

import json
import os
import subprocess
import sys

import pytest
from conftest import finished_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the script is imported as a module for the in-process checks

import finetune_hf_trainer_custom as custom  # noqa: E402
from phi3v.errors import program_name  # noqa: E402

TIMEOUT_S = 300
PAD = type("Processor", (), {"pad_token_id": 32000})()  # all make_trainer needs of a processor here
FAST = ["--num_crops", "1", "--batch_size", "1", "--report_to", "none", "--deepspeed", "none",
        "--dataloader_num_workers", "0", "--save_strategy", "no", "--no-tqdm"]
FRAMES = ["--max_num_frames", "4"]  # fewer than the default 10: faster

# The README's examples (paths relative to --image_folder).
SINGLE_IMAGE = {"id": "cat-1", "image": "cat.jpg", "conversations": [
    {"from": "human", "value": "<image>\nWhat animal is this?"}, {"from": "gpt", "value": "A cat."},
    {"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "Grey."}]}
MULTI_IMAGE = {"id": "pair-1", "image": ["left.jpg", "right.jpg"], "conversations": [
    {"from": "human", "value": "<image>\n<image>\nWhat differs between the two pictures?"},
    {"from": "gpt", "value": "The colour of the car."}]}
VIDEO = {"id": "clip-1", "video": "clip.mp4", "conversations": [
    {"from": "human", "value": "<video>\nWhat happens in this video?"},
    {"from": "gpt", "value": "The screen gets brighter."}]}


def write_video(path, num_frames=12):
    """A small mpeg4 clip that brightens frame by frame."""
    import av
    import numpy as np

    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=12)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for k in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * k, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def write_json(path, records):
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    return str(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """{"model", "media", "train", "eval", "video", "root"}: a tiny checkpoint, the examples' media and data files."""
    from PIL import Image

    from phi3v.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("custom")
    media = root / "media"
    media.mkdir()
    for name, colour in [("cat.jpg", (120, 120, 120)), ("left.jpg", (200, 30, 30)), ("right.jpg", (30, 30, 200))]:
        Image.new("RGB", (64, 48), colour).save(media / name)
    write_video(str(media / "clip.mp4"))
    return {
        "root": root,
        "model": write_tiny_checkpoint(root / "model", num_crops=1),
        "media": str(media),
        "train": write_json(root / "train.json", [SINGLE_IMAGE, MULTI_IMAGE, VIDEO]),
        "eval": write_json(root / "eval.json", [SINGLE_IMAGE, MULTI_IMAGE]),
        "video": write_json(root / "video.json", [VIDEO, VIDEO]),
    }


def subprocess_env(**extra):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_NUM_THREADS="1", PYTHON=sys.executable, **extra)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # torchrun of this venv
    return env


@pytest.fixture(scope="module", autouse=True)
def runs(work):
    """Every launcher started at once, before the first test, so that the in-process tests run while they train;
    {name: (process, output_dir, log_path)}."""
    root = work["root"]
    data = dict(MODEL=work["model"], IMAGE_FOLDER=work["media"])
    planned = {
        "full": (["bash", "scripts/finetune.sh", *FAST, *FRAMES, "--eval_data_path", work["eval"],
                  "--max_new_tokens", "2", "--max_steps", "2", "--logging_steps", "1", "--warmup_steps", "0",
                  "--save_strategy", "steps", "--save_steps", "2"], work["train"]),
        "lora": (["bash", "scripts/finetune_lora.sh", *FAST, *FRAMES, "--max_steps", "1", "--warmup_steps", "0"],
                 work["train"]),
        "lora_vision": (["bash", "scripts/finetune_lora_vision.sh", *FAST, *FRAMES, "--max_steps", "1"], work["train"]),
        # the launcher's own frame count (10)
        "video": (["bash", "scripts/finetune_video.sh", *FAST, "--max_steps", "1", "--eval_data_path", work["video"],
                   "--max_new_tokens", "2"], work["video"]),
    }
    started = {}
    for name, (command, data_path) in planned.items():
        output_dir, log_path = str(root / f"run_{name}"), str(root / f"{name}.log")
        env = subprocess_env(**data, DATA_PATH=data_path, OUTPUT_DIR=output_dir)
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        started[name] = (process, output_dir, log_path)
    yield started
    for process, _, _ in started.values():
        if process.poll() is None:
            process.kill()
            process.wait()


def finished(runs, name):
    """(output_dir, log) of a run that exited 0."""
    process, output_dir, log_path = runs[name]
    log = finished_run(process, log_path, name, TIMEOUT_S)
    return output_dir, log


def parse(work, *flags):
    output_dir = str(work["root"] / "in_process_output")
    return custom.parse(["--model_id", work["model"], "--data_path", work["train"], "--output_dir", output_dir,
                         *FAST, *flags])


def build(work, *flags):
    args, task, training_args = parse(work, *flags)
    return custom.build_model(args, task, training_args), task, training_args


def lora_wrapped(model) -> list[str]:
    """Names of the modules PEFT wrapped, without the PeftModel prefix."""
    return [name.removeprefix("base_model.model.") for name, module in model.named_modules()
            if hasattr(module, "lora_A") and (len(module.lora_A) or len(getattr(module, "lora_embedding_A", {})))]


# ------------------------------------------------------------------------------------------------ optimizer groups
def test_parameter_groups_get_their_learning_rates(work):
    from phi3v.optim import build_optimizer
    from phi3v.training import make_trainer

    model, task, training_args = build(work, "--learning_rate", "2e-4", "--vision_lr", "1e-5",
                                       "--projector_lr", "3e-5", "--wd", "0.1")
    optimizer = build_optimizer(model, training_args, task.vision_lr, task.projector_lr)
    groups = {g["name"]: g for g in optimizer.param_groups}
    print("\n" + "\n".join(f"{n:20s} lr={g['lr']:g} weight_decay={g['weight_decay']:g} "
                           f"params={sum(p.numel() for p in g['params']):,}" for n, g in groups.items()))
    lrs = {"language": 2e-4, "vision": 1e-5, "projector": 3e-5}
    assert set(groups) == {n + s for n in lrs for s in ("", "_no_decay")}
    for name, group in groups.items():
        assert group["lr"] == lrs[name.removesuffix("_no_decay")]
        assert group["weight_decay"] == (0.0 if name.endswith("_no_decay") else 0.1)
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-7

    group_of = {id(p): g["name"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    clip = "model.vision_embed_tokens.img_processor.vision_model."
    expected = {
        clip + "encoder.layers.0.self_attn.q_proj.weight": "vision",
        clip + "encoder.layers.0.self_attn.q_proj.bias": "vision_no_decay",
        clip + "encoder.layers.0.layer_norm1.weight": "vision_no_decay",
        "model.vision_embed_tokens.img_projection.0.weight": "projector",
        "model.vision_embed_tokens.img_projection.2.bias": "projector_no_decay",
        "model.vision_embed_tokens.glb_GN": "projector",
        "model.vision_embed_tokens.sub_GN": "projector",
        "model.embed_tokens.weight": "language",
        "model.layers.1.mlp.down_proj.weight": "language",
        "model.layers.0.input_layernorm.weight": "language_no_decay",
        "model.norm.weight": "language_no_decay",
        "lm_head.weight": "language",
    }
    for name, group in expected.items():
        assert group_of[id(params[name])] == group, name
    # every trainable parameter is in exactly one group; the unused last CLIP layer is frozen and in none
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(map(id, trainable)) == sorted(group_of)
    assert id(params[clip + "encoder.layers.1.mlp.fc1.weight"]) not in group_of

    # the Trainer takes it as is, and decays exactly the parameters its own default optimizer would
    trainer = make_trainer(model, training_args, [None], PAD, optimizers=(optimizer, None),
                           exempt_norms_from_decay=True)
    assert trainer.create_optimizer() is optimizer
    decayed = {n for n, p in model.named_parameters() if p.requires_grad and not group_of[id(p)].endswith("_no_decay")}
    assert decayed == {n for n in trainer.get_decay_parameter_names(model) if params[n].requires_grad}


def test_freeze_flags_leave_groups_out(work):
    from phi3v.optim import build_optimizer

    model, task, training_args = build(work, "--freeze_vision_tower", "--tune_img_projector", "false")
    groups = {g["name"]: g for g in build_optimizer(model, training_args).param_groups}
    # as in 2U1, the image separators (glb_GN, sub_GN: projector group) train in every run without LoRA
    assert set(groups) == {"language", "language_no_decay", "projector"}
    assert sum(p.numel() for p in groups["projector"]["params"]) == 2 * 4 * 32

    model, task, training_args = build(work, "--freeze_llm")
    names = {g["name"] for g in build_optimizer(model, training_args).param_groups}
    assert names == {"vision", "vision_no_decay", "projector", "projector_no_decay"}
    assert not model.lm_head.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad


# ------------------------------------------------------------------------------------------------ LoRA options
def test_default_lora_targets_language_only(work):
    model, _, _ = build(work, "--lora_enable")
    wrapped = lora_wrapped(model)
    assert sorted(wrapped) == sorted(f"model.layers.{i}.{m}" for i in (0, 1) for m in
                                     ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"))
    # 2U1: without --vision_lora the projector (--tune_img_projector) and the CLIP tower train fully, kept in the
    # adapter as PEFT's modules_to_save
    saved = {n.split(".modules_to_save.")[0].removeprefix("base_model.model.") for n, p in model.named_parameters()
             if ".modules_to_save." in n and p.requires_grad}
    assert saved == {"model.vision_embed_tokens.img_projection.0", "model.vision_embed_tokens.img_projection.2",
                     "model.vision_embed_tokens.img_processor.vision_model"}
    args, task, _ = parse(work, "--lora_enable")
    assert (args.lora_rank, task.lora_alpha, args.lora_dropout, args.num_crops) == (128, 256, 0.05, 1)


def test_num_lora_modules_wraps_only_the_last_modules(work):
    # 2U1: the last N linear modules, in the official module order (... projector, decoder layers, lm_head)
    model, _, _ = build(work, "--lora_enable", "--vision_lora", "--num_lora_modules", "1")
    assert lora_wrapped(model) == ["model.layers.1.mlp.down_proj"]
    model, _, _ = build(work, "--lora_enable", "--vision_lora", "--num_lora_modules", "11")
    assert sorted(lora_wrapped(model)) == sorted(
        ["model.vision_embed_tokens.img_projection.0", "model.vision_embed_tokens.img_projection.2"]
        + [f"model.layers.{i}.{m}" for i in (0, 1) for m in
           ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]
        # the 11th from the end is the last CLIP layer's fc2, which never runs: left out
    )


def test_namespan_exclude_is_honoured(work):
    model, _, _ = build(work, "--lora_enable", "--lora_namespan_exclude", "['o_proj']")
    wrapped = lora_wrapped(model)
    assert not any(n.endswith("o_proj") for n in wrapped)
    assert "model.layers.0.self_attn.qkv_proj" in wrapped
    assert {"lm_head", "model.embed_tokens"} <= set(wrapped)  # no longer excluded


def test_embed_tokens_without_lm_head_is_refused(work):
    with pytest.raises(SystemExit) as error:
        parse(work, "--lora_enable", "--lora_namespan_exclude", "['lm_head']")
    assert error.value.code == 2  # argparse's status for a user error; the one line argparse's form:
    assert str(error.value) == f"{program_name()}: error: tuning embed_tokens with LoRA requires lm_head too"


def test_model_id_alias(work):
    args, _, _ = parse(work)
    assert args.model_name_or_path == work["model"]
    args, _, _ = parse(work, "--model_name_or_path", work["model"])
    assert args.model_name_or_path == work["model"]
    with pytest.raises(SystemExit, match="differ"):
        parse(work, "--model_name_or_path", "microsoft/Phi-3.5-vision-instruct")


def bnb_4bit_problem():
    """Why bitsandbytes 4-bit cannot run here, or None (it runs on CPU with bitsandbytes >= 0.48)."""
    import torch

    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, quant_type="nf4", compute_dtype=torch.bfloat16).to("cpu")
        layer(torch.randn(2, 64, dtype=torch.bfloat16))
    except Exception as error:  # any failure means: not on this machine
        return f"{type(error).__name__}: {error}"
    return None


def skip_without_bnb_4bit():
    problem = bnb_4bit_problem()
    if problem:
        print(f"skipped: bitsandbytes 4-bit does not run here ({problem})")
        pytest.skip(f"bitsandbytes 4-bit does not run here ({problem})")


def test_bits_4_trains_a_quantized_base(work, tmp_path):
    skip_without_bnb_4bit()
    import bitsandbytes as bnb

    model, _, _ = build(work, "--lora_enable", "--bits", "4")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    run_main(work, work["train"], tmp_path, "--lora_enable", "--bits", "4", "--max_steps", "1")
    assert os.path.isfile(tmp_path / "adapter_model.safetensors")


# ------------------------------------------------------------------------------------------------ bad input
def bad_data(work, name, bad_record):
    """A data file whose record 1 is bad (record 0 is fine)."""
    return write_json(work["root"] / f"{name}.json", [SINGLE_IMAGE, bad_record])


@pytest.fixture(scope="module")
def bad_files(work):
    media = work["media"]
    (work["root"] / "outside.jpg").write_bytes((work["root"] / "media" / "cat.jpg").read_bytes())
    (work["root"] / "media" / "broken.mp4").write_bytes(b"\x00not a video" * 100)
    cases = {
        "outside": ({**SINGLE_IMAGE, "image": "../outside.jpg"}, "resolves outside the image folder"),
        "both": ({**SINGLE_IMAGE, "video": "clip.mp4"}, "both 'image' and 'video'"),
        "tag_count": ({**MULTI_IMAGE, "conversations": [{"from": "human", "value": "<image>\nWhich?"},
                                                        {"from": "gpt", "value": "Left."}]},
                      "1 <image> tags but 2 images"),
        "broken_video": ({**VIDEO, "video": "broken.mp4"}, "broken.mp4"),
    }
    assert os.path.isdir(media)
    return {name: (bad_data(work, name, record), message) for name, (record, message) in cases.items()}


def run_main(work, data_path, tmp_path, *flags):
    custom.main(["--model_id", work["model"], "--data_path", data_path, "--image_folder", work["media"],
                 "--output_dir", str(tmp_path), *FAST, *FRAMES, "--max_steps", "2", *flags])


@pytest.mark.parametrize("case", ["missing", "outside", "both", "tag_count", "broken_video"])
def test_bad_input_is_a_one_line_error(work, bad_files, tmp_path, case):
    if case == "missing":
        data_path, message, where = str(work["root"] / "nope.json"), "data file not found", "nope.json"
    else:
        data_path, message = bad_files[case]
        where = f"{data_path}[1]"  # the file and the record index
    with pytest.raises(SystemExit) as error:
        run_main(work, data_path, tmp_path)
    text = str(error.value)
    print(text)
    assert error.value.code == 2 and text.startswith(f"{program_name()}: error: ") and "\n" not in text
    assert where in text and message in text


def test_bad_samples_are_skipped_on_request(work, bad_files, tmp_path):
    records = [SINGLE_IMAGE] + [json.load(open(path))[1] for path, _ in bad_files.values()]
    data_path = write_json(tmp_path / "mixed.json", records)
    run_main(work, data_path, tmp_path / "out", "--skip_bad_samples")
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")


# ------------------------------------------------------------------------------------------------ launchers
def test_finetune_sh_full_with_eval_and_group_lrs(runs):
    output_dir, log = finished(runs, "full")
    for name in ("eval_before", "eval_after"):
        with open(os.path.join(output_dir, f"{name}.json")) as f:
            report = json.load(f)
        assert [(p["id"], p["answer"]) for p in report["predictions"]] == [("cat-1", "Grey."),
                                                                          ("pair-1", "The colour of the car.")]
        metric, value, other = custom.score(report["predictions"])  # the numbers are those of the answers written
        assert (report[metric], report["anls"], report["num_samples"]) == (value, other["anls"], 2)
    with open(os.path.join(output_dir, "checkpoint-2", "trainer_state.json")) as f:
        history = [entry for entry in json.load(f)["log_history"] if "loss" in entry]
    assert len(history) == 2
    for entry in history:  # scripts/finetune.sh: lr 2e-5, vision 2e-6, projector 2e-5, one schedule
        assert entry["learning_rate_language"] == pytest.approx(entry["learning_rate"])
        assert entry["learning_rate_vision"] == pytest.approx(entry["learning_rate"] / 10)
        assert entry["learning_rate_projector"] == pytest.approx(entry["learning_rate"])
    assert history[0]["learning_rate_vision"] == pytest.approx(2e-6)
    assert os.path.isfile(os.path.join(output_dir, "model.safetensors"))


def test_finetune_lora_sh_then_merge_lora_sh(runs, work, tmp_path):
    import torch
    from peft import PeftModel
    from PIL import Image
    from safetensors.torch import load_file

    from phi3v import Phi3VForCausalLM, Phi3VProcessor

    adapter_dir, _ = finished(runs, "lora")
    assert os.path.isfile(os.path.join(adapter_dir, "adapter_config.json"))
    weights = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # it learnt: the merge matters

    merged_dir = str(tmp_path / "merged")
    result = subprocess.run(["bash", "scripts/merge_lora.sh", "--dtype", "float32"], cwd=ROOT, capture_output=True,
                            text=True, timeout=TIMEOUT_S,
                            env=subprocess_env(ADAPTER_DIR=adapter_dir, OUTPUT_DIR=merged_dir))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert os.path.isfile(os.path.join(merged_dir, "preprocessor_config.json"))

    merged = Phi3VForCausalLM.from_pretrained(merged_dir).eval()
    adapted = PeftModel.from_pretrained(Phi3VForCausalLM.from_pretrained(work["model"]), adapter_dir).eval()
    processor = Phi3VProcessor.from_pretrained(merged_dir)
    prompt = processor.apply_chat_template([{"role": "user", "content": "<|image_1|>\nWhat is shown?"}],
                                           add_generation_prompt=True)
    inputs = processor(prompt, [Image.new("RGB", (64, 48), (200, 30, 30))], num_crops=1)
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapted(**inputs).logits, atol=1e-4, rtol=1e-4)


def test_finetune_lora_vision_sh(runs):
    output_dir, _ = finished(runs, "lora_vision")
    with open(os.path.join(output_dir, "adapter_config.json")) as f:
        targets = json.load(f)["target_modules"]
    assert any("img_processor" in t for t in targets) and any("qkv_proj" in t for t in targets)


def test_finetune_video_sh(runs, work):
    """scripts/finetune_video.sh: its settings reach the recipe (10 frames a video, the vision tower frozen, 2e-5 for
    the language model and the projector), everything but the CLIP tower trains, and the run evaluates the videos."""
    from phi3v import Phi3VForCausalLM

    output_dir, log = finished(runs, "video")
    with open(os.path.join(output_dir, "run_config.json")) as f:
        config = json.load(f)
    task = config["task_args"]
    assert (task["max_num_frames"], task["freeze_vision_tower"], task["projector_lr"]) == (10, True, 2e-5)
    assert config["training_args"]["learning_rate"] == 2e-5
    parameters = dict(Phi3VForCausalLM.from_pretrained(work["model"]).named_parameters())
    trainable = sum(p.numel() for name, p in parameters.items() if ".img_processor." not in name)
    total = sum(p.numel() for p in parameters.values())
    assert f"trainable parameters: {trainable:,} of {total:,} " in log, log[-3000:]
    groups = sorted(line.split("optimizer group ")[1].split()[0] for line in log.splitlines()
                    if "optimizer group " in line)
    assert groups == ["language", "language_no_decay", "projector", "projector_no_decay"]  # no vision group
    for name in ("eval_before", "eval_after"):
        with open(os.path.join(output_dir, f"{name}.json")) as f:
            report = json.load(f)
        assert [(p["id"], p["answer"]) for p in report["predictions"]] == [("clip-1", "The screen gets brighter.")] * 2
        metric, value, other = custom.score(report["predictions"])
        assert (report[metric], report["anls"]) == (value, other["anls"])
    assert os.path.isfile(os.path.join(output_dir, "model.safetensors"))
