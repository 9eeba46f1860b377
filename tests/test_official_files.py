"""What the project saves is a drop-in for the official checkpoint of its base (issue 15, part 2).

config.json, preprocessor_config.json and processor_config.json of every folder written (full run, checkpoint-N,
merged LoRA) are compared with the official files of each base (phi3v/assets: byte copies of the hub files): the same
keys, LongRoPE as `rope_scaling` in the form the remote code validates, and `auto_map` entries pointing at the base
repository's code. The native loader must still read every one of them.
"""

import json
import os
import shutil
import sys

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # scripts/merge_lora.py

from phi3v import Phi3VConfig, Phi3VForCausalLM, Phi3VProcessor  # noqa: E402
from phi3v.conversation import tokenize_conversation  # noqa: E402

ASSETS = os.path.join(ROOT, "phi3v", "assets")
PHI35, PHI3 = "microsoft/Phi-3.5-vision-instruct", "microsoft/Phi-3-vision-128k-instruct"
FOLDER = {PHI35: "phi-3.5-vision-instruct", PHI3: "phi-3-vision-128k-instruct"}
# The official files' auto_map entries, pointed at each base repository (written out, not computed).
CONFIG_AUTO_MAP = {
    PHI35: {"AutoConfig": "microsoft/Phi-3.5-vision-instruct--configuration_phi3_v.Phi3VConfig",
            "AutoModelForCausalLM": "microsoft/Phi-3.5-vision-instruct--modeling_phi3_v.Phi3VForCausalLM"},
    PHI3: {"AutoConfig": "microsoft/Phi-3-vision-128k-instruct--configuration_phi3_v.Phi3VConfig",
           "AutoModelForCausalLM": "microsoft/Phi-3-vision-128k-instruct--modeling_phi3_v.Phi3VForCausalLM"},
}
PREPROCESSOR_AUTO_MAP = {
    PHI35: {"AutoImageProcessor": "microsoft/Phi-3.5-vision-instruct--processing_phi3_v.Phi3VImageProcessor",
            "AutoProcessor": "microsoft/Phi-3.5-vision-instruct--processing_phi3_v.Phi3VProcessor"},
    PHI3: {"AutoProcessor": "microsoft/Phi-3-vision-128k-instruct--processing_phi3_v.Phi3VProcessor",
           "AutoImageProcessor": "microsoft/Phi-3-vision-128k-instruct--image_processing_phi3_v.Phi3VImageProcessor"},
}
PROCESSOR_CONFIG = {
    base: {
        "auto_map": {"AutoProcessor": f"{base}--processing_phi3_v.Phi3VProcessor"},
        "processor_class": "Phi3VProcessor",
    }
    for base in (PHI35, PHI3)
}


def read(folder, name):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def official(base, name):
    return read(os.path.join(ASSETS, FOLDER[base]), name)


def check_remote_code_rope_scaling(config: dict) -> None:
    """The official configuration_phi3_v.py's validation of rope_scaling: a dict of exactly type / short_factor /
    long_factor, type "su" (or "yarn"), both factor lists of head_dim / 2 numbers."""
    scaling = config["rope_scaling"]
    assert set(scaling) == {"type", "short_factor", "long_factor"}
    assert scaling["type"] == "su"
    half = config["hidden_size"] // config["num_attention_heads"] // 2
    for key in ("short_factor", "long_factor"):
        assert len(scaling[key]) == half and all(isinstance(x, (int, float)) for x in scaling[key])


def check_official_form(folder, base, num_crops):
    """The three files of `folder` in the official form of `base`."""
    config = read(folder, "config.json")
    assert list(config) == list(official(base, "config.json"))  # the same keys, in the official order
    assert config["auto_map"] == CONFIG_AUTO_MAP[base]
    assert config["_name_or_path"] == base
    assert config["architectures"] == ["Phi3VForCausalLM"] and config["model_type"] == "phi3_v"
    assert config["_attn_implementation"] == "flash_attention_2"  # as the base: the official code's default
    assert config["rope_theta"] == 10000.0 and config["torch_dtype"] in ("float32", "bfloat16")
    check_remote_code_rope_scaling(config)

    preprocessor = read(folder, "preprocessor_config.json")
    expected = official(base, "preprocessor_config.json")
    assert list(preprocessor) == list(expected)
    assert preprocessor["auto_map"] == PREPROCESSOR_AUTO_MAP[base]
    assert preprocessor["num_crops"] == num_crops
    for key in ("image_mean", "image_std", "image_processor_type", "processor_class", "num_img_tokens"):
        assert preprocessor[key] == expected[key], key
    assert read(folder, "processor_config.json") == PROCESSOR_CONFIG[base]
    return config


