"""predict.py on the tiny checkpoint: streamed answers (images, video), a scored data file, LoRA adapters, errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import write_test_media

from phi3v import Phi3VForCausalLM, inference
from phi3v.model_setup import apply_lora, lora_target_modules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # predict.py is a top-level script, not in a package

import predict  # noqa: E402

FAST = ["--max_new_tokens", "6", "--num_crops", "1"]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Two images and a 6-frame video."""
    folder = tmp_path_factory.mktemp("media")
    write_test_media(folder)
    return folder


def test_user_message_adds_missing_tags_only():
    assert inference.user_message("Same?", 2) == "<|image_1|>\n<|image_2|>\nSame?"
    assert inference.user_message("<|image_1|> vs <|image_2|>: same?", 2) == "<|image_1|> vs <|image_2|>: same?"
    assert inference.user_message("Hello", 0) == "Hello"


def test_single_image_streams_to_stdout(tiny_checkpoint, media):
    command = [sys.executable, "predict.py", "--model", tiny_checkpoint, "--prompt", "What colour is it?",
               "--image", str(media / "red.jpg"), *FAST]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "no streamed text"


def test_multi_image_and_video_stream_what_is_returned(tiny_checkpoint, media, capsys):
    answer = predict.main(["--model", tiny_checkpoint, "--prompt", "Which is red?",
                           "--image", str(media / "red.jpg"), "--image", str(media / "blue.png"), *FAST])
    assert answer and capsys.readouterr().out.strip() == answer  # the streamer printed exactly the answer

    answer = predict.main(["--model", tiny_checkpoint, "--prompt", "What happens?", "--video", str(media / "clip.mp4"),
                           "--num_frames", "3", *FAST])
    assert answer and capsys.readouterr().out.strip() == answer


def test_jsonl_writes_predictions_and_metric(tiny_checkpoint, media, tmp_path, capsys):
    lines = [
        {"id": "a", "conversations": [{"images": ["red.jpg"], "user": "Red?", "assistant": "yes"}]},
        {"id": "b", "conversations": [{"images": ["blue.png"], "user": "Red?", "assistant": "no"}]},
        {"id": "c", "conversations": [{"images": ["red.jpg", "blue.png"], "user": "Same?", "assistant": "no"}]},
    ]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = tmp_path / "out" / "predictions.jsonl"
    result = predict.main(["--model", tiny_checkpoint, "--jsonl", str(data), "--image_folder", str(media),
                           "--metric", "accuracy", "--output", str(output), "--batch_size", "2", *FAST])

    predictions = [json.loads(line) for line in output.read_text().splitlines()]
    assert [p["id"] for p in predictions] == ["a", "b", "c"]
    assert [p["answer"] for p in predictions] == ["yes", "no", "no"]
    assert all(isinstance(p["prediction"], str) for p in predictions)
    expected = predict.score(predictions, "accuracy")
    written = json.loads((tmp_path / "out" / "predictions_metrics.json").read_text())
    assert result["accuracy"] == written["accuracy"] == expected and written["num_samples"] == 3
    assert f"accuracy = {expected:.4f} on 3 samples" in capsys.readouterr().out


def test_score_metrics():
    predictions = [{"prediction": "Yes.", "answer": "yes"}, {"prediction": "I think no", "answer": "yes"},
                   {"prediction": "Paris", "answer": "paris", "answers": ["Paris", "paris, france"]}]
    assert predict.score(predictions, "exact") == pytest.approx(2 / 3)
    assert predict.score(predictions[:2], "accuracy") == pytest.approx(1 / 2)  # "I think no" parses to "no"
    assert predict.score(predictions[2:], "anls") == 1.0


def test_lora_adapter_folder_loads_with_its_base(tiny_checkpoint, media, tmp_path, capsys):
    torch.manual_seed(0)
    model = Phi3VForCausalLM.from_pretrained(tiny_checkpoint)
    peft_model = apply_lora(model, 4, 8, 0.0, lora_target_modules(model, vision=False))
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:  # LoRA starts as a no-op (B = 0): make it change the model, as training would
            torch.nn.init.normal_(parameter, std=0.02)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)  # no processor files: the processor comes from the base model
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_checkpoint

    assert inference.describe_model_folder(str(adapter)) == ("adapter", tiny_checkpoint)
    merged, _ = inference.load_for_inference(str(adapter))
    base = Phi3VForCausalLM.from_pretrained(tiny_checkpoint)
    name = "model.layers.0.self_attn.qkv_proj.weight"
    assert not torch.equal(merged.state_dict()[name], base.state_dict()[name])  # the LoRA update is folded in
    assert not any("lora_" in n for n in merged.state_dict())

    answer = predict.main(["--model", str(adapter), "--prompt", "Colour?", "--image", str(media / "red.jpg"), *FAST])
    assert answer and capsys.readouterr().out.strip() == answer


def test_adapter_base_can_be_overridden(tmp_path, tiny_checkpoint):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/gone/base"}))
    with pytest.raises(FileNotFoundError, match="pass --base_model"):
        inference.describe_model_folder(str(adapter))
    assert inference.describe_model_folder(str(adapter), tiny_checkpoint) == ("adapter", tiny_checkpoint)


def test_folder_without_weights_errors_clearly(tmp_path, media):
    (tmp_path / "run" / "checkpoint-10").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as error:
        predict.main(["--model", str(tmp_path / "run"), "--prompt", "Hi", "--image", str(media / "red.jpg")])
    message = str(error.value)
    assert str(tmp_path / "run") in message and "model.safetensors" in message and "adapter_config.json" in message
    assert "checkpoint-10" in message  # points at the checkpoint that does hold weights

    with pytest.raises(SystemExit, match="no such model folder"):
        predict.main(["--model", str(tmp_path / "missing"), "--prompt", "Hi"])


def test_bad_image_fails_before_loading_the_model(tmp_path):
    (tmp_path / "not_an_image.jpg").write_text("hello")
    with pytest.raises(SystemExit, match="not an image file"):
        predict.main(["--model", str(tmp_path / "never_read"), "--prompt", "Hi",
                      "--image", str(tmp_path / "not_an_image.jpg")])
