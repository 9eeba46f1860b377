"""Every flag means what its users already know it to mean (issue 16).

* the community recipe's (2U1/Phi3-Vision-Finetune) scripts' exact flag sets train, in finetune_hf_trainer_custom.py,
  the parts they train in 2U1; the expected sets are written out here from 2U1's train.py rules (configure_llm,
  configure_vision_tower, find_target_linear_names), not derived from the code under test;
* the shared parser: no abbreviations, `--flag=value` like `--flag value`, the flags transformers 5 renamed or dropped;
* bad input ends in one line that names the flag, file, line or sample.

In-process on the tiny checkpoint (2 decoder layers; CLIP 2 layers, of which the first is the feature layer).
"""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import finetune_hf_trainer_custom as custom  # noqa: E402
import phi3v.training  # noqa: E402
from phi3v.arguments import parse_args  # noqa: E402
from phi3v.errors import InputError, program_name  # noqa: E402

FAST = ["--num_crops", "1", "--report_to", "none", "--deepspeed", "none", "--dataloader_num_workers", "0",
        "--save_strategy", "no", "--no-tqdm"]
RECORD = {"id": "cat-1", "image": "cat.jpg", "conversations": [
    {"from": "human", "value": "<image>\nWhat animal is this?"}, {"from": "gpt", "value": "A cat."}]}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from PIL import Image

    from phi3v.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("flags")
    (root / "media").mkdir()
    Image.new("RGB", (64, 48), (120, 120, 120)).save(root / "media" / "cat.jpg")
    data = root / "train.json"
    data.write_text(json.dumps([RECORD, RECORD]))
    return {"root": root, "model": write_tiny_checkpoint(root / "model", num_crops=1), "media": str(root / "media"),
            "data": str(data)}


def custom_parse(work, *flags):
    return custom.parse(["--model_id", work["model"], "--data_path", work["data"], "--image_folder", work["media"],
                         "--output_dir", str(work["root"] / "out"), *flags])


def error_line(call) -> str:
    """The message an entry point exits with, from "error: " on: checked to be the one line `<script>: error: ...`
    with exit status 2, argparse's way (phi3v.errors)."""
    with pytest.raises(SystemExit) as error:
        call()
    text = str(error.value)
    print(text)
    assert error.value.code == 2
    assert "\n" not in text and text.startswith(f"{program_name()}: error: ")
    return text.removeprefix(f"{program_name()}: ")


# ------------------------------------------------------------------------------------------------ 2U1's rules
CLIP = "model.vision_embed_tokens.img_processor.vision_model"
PROJECTION = "model.vision_embed_tokens.img_projection"
LLM_LINEAR = [f"model.layers.{i}.{m}" for i in range(2)
              for m in ("self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj")]
CLIP_LINEAR = [f"{CLIP}.encoder.layers.{i}.{m}" for i in range(2)
               for m in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj",
                         "mlp.fc1", "mlp.fc2")]
# The nn.Linear / nn.Embedding modules of the tiny model in the official checkpoint's module order (Phi3VModel
# registers embed_tokens, vision_embed_tokens, layers, norm; then lm_head): what 2U1's find_target_linear_names walks.
OFFICIAL_LINEAR = ["model.embed_tokens", f"{CLIP}.embeddings.position_embedding", *CLIP_LINEAR, f"{PROJECTION}.0",
                   f"{PROJECTION}.2", *LLM_LINEAR, "lm_head"]
# The CLIP layer after the feature layer (layer_idx -2) and post_layernorm never run: this package keeps them frozen
# (DDP would wait for their gradients); 2U1 marks them trainable, but they never get a gradient there either.
NEVER_RUN = (f"{CLIP}.encoder.layers.1.", f"{CLIP}.post_layernorm.")


def find_target_linear_names_2u1(exclude, num_lora_modules, vision_lora) -> list[str]:
    """2U1's train.py: without --vision_lora, "vision_model" and "img_projection" join the exclusions;
    'embed_tokens' there means model.embed_tokens; a module is out when an exclusion is a substring of its name;
    num_lora_modules > 0 keeps the last N."""
    exclude = ["model.embed_tokens" if e == "embed_tokens" else e for e in exclude]
    if not vision_lora:
        exclude += ["vision_model", "img_projection"]
    names = [n for n in OFFICIAL_LINEAR if not any(e in n for e in exclude)]
    return names[-num_lora_modules:] if num_lora_modules > 0 else names