@pytest.mark.parametrize("base", [PHI35, PHI3])
def test_official_config_saves_back_as_the_official_file(base, tmp_path):
    """Reading an official config.json and saving it gives the official file back: every key and value, except the
    auto_map entries now naming the base repository, _name_or_path (the repository) and transformers_version."""
    Phi3VConfig.from_pretrained(os.path.join(ASSETS, FOLDER[base])).save_pretrained(tmp_path)
    saved, original = read(tmp_path, "config.json"), official(base, "config.json")
    assert list(saved) == list(original)
    different = {key for key in original if saved[key] != original[key]}
    assert different == {"auto_map", "_name_or_path", "transformers_version"}
    assert saved["auto_map"] == CONFIG_AUTO_MAP[base] and saved["_name_or_path"] == base
    assert "rope_parameters" not in saved and "dtype" not in saved


def tiny_base_folder(path, base, num_crops=2):
    """A tiny checkpoint with the official files' form of `base` (as a local copy of the base would be)."""
    from phi3v.tiny import write_tiny_checkpoint

    sliding_window = {PHI35: 262144, PHI3: 131072}[base]
    write_tiny_checkpoint(path, num_crops=num_crops, sliding_window=sliding_window)
    config = read(path, "config.json")
    config["auto_map"] = official(base, "config.json")["auto_map"]  # code "beside the files", as the hub folder
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    preprocessor = official(base, "preprocessor_config.json")
    preprocessor["num_crops"] = num_crops
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor, f)
    if base == PHI3:  # the Phi-3-vision-128k repository has no processor_config.json
        os.remove(os.path.join(path, "processor_config.json"))
    return str(path)


def training_examples(processor):
    turn = [{"role": "user", "content": "<|image_1|>\nColour?"}, {"role": "assistant", "content": "red"}]
    return [tokenize_conversation(processor, turn, [Image.new("RGB", (336, 336), (200, 10, 10))], num_crops=2)] * 2


def run_recipe(model_dir, output_dir, *flags):
    """Two optimizer steps through the recipes' code path, a checkpoint at each, then the recipes' final save."""
    from phi3v.arguments import parse_args
    from phi3v.training import make_trainer, model_for_training, run_training, save_outputs

    argv = ["--model_name_or_path", model_dir, "--output_dir", str(output_dir), "--deepspeed", "none",
            "--report_to", "none", "--max_steps", "2", "--save_steps", "1", "--batch_size", "2",
            "--batch_size_per_gpu", "2", "--learning_rate", "1e-3", "--warmup_steps", "0",
            "--dataloader_num_workers", "0", "--no_tqdm", "--num_crops", "2", *flags]
    args, _, training_args = parse_args(argv=argv)
    processor = Phi3VProcessor.from_pretrained(model_dir, num_crops=2)
    model = model_for_training(args, training_args)
    trainer = make_trainer(model, training_args, training_examples(processor), processor)
    assert run_training(trainer)
    save_outputs(trainer, processor, args)
    return trainer


@pytest.mark.parametrize("base", [PHI35, PHI3])
def test_full_run_and_its_checkpoints_save_the_official_files(base, tmp_path):
    model_dir = tiny_base_folder(tmp_path / "base", base)
    trainer = run_recipe(model_dir, tmp_path / "run")
    trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for folder in (tmp_path / "run", tmp_path / "run" / "checkpoint-1", tmp_path / "run" / "checkpoint-2"):
        config = check_official_form(folder, base, num_crops=2)
        assert config["hidden_size"] == 64 and config["num_hidden_layers"] == 2  # the model's own values
        assert config["rope_scaling"]["short_factor"] == [1.0 + 0.1 * i for i in range(8)]  # phi3v.tiny's factors
        assert config["rope_scaling"]["long_factor"] == [2.0 + 0.5 * i for i in range(8)]
        # ... and this package reads it back: the same model, the same processor
        reloaded = Phi3VForCausalLM.from_pretrained(folder)
        processor = Phi3VProcessor.from_pretrained(folder)
        assert processor.num_crops == 2 and processor.image_processor.official_base() == (base, base)
        if folder == tmp_path / "run":
            for name, value in reloaded.named_parameters():
                torch.testing.assert_close(value, trained[name], rtol=0, atol=0, msg=name)
        assert reloaded.config.rope_parameters == trainer.model.config.rope_parameters


@pytest.mark.parametrize("base", [PHI35, PHI3])
def test_merged_lora_folders_save_the_official_files(base, tmp_path):
    from scripts.merge_lora import merge

    model_dir = tiny_base_folder(tmp_path / "base", base)
    run_recipe(model_dir, tmp_path / "run", "--use_lora", "--lora_rank", "4", "--merge_lora", "--max_steps", "1")
    merged_in_run = tmp_path / "run" / "merged"
    check_official_form(merged_in_run, base, num_crops=2)
    check_official_form(merge(str(tmp_path / "run"), str(tmp_path / "merged"), dtype="float32"), base, num_crops=2)
    # the adapter folder's processor files too (predict.py and merge_lora.py read them)
    assert read(tmp_path / "run", "processor_config.json") == PROCESSOR_CONFIG[base]
    a = Phi3VForCausalLM.from_pretrained(merged_in_run).state_dict()
    b = Phi3VForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)