def expected_2u1(all_parameters, lora_enable, vision_lora, freeze_llm, freeze_vision_tower, tune_img_projector,
                 exclude=("lm_head", "embed_tokens"), num_lora_modules=-1) -> set:
    """What 2U1 trains: {("full", parameter name)} and {("lora", module name)} (the module's adapters)."""
    def part(name):
        if name.startswith(CLIP):
            return "vision"
        if name.startswith(PROJECTION):
            return "projector"
        if name.endswith(("glb_GN", "sub_GN")):
            return "separator"  # touched by neither configure_llm nor configure_vision_tower
        return "language"

    if lora_enable:
        assert freeze_llm, "2U1 raises ValueError: lora_enable needs freeze_llm"
        assert not vision_lora or freeze_vision_tower, "2U1 raises ValueError: vision_lora needs freeze_vision_tower"
        # get_peft_model freezes every base weight; configure_vision_tower (only without vision_lora) re-enables
        full = set() if vision_lora else ({"vision"} if not freeze_vision_tower else set()) | (
            {"projector"} if tune_img_projector else set())
        targets = find_target_linear_names_2u1(list(exclude), num_lora_modules, vision_lora)
    else:
        full = {"separator"} | ({"language"} if not freeze_llm else set()) | (
            {"vision"} if not freeze_vision_tower else set()) | ({"projector"} if tune_img_projector else set())
        targets = []
    expected = {("full", n) for n in all_parameters if part(n) in full}
    expected |= {("lora", n) for n in targets}
    return {(kind, n) for kind, n in expected if not (n + ".").startswith(NEVER_RUN)}


def trained(model) -> set:
    """{("full", parameter name)} | {("lora", module name)} of what `model` trains, in the official names."""
    found = set()
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        name = name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
        if ".lora_" in name:
            found.add(("lora", name.split(".lora_")[0]))
        else:
            found.add(("full", name.replace(".base_layer", "")))
    return found


# 2U1's scripts (scripts/finetune*.sh of 2U1/Phi3-Vision-Finetune), their flags as written there; only the paths,
# the DeepSpeed config (scripts/zero3.json is 2U1's file) and the batch sizes (to keep this test small) differ.
COMMON_2U1 = ["--bf16", "True", "--fp16", "False", "--disable_flash_attn2", "False", "--num_train_epochs", "1",
              "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1", "--weight_decay", "0.",
              "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--tf32", "True",
              "--gradient_checkpointing", "True", "--report_to", "tensorboard", "--lazy_preprocess", "True",
              "--save_strategy", "steps", "--save_steps", "200", "--save_total_limit", "10",
              "--dataloader_num_workers", "4", "--deepspeed", "none"]
LORA_2U1 = ["--lora_rank", "128", "--lora_alpha", "256", "--lora_dropout", "0.05", "--num_lora_modules", "-1",
            "--use_dora", "False", "--lora_namespan_exclude", "['lm_head', 'embed_tokens']"]
FLAG_SETS_2U1 = {
    "finetune.sh": ["--tune_img_projector", "True", "--freeze_vision_tower", "False", "--freeze_llm", "False",
                    "--num_crops", "16", "--learning_rate", "2e-5", "--projector_lr", "2e-5", "--vision_lr", "2e-6"],
    "finetune_lora.sh": ["--lora_enable", "True", *LORA_2U1, "--tune_img_projector", "True",
                         "--freeze_vision_tower", "False", "--freeze_llm", "True", "--num_crops", "16",
                         "--learning_rate", "2e-4", "--projector_lr", "2e-5", "--vision_lr", "2e-6"],
    "finetune_lora_vision.sh": ["--lora_enable", "True", "--vision_lora", "True", *LORA_2U1,
                                "--tune_img_projector", "True", "--freeze_vision_tower", "True", "--freeze_llm",
                                "True", "--num_crops", "16", "--learning_rate", "2e-4", "--projector_lr", "2e-5",
                                "--vision_lr", "2e-6"],
    "finetune_video.sh": ["--tune_img_projector", "True", "--freeze_vision_tower", "False", "--freeze_llm", "False",
                          "--num_crops", "4", "--max_num_frames", "10", "--learning_rate", "2e-5",
                          "--projector_lr", "2e-5", "--vision_lr", "2e-6"],
}
FLAG_SETS_2U1 = {script: flags + COMMON_2U1 for script, flags in FLAG_SETS_2U1.items()}
# The README's table, row by row: what each flag set trains in 2U1.
SETTINGS_2U1 = {
    "finetune.sh": dict(lora_enable=False, vision_lora=False, freeze_llm=False, freeze_vision_tower=False,
                        tune_img_projector=True),
    "finetune_lora.sh": dict(lora_enable=True, vision_lora=False, freeze_llm=True, freeze_vision_tower=False,
                             tune_img_projector=True),
    "finetune_lora_vision.sh": dict(lora_enable=True, vision_lora=True, freeze_llm=True, freeze_vision_tower=True,
                                    tune_img_projector=True),
    "finetune_video.sh": dict(lora_enable=False, vision_lora=False, freeze_llm=False, freeze_vision_tower=False,
                              tune_img_projector=True),
}