def test_the_repository_auto_map_points_at():
    from phi3v.official import code_repo_of_source

    base_file = official(PHI35, "config.json")
    # a local copy of the official folder (code beside the files): the official repository of its base
    assert Phi3VConfig(**base_file).official_base() == (PHI35, PHI35)
    assert Phi3VConfig(**official(PHI3, "config.json")).official_base() == (PHI3, PHI3)
    # loaded by hub id from a repository that carries the remote code: that repository
    config = Phi3VConfig(**base_file)
    config.name_or_path = "someone/phi-3.5-vision-finetuned"
    assert config.official_base() == (PHI35, "someone/phi-3.5-vision-finetuned")
    assert code_repo_of_source(base_file["auto_map"], "someone/phi-3.5-vision-finetuned") == \
        "someone/phi-3.5-vision-finetuned"
    assert code_repo_of_source(base_file["auto_map"], ASSETS) is None  # a local folder is no repository
    # a folder this project wrote keeps the repository it names; the base's form follows from the config
    written = dict(base_file, auto_map={"AutoConfig": "someone/fork--configuration_phi3_v.Phi3VConfig"})
    assert Phi3VConfig(**written).official_base() == (PHI35, "someone/fork")
    # no auto_map and a config of neither base (a tiny one): Phi-3.5-vision
    from phi3v.tiny import tiny_config

    assert tiny_config().official_base() == (PHI35, PHI35)
    assert tiny_config(sliding_window=131072).official_base() == (PHI3, PHI3)


def test_settings_without_an_official_key_are_kept_only_when_not_default(tmp_path):
    from phi3v.tiny import tiny_config

    config = tiny_config(sliding_window=131072, resid_pdrop=0.1)  # the 128k file has no resid_pdrop key
    config.save_pretrained(tmp_path)
    saved = read(tmp_path, "config.json")
    assert saved["resid_pdrop"] == 0.1 and "embd_pdrop" not in saved and "pad_token_id" not in saved
    reread = Phi3VConfig.from_pretrained(tmp_path)
    assert reread.resid_pdrop == 0.1 and reread.pad_token_id == 32000 and reread.embd_pdrop == 0.0


def test_folders_written_before_in_transformers_5_form_still_read(tmp_path):
    """Earlier saves wrote transformers 5's rope_parameters (no rope_scaling, no auto_map)."""
    from phi3v.tiny import tiny_config

    config = tiny_config()
    old_form = {k: v for k, v in config.to_dict().items() if k != "_code_repo"}
    assert "rope_parameters" in old_form and "rope_scaling" not in old_form
    reread = Phi3VConfig(**old_form)
    assert reread.rope_parameters == config.rope_parameters
    assert reread.official_base() == (PHI35, PHI35)


def test_native_auto_classes_read_a_saved_folder_without_remote_code(tiny_checkpoint, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

    folder = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, folder)
    assert read(folder, "config.json")["auto_map"] == CONFIG_AUTO_MAP[PHI35]
    assert isinstance(AutoConfig.from_pretrained(folder), Phi3VConfig)
    assert isinstance(AutoModelForCausalLM.from_pretrained(folder), Phi3VForCausalLM)
    assert isinstance(AutoProcessor.from_pretrained(folder), Phi3VProcessor)


def test_processor_of_a_folder_without_remote_code_follows_the_models_config(tmp_path):
    """A folder saved before (no auto_map anywhere) of a Phi-3-vision-128k model: the processor files are re-saved
    for the same base as config.json, not for the default one."""
    folder = tiny_base_folder(tmp_path / "old", PHI3)
    for name in ("config.json", "preprocessor_config.json"):
        data = read(folder, name)
        data.pop("auto_map")
        with open(os.path.join(folder, name), "w") as f:
            json.dump(data, f)
    processor = Phi3VProcessor.from_pretrained(folder)
    assert processor.image_processor.official_base() == (PHI3, PHI3)
    processor.save_pretrained(tmp_path / "new")
    Phi3VConfig.from_pretrained(folder).save_pretrained(tmp_path / "new")
    config = read(tmp_path / "new", "config.json")
    assert config["auto_map"] == CONFIG_AUTO_MAP[PHI3]
    assert read(tmp_path / "new", "preprocessor_config.json")["auto_map"] == PREPROCESSOR_AUTO_MAP[PHI3]
    assert read(tmp_path / "new", "processor_config.json") == PROCESSOR_CONFIG[PHI3]