@pytest.mark.parametrize("script", list(FLAG_SETS_2U1))
def test_2u1_flag_sets_train_what_they_train_in_2u1(work, script, caplog):
    from phi3v import Phi3VForCausalLM

    all_parameters = [n for n, _ in Phi3VForCausalLM.from_pretrained(work["model"]).named_parameters()]
    with caplog.at_level(logging.WARNING):
        args, task, training_args = custom_parse(work, *FLAG_SETS_2U1[script])
    # the flags transformers 5 dropped or renamed mean what they meant
    assert training_args.warmup_steps == 0.03 and training_args.get_warmup_steps(1000) == 30
    assert training_args.activation_checkpointing is True and training_args.weight_decay == 0.0
    assert training_args.tf32 is None and "--tf32: TF32 needs an NVIDIA GPU" in caplog.text  # CPU: one clear line
    model = custom.build_model(args, task, training_args)
    expected = expected_2u1(all_parameters, **SETTINGS_2U1[script])
    found = trained(model)
    print(f"\n{script}: {len(found)} trained ({sum(k == 'lora' for k, _ in found)} LoRA-adapted modules)")
    assert found == expected, (sorted(found - expected)[:5], sorted(expected - found)[:5])
    if task.lora_enable:  # the adapters are LoRA (not DoRA) with 2U1's rank and alpha
        config = model.peft_config["default"]
        assert (config.r, config.lora_alpha, config.lora_dropout, config.use_dora) == (128, 256, 0.05, False)


def test_2u1_lora_flag_set_trains_the_language_model_adapters(work):
    """The issue's worst case: 2U1's finetune_lora.sh set used to train only 20,480 projector-LoRA parameters."""
    args, task, training_args = custom_parse(work, *FLAG_SETS_2U1["finetune_lora.sh"], "--bf16", "False")
    model = custom.build_model(args, task, training_args)
    adapted = {n for kind, n in trained(model) if kind == "lora"}
    assert adapted == set(LLM_LINEAR)


@pytest.mark.parametrize("flags, settings", [
    (["--lora_enable", "--num_lora_modules", "3"], dict(num_lora_modules=3)),
    (["--lora_enable", "--vision_lora", "--num_lora_modules", "12"], dict(vision_lora=True, num_lora_modules=12)),
    (["--lora_enable", "--lora_namespan_exclude", "['embed_tokens', 'lm_head', 'self_attn']"],
     dict(exclude=("embed_tokens", "lm_head", "self_attn"))),
    (["--lora_enable", "--lora_namespan_exclude", "[]", "--num_lora_modules", "2"],
     dict(exclude=(), num_lora_modules=2)),
    (["--lora_enable", "--freeze_vision_tower", "--tune_img_projector", "False"],
     dict(freeze_vision_tower=True, tune_img_projector=False)),
    (["--freeze_llm", "--tune_img_projector", "False"], dict(lora_enable=False, tune_img_projector=False)),
])
def test_lora_options_follow_2u1(work, flags, settings):
    from phi3v import Phi3VForCausalLM

    all_parameters = [n for n, _ in Phi3VForCausalLM.from_pretrained(work["model"]).named_parameters()]
    rules = dict(lora_enable=True, vision_lora=False, freeze_llm=True, freeze_vision_tower=False,
                 tune_img_projector=True)
    rules.update(settings)
    if rules["vision_lora"]:
        rules["freeze_vision_tower"] = True
    args, task, training_args = custom_parse(work, *FAST, *flags)
    assert trained(custom.build_model(args, task, training_args)) == expected_2u1(all_parameters, **rules)


def test_2u1_refusals_are_one_line(work):
    assert error_line(lambda: custom_parse(work, "--lora_enable", "--freeze_llm", "False")) == (
        "error: --lora_enable trains LoRA adapters on the frozen language model (2U1 requires --freeze_llm True with "
        "it); drop --freeze_llm False, or drop --lora_enable to train the whole language model")
    assert error_line(lambda: custom_parse(work, "--lora_enable", "--vision_lora", "--freeze_vision_tower", "False")) \
        == ("error: --vision_lora trains LoRA adapters on the frozen vision tower (2U1 requires --freeze_vision_tower "
            "True with it); drop --freeze_vision_tower False, or drop --vision_lora to train the whole tower")
    assert error_line(lambda: custom_parse(work, "--vision_lora")) == "error: --vision_lora needs --lora_enable"


@pytest.mark.parametrize("flags, message", [
    (["--lora_alpha_ratio", "0.25"], "error: --lora_alpha_ratio is a flag of the four task recipes, not of "
                                     "finetune_hf_trainer_custom.py; use --lora_alpha (LoRA alpha itself, not a "
                                     "ratio)"),
    (["--lora_alpa", "16"], "error: unknown flag --lora_alpa: did you mean --lora_alpha?"),
    (["--freeze_vision_model"], "error: --freeze_vision_model is a flag of the four task recipes, not of "
                                "finetune_hf_trainer_custom.py; use --freeze_vision_tower"),
    # given with its default value, a task recipe's flag is refused all the same
    (["--use_lora", "False"], "error: --use_lora is a flag of the four task recipes, not of "
                              "finetune_hf_trainer_custom.py; use --lora_enable"),
    (["--lora_enable", "--lora_bias", "some"], "error: --lora_bias must be none, all or lora_only, got 'some'"),
])
def test_custom_flag_errors(work, flags, message):
    assert error_line(lambda: custom_parse(work, *FAST, *flags)) == message


def test_lora_with_nothing_to_wrap_names_the_flags(work):
    args, task, training_args = custom_parse(work, *FAST, "--lora_enable", "--lora_namespan_exclude",
                                             "['layers', 'lm_head', 'embed_tokens']")
    assert error_line(lambda: custom.build_model(args, task, training_args)) == (
        "error: --lora_enable: no module left for LoRA to wrap: --lora_namespan_exclude ['layers', 'lm_head', "
        "'embed_tokens'] excluded them all (without --vision_lora the vision tower and projector are no LoRA "
        "targets)")


def test_dora_bias_and_quantization_flags_reach_peft_and_bitsandbytes(work, monkeypatch):
    args, task, training_args = custom_parse(work, *FAST, "--lora_enable", "--use_dora")
    model = custom.build_model(args, task, training_args)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert model.peft_config["default"].use_dora
    assert "base_model.model.model.layers.0.self_attn.qkv_proj.lora_magnitude_vector.default.weight" in names

    def trained_biases(*flags):
        args, task, training_args = custom_parse(work, *FAST, "--lora_enable", "--vision_lora", *flags)
        model = custom.build_model(args, task, training_args)
        return {n.removeprefix("base_model.model.").replace(".base_layer", "") for n, p in model.named_parameters()
                if p.requires_grad and n.endswith(".bias")}

    assert trained_biases() == set()
    # --lora_bias all: every bias trains (Phi-3's decoder has none; CLIP's used layer and the projector have)
    from phi3v import Phi3VForCausalLM

    assert trained_biases("--lora_bias", "all") == {
        n for n, _ in Phi3VForCausalLM.from_pretrained(work["model"]).named_parameters() if n.endswith(".bias")
        and (n.startswith(f"{CLIP}.encoder.layers.0.") or n.startswith(f"{CLIP}.pre_layrnorm") or
             n.startswith(PROJECTION))}

    seen = {}

    def fake_load_model(path, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(phi3v.training, "load_model", fake_load_model)  # the set-up both recipe families share
    args, task, training_args = custom_parse(work, *FAST, "--lora_enable", "--bits", "4", "--quant_type", "fp4",
                                             "--double_quant", "False", "--cache_dir", str(work["root"] / "cache"))
    with pytest.raises(RuntimeError, match="stop here"):
        custom.build_model(args, task, training_args)
    assert (seen["bits"], seen["quant_type"], seen["double_quant"], seen["cache_dir"]) == (
        4, "fp4", False, str(work["root"] / "cache"))
    assert {"model.vision_embed_tokens.img_projection", "model.vision_embed_tokens.img_processor"} <= set(
        seen["skip_modules"])  # as 2U1: CLIP and the projector are not quantized


def test_task_recipes_use_dora_too(tiny_checkpoint, tmp_path):
    from phi3v.training import model_for_training

    args, _, training_args = parse_args(argv=["--model_name_or_path", tiny_checkpoint, "--output_dir", str(tmp_path),
                                              "--use_lora", "--use_dora", *FAST])
    model = model_for_training(args, training_args)
    assert model.peft_config["default"].use_dora
    assert any("lora_magnitude_vector" in n for n, p in model.named_parameters() if p.requires_grad)


def test_lora_weight_path_starts_from_saved_adapters(work, tmp_path):
    args, task, training_args = custom_parse(work, *FAST, "--lora_enable", "--seed", "1")
    first = custom.build_model(args, task, training_args)
    with torch.no_grad():
        for name, parameter in first.named_parameters():
            if "lora_B" in name:
                parameter.fill_(0.5)
    first.save_pretrained(tmp_path / "adapter")
    args, task, training_args = custom_parse(work, *FAST, "--lora_enable", "--seed", "2",
                                             "--lora_weight_path", str(tmp_path / "adapter"))
    second = custom.build_model(args, task, training_args)
    a, b = dict(first.named_parameters()), dict(second.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a if ".lora_" in n)
    args, task, training_args = custom_parse(work, *FAST, "--lora_enable", "--lora_rank", "8",
                                             "--lora_weight_path", str(tmp_path / "adapter"))
    assert error_line(lambda: custom.build_model(args, task, training_args)) == (
        f"error: --lora_weight_path {tmp_path / 'adapter'}: its adapter does not match this run's LoRA settings "
        "(targets, rank, --vision_lora, --freeze_vision_tower, --tune_img_projector), first "
        "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight: (128, 64) there, (8, 64) here")


# ------------------------------------------------------------------------------------------------ the shared parser
def test_no_abbreviations_lora_alpha_in_task_recipes():
    with pytest.raises(InputError) as error:
        parse_args(argv=["--use_lora", "--lora_rank", "64", "--lora_alpha", "16"])
    assert str(error.value) == ("unknown flag --lora_alpha: this recipe sets LoRA alpha as --lora_alpha_ratio x "
                                "--lora_rank (alpha 16 at rank 64 is --lora_alpha_ratio 0.25)")
    with pytest.raises(InputError, match=r"^unknown flag --learning_rat: did you mean --learning_rate\?$"):
        parse_args(argv=["--learning_rat", "1e-4"])
    with pytest.raises(InputError, match=r"^unknown flag --num_crop: did you mean --num_crops\?$"):
        parse_args(argv=["--num_crop", "4"])


@pytest.mark.parametrize("spelling", ["separate", "equals"])
def test_flag_equals_value_is_the_same_flag(spelling):
    pairs = [("--deepspeed", "none"), ("--per_device_train_batch_size", "2"), ("--batch_size", "8")]
    argv = [token for flag, value in pairs for token in ([flag, value] if spelling == "separate" else
                                                         [f"{flag}={value}"])]
    _, _, training_args = parse_args(argv=argv)
    assert training_args.deepspeed is None
    assert (training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps) == (2, 4)
    _, _, training_args = parse_args(argv=["--gradient_accumulation_steps=4"])
    assert (training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps) == (1, 4)
    with pytest.raises(InputError, match="give one"):
        parse_args(argv=["--gradient_accumulation_steps=4", "--batch_size=32"])


def test_missing_deepspeed_config_is_one_line():
    from phi3v.arguments import DS_CONFIGS

    with pytest.raises(InputError) as error:  # 2U1's scripts name their own scripts/zero3.json
        parse_args(argv=["--deepspeed", "scripts/zero3.json"])
    assert str(error.value) == (f"--deepspeed scripts/zero3.json: no such file; this project's configs are in "
                                f"{DS_CONFIGS} (zero2.json, zero2_offload.json, zero3.json, zero3_offload.json), or "
                                "--deepspeed none")


def test_the_readmes_deepspeed_paths_find_the_packaged_configs_from_any_folder(tmp_path, monkeypatch):
    from phi3v.arguments import DS_CONFIGS

    monkeypatch.chdir(tmp_path)  # not the checkout: ds_configs/ is not here
    for spelling in ("ds_configs/zero3.json", "zero3.json", "./ds_configs/zero3.json"):
        _, _, training_args = parse_args(argv=["--deepspeed", spelling])
        assert training_args.deepspeed == os.path.join(DS_CONFIGS, "zero3.json"), spelling
    own = tmp_path / "ds_configs" / "zero3.json"  # a file of the user's own at that path wins
    own.parent.mkdir()
    own.write_text('{"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}')
    _, _, training_args = parse_args(argv=["--deepspeed", "ds_configs/zero3.json"])
    assert training_args.deepspeed == "ds_configs/zero3.json"


def test_ds_configs_have_one_source_that_an_installed_package_finds(tmp_path):
    """ds_configs/ at the top level holds the files; phi3v/ds_configs is a link to it (no second copy to keep in
    sync); a wheel built from the project carries them inside the package, and the installed package finds them
    by the README's spelling from any folder."""
    from phi3v.arguments import DS_CONFIGS

    top = os.path.join(ROOT, "ds_configs")
    assert sorted(n for n in os.listdir(top) if n.endswith(".json")) == [
        "zero2.json", "zero2_offload.json", "zero3.json", "zero3_offload.json"]
    assert os.path.islink(os.path.join(ROOT, "phi3v", "ds_configs"))
    assert os.path.realpath(DS_CONFIGS) == os.path.realpath(top)

    wheels, site = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), ROOT], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                    *map(str, wheels.glob("*.whl"))], check=True, capture_output=True)
    installed = site / "phi3v" / "ds_configs"
    assert not installed.is_symlink()
    for name in ("zero2.json", "zero3_offload.json"):
        assert (installed / name).read_bytes() == open(os.path.join(top, name), "rb").read()
    probe = ("import phi3v.arguments as a; _, _, t = a.parse_args(argv=['--deepspeed', 'ds_configs/zero3.json', "
             "'--report_to', 'none']); print(a.__file__); print(t.deepspeed)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(site)))
    assert result.returncode == 0, result.stderr[-3000:]
    module, config = result.stdout.split()[-2:]
    assert module == str(site / "phi3v" / "arguments.py") and config == str(installed / "zero3.json")


def test_gradient_checkpointing_false_is_honoured(tmp_path):
    from phi3v.reporting import save_run_config

    for argv, expected in [([], True), (["--gradient_checkpointing", "False"], False),
                           (["--gradient_checkpointing=false"], False),
                           (["--activation_checkpointing", "False"], False)]:
        recipe_args, _, training_args = parse_args(argv=argv)
        assert training_args.activation_checkpointing is expected and training_args.gradient_checkpointing is expected
    save_run_config(str(tmp_path), recipe_args, None, training_args)
    with open(tmp_path / "run_config.json") as f:
        saved = json.load(f)["training_args"]
    assert saved["activation_checkpointing"] is False


def test_warmup_ratio_logging_dir_and_reporters(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    _, _, training_args = parse_args(argv=["--warmup_ratio", "0.1", "--logging_dir", str(tmp_path / "tb")])
    assert training_args.warmup_steps == 0.1 and training_args.get_warmup_steps(95) == 10  # ceil, as transformers 4
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "tb")
    with pytest.raises(InputError, match=r"^--warmup_ratio and --warmup_steps both set the warm-up; give one$"):
        parse_args(argv=["--warmup_ratio", "0.1", "--warmup_steps", "5"])
    with pytest.raises(InputError, match=r"^--warmup_ratio must be in \[0, 1\), got 1.5$"):
        parse_args(argv=["--warmup_ratio", "1.5"])
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(InputError) as error:
            parse_args(argv=["--report_to", "wandb"])
        assert str(error.value) == ("--report_to wandb: wandb is not installed here (pip install wandb), or use "
                                    "--report_to tensorboard / none")


# ------------------------------------------------------------------------------------------------ one-line errors
def test_data_path_errors_are_one_line(work, tmp_path):
    def run(data_path, *flags):
        return error_line(lambda: custom.main(["--model_id", work["model"], "--data_path", str(data_path),
                                               "--image_folder", work["media"], "--output_dir", str(tmp_path / "o"),
                                               *FAST, "--max_steps", "1", *flags]))

    assert run(work["media"]) == (f"error: {work['media']}: is a folder; the data path must be a JSON or jsonl file "
                                  "(the images go in the image folder)")
    trailing = tmp_path / "trailing.json"
    trailing.write_text('[\n  {"id": "a"},\n  {"id": "b"},\n]\n')
    assert run(trailing) == (f"error: {trailing}:3: not valid JSON: trailing comma before the ']' on line 4 "
                             "(JSON allows no comma after the last item)")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "old.txt").write_text("another run")
    assert run(work["data"]).startswith(f"error: --output_dir {tmp_path / 'o'} is not empty. To continue")


def test_one_json_object_is_one_record(work, tmp_path):
    from phi3v.records import load_records

    path = tmp_path / "one.json"
    path.write_text(json.dumps(RECORD, indent=2))
    [record] = load_records(path, work["media"])
    assert record["id"] == "cat-1" and record["source"] == str(path)


def test_bad_media_is_found_before_the_model_loads(work, tmp_path, monkeypatch):
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "cat.jpg").write_text("not a picture")
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([RECORD]))
    monkeypatch.setattr(phi3v.training, "load_model",
                        lambda *a, **k: pytest.fail("the model loaded before the data check"))
    text = error_line(lambda: custom.main(["--model_id", work["model"], "--data_path", str(data), "--image_folder",
                                           str(tmp_path / "media"), "--output_dir", str(tmp_path / "o"), *FAST]))
    assert text == (f"error: {data}[0]: not an image file (or unsupported format): {tmp_path / 'media' / 'cat.jpg'}")


def run_task_script(script, argv, monkeypatch):
    """A task recipe's __main__ path in-process: (exit message)."""
    import runpy

    monkeypatch.setattr(sys, "argv", [script, *argv])
    return error_line(lambda: runpy.run_path(os.path.join(ROOT, script), run_name="__main__"))


@pytest.mark.parametrize("script", ["finetune_hf_trainer_hateful_memes.py", "finetune_hf_trainer_nlvr2.py"])
def test_500_rows_or_fewer_says_the_first_500_are_the_evaluation_split(script, tiny_checkpoint, tmp_path,
                                                                       monkeypatch):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    data = tmp_path / "small.jsonl"
    line = {"id": "x", "conversations": [{"images": ["a.png"], "user": "Hateful?", "assistant": "no"}]}
    data.write_text("\n".join(json.dumps(line) for _ in range(3)) + "\n")
    text = run_task_script(script, ["--model_name_or_path", tiny_checkpoint, "--dataset_path", str(data),
                                    "--output_dir", str(tmp_path / "o"), *FAST], monkeypatch)
    assert text == (f"error: {data} has 3 rows: none from row 500 on, nothing to take; the first 500 rows are the "
                    "evaluation split and training takes the rest: give more than 500 rows, or change EVAL_SIZE at "
                    f"the top of {script}")


def test_full_train_with_dataset_path_is_refused(tiny_checkpoint, tmp_path, monkeypatch):
    text = run_task_script("finetune_hf_trainer_docvqa.py",
                           ["--model_name_or_path", tiny_checkpoint, "--dataset_path", str(tmp_path), "--full_train",
                            "--output_dir", str(tmp_path / "o"), *FAST], monkeypatch)
    assert text == ("error: --full_train trains on the hub's HuggingFaceM4/the_cauldron docvqa, but --dataset_path "
                    "replaces the hub data with your copy: give one (for a local copy of the full set, save it with "
                    "save_to_disk and pass only --dataset_path)")


def test_evaluation_result_is_logged_once_at_info(tiny_checkpoint, processor, tmp_path, caplog):
    from types import SimpleNamespace

    from PIL import Image

    from phi3v import Phi3VForCausalLM
    from phi3v.dataset import SFTDataset
    from phi3v.evaluation import evaluate

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    records = [{"id": "1", "source": "t:1", "images": [str(tmp_path / "a.png")], "video": None,
                "messages": [{"role": "user", "content": "<|image_1|>\nWhat?"}, {"role": "assistant", "content": "x"}]}]
    model = Phi3VForCausalLM.from_pretrained(tiny_checkpoint)
    args = SimpleNamespace(eval_batch_size=1, max_new_tokens=2, no_tqdm=True)
    with caplog.at_level(logging.DEBUG, logger="phi3v.evaluation"):
        evaluate(model, processor, SFTDataset(records, processor, num_crops=1), lambda p: ("accuracy", 1.0), args,
                 SimpleNamespace(output_dir=str(tmp_path)), "eval_after")
    lines = [r for r in caplog.records if "eval_after: accuracy = 1.0000 on 1 samples" in r.getMessage()]
    assert [r.levelno for r in lines] == [logging.INFO]


def test_launchers_use_the_venv_python_without_activation(tmp_path):
    """Bare `torchrun` fails unless the venv is activated: the launchers run the project's .venv Python."""
    if not os.access(os.path.join(ROOT, ".venv", "bin", "python"), os.X_OK):
        pytest.skip("no .venv in the repository root (the README's set-up makes it)")
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", str(tmp_path)), "OUTPUT_DIR": str(tmp_path)}
    result = subprocess.run(["bash", "scripts/finetune_lora.sh", "--help"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--lora_enable" in result.stdout and "--vision_lora" in result.stdout


# ------------------------------------------------------------------------------------------------ predict.py
def test_predict_llava_json_images_default_to_images_beside_the_file(tmp_path):
    from argparse import Namespace

    from PIL import Image

    import predict

    (tmp_path / "images").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "images" / "cat.jpg")
    path = tmp_path / "test.json"
    path.write_text(json.dumps([RECORD]))
    [record] = predict.read_records(Namespace(jsonl=str(path), image_folder=None))
    assert record["images"] == [str(tmp_path / "images" / "cat.jpg")]
    assert predict.parse_args(["--jsonl", str(path)]).image_folder is None  # the default, as the help says


def test_predict_prompt_with_a_llava_image_tag(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from PIL import Image

    import predict
    from phi3v import inference

    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "a.png")
    assert inference.llava_tags("<image>\n<image>\nWhich?") == "<|image_1|>\n<|image_2|>\nWhich?"
    asked = []
    real_answer = predict.answer
    monkeypatch.setattr(predict, "answer", lambda model, processor, messages, *rest: asked.append(messages) or
                        real_answer(model, processor, messages, *rest))
    answer = predict.main(["--model", tiny_checkpoint, "--prompt", "<image>\nWhat is shown?", "--image",
                           str(tmp_path / "a.png"), "--max_new_tokens", "2", "--num_crops", "1"])
    assert isinstance(answer, str)
    assert [m["content"] for m in asked[0] if m["role"] == "user"] == ["<|image_1|>\nWhat is shown?"]
    with pytest.raises(SystemExit) as error:  # abbreviations are off here too
        predict.parse_args(["--mod", tiny_checkpoint, "--prompt", "x"])
    assert error.value.code == 2 and "unrecognized arguments: --mod" in capsys.readouterr().err


def test_ucf101_bad_frame_is_found_before_the_model_loads(tmp_path, monkeypatch):
    from phi3v.synthetic import write_ucf101_folder

    folder = write_ucf101_folder(str(tmp_path / "ucf101"), {"train": 2, "test": 1})
    with open(os.path.join(folder, "ucf101_train.jsonl")) as f:
        frame = json.loads(f.readline())["conversations"][0]["images"][0]
    with open(os.path.join(folder, "images", frame), "w") as f:
        f.write("not a jpeg")
    # the model path does not exist: the run must stop at the data check, before it is read
    text = run_task_script("finetune_hf_trainer_ucf101.py",
                           ["--model_name_or_path", str(tmp_path / "no_model"), "--data_dir", folder,
                            "--output_dir", str(tmp_path / "o"), *FAST], monkeypatch)
    assert text == (f"error: {folder}/ucf101_train.jsonl:1: not an image file (or unsupported format): "
                    f"{os.path.join(folder, 'images', frame)}")


def test_flash_attention_follows_disable_flash_attn2(work, monkeypatch):
    """2U1 uses flash attention unless --disable_flash_attn2: so does this recipe where flash-attn can run."""
    import importlib.util

    args, _, _ = custom_parse(work, *FAST)
    flash = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    assert args.use_flash_attention is flash
    import phi3v.community_flags

    monkeypatch.setattr(phi3v.community_flags, "flash_attention_available", lambda: True)  # flash-attn and a GPU
    assert custom_parse(work, *FAST)[0].use_flash_attention is True
    assert custom_parse(work, *FAST, "--disable_flash_attn2", "--use_flash_attention")[0].use_flash_attention is False


def test_lazy_preprocess_is_accepted_and_says_it_changes_nothing(work, monkeypatch, caplog):
    def stop(*args):
        raise RuntimeError("stop before the run")

    monkeypatch.setattr(custom, "prepare_resume", stop)
    with caplog.at_level(logging.INFO), pytest.raises(RuntimeError, match="stop before the run"):
        custom.run(["--model_id", work["model"], "--data_path", work["data"], "--output_dir",
                    str(work["root"] / "lazy"), *FAST, "--lazy_preprocess", "True"])
    assert ("--lazy_preprocess changes nothing here: samples are always read when the DataLoader asks"
            in caplog.text)
