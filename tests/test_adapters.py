"""LoRA adapters meet their base model through phi3v.model_setup.load_adapter (predict.py, merge_lora.py).

An adapter trained on another base model is refused before PEFT touches it, with a ValueError naming the adapter
folder, the base model and the first tensor that does not fit (expected vs found shape); one whose recorded base
differs but whose shapes fit loads with a warning; a pickled adapter_model.bin loads with weights_only.
"""

import importlib.util
import json
import logging
import os
import re
import shutil
import sys

import pytest
import torch

from phi3v import Phi3VForCausalLM
from phi3v.errors import program_name
from phi3v.model_setup import adapter_tensor_shapes, apply_lora, load_adapter, lora_target_modules
from phi3v.tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import predict  # noqa: E402


def merge_lora_script():
    spec = importlib.util.spec_from_file_location("merge_lora_script", os.path.join(ROOT, "scripts", "merge_lora.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_adapter(model, folder, lm_head=False):
    """A LoRA adapter on `model`'s language layers (and lm_head), with non-zero B so it changes the model."""
    torch.manual_seed(0)
    peft_model = apply_lora(model, 4, 8, 0.0, lora_target_modules(model, vision=False, lm_head=lm_head))
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    peft_model.save_pretrained(folder)
    return str(folder)


def other_base(folder, **overrides):
    """An adapter trained on a tiny model with other dimensions, recorded as trained on /elsewhere/other-base."""
    model = Phi3VForCausalLM(tiny_config(**overrides))
    model.name_or_path = "/elsewhere/other-base"
    return save_adapter(model, folder, lm_head="vocab_size" in overrides)


@pytest.fixture(scope="module")
def own_adapter(tiny_checkpoint, tmp_path_factory):
    # lm_head too: PEFT then also saves the whole lm_head (as lm_head.base_layer.weight), which must fit as well
    folder = tmp_path_factory.mktemp("own") / "adapter"
    return save_adapter(Phi3VForCausalLM.from_pretrained(tiny_checkpoint), folder, lm_head=True)


def logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 32010, 29871, 13, 5618, 338, 4318, 29973]])).logits


def test_adapter_of_a_wider_model_is_refused_with_the_first_bad_tensor(tiny_checkpoint, tmp_path):
    adapter = other_base(tmp_path / "wide", hidden_size=96)
    with pytest.raises(ValueError) as error:
        load_adapter(Phi3VForCausalLM.from_pretrained(tiny_checkpoint), adapter)
    assert str(error.value) == (
        f"{adapter}: this LoRA adapter does not fit the base model {tiny_checkpoint}: 12 of its 16 tensors have the "
        "wrong shape, first base_model.model.model.layers.0.mlp.down_proj.lora_B.weight: expected (64, 4), found "
        "(96, 4); was the adapter trained on another base model? (predict.py / merge_lora.py: --base_model)"
    )


def test_adapter_of_another_vocabulary_is_refused(tiny_checkpoint, tmp_path):
    adapter = other_base(tmp_path / "vocab", vocab_size=32128)  # adapts lm_head: [vocab, rank] in lora_B
    with pytest.raises(ValueError, match=re.escape(
        "2 of its 19 tensors have the wrong shape, first base_model.model.lm_head.base_layer.weight: "
        "expected (32064, 64), found (32128, 64)"
    )):
        load_adapter(Phi3VForCausalLM.from_pretrained(tiny_checkpoint), adapter)


def test_adapter_for_layers_the_base_lacks_is_refused(tiny_checkpoint, tmp_path):
    # PEFT itself loads this one silently, leaving out the third layer's adapters.
    adapter = other_base(tmp_path / "deep", num_hidden_layers=3)
    with pytest.raises(ValueError) as error:
        load_adapter(Phi3VForCausalLM.from_pretrained(tiny_checkpoint), adapter)
    assert str(error.value) == (
        f"{adapter}: this LoRA adapter does not fit the base model {tiny_checkpoint}: 8 of its 24 tensors adapt "
        "modules the base model does not have, first base_model.model.model.layers.2.mlp.down_proj.lora_A.weight "
        "(shape (4, 128)): the base model has no model.layers.2.mlp.down_proj; was the adapter trained on another "
        "base model? (predict.py / merge_lora.py: --base_model)"
    )


def test_predict_and_merge_lora_refuse_in_one_line_and_write_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    adapter = other_base(tmp_path / "wide", hidden_size=96)
    expected = f"{adapter}: this LoRA adapter does not fit the base model {tiny_checkpoint}: 12 of its 16 tensors"
    with pytest.raises(SystemExit) as error:
        predict.main(["--model", adapter, "--base_model", tiny_checkpoint, "--prompt", "Hi"])
    assert error.value.code == 2 and str(error.value).startswith(f"{program_name()}: error: {expected}")

    merge_lora = merge_lora_script()
    output_dir = tmp_path / "merged"
    monkeypatch.setattr(sys, "argv", ["merge_lora.py", "--adapter_dir", adapter, "--output_dir", str(output_dir),
                                      "--base_model", tiny_checkpoint, "--dtype", "float32"])
    with pytest.raises(SystemExit) as error:
        merge_lora.main()
    assert error.value.code == 2 and str(error.value).startswith(f"merge_lora.py: error: {expected}")
    assert not output_dir.exists()


def test_own_adapter_loads_as_peft_does_without_warning(tiny_checkpoint, own_adapter, caplog):
    from peft import PeftModel

    with caplog.at_level(logging.WARNING, logger="phi3v.model_setup"):
        adapted = load_adapter(Phi3VForCausalLM.from_pretrained(tiny_checkpoint), own_adapter).eval()
    assert caplog.records == []
    reference = PeftModel.from_pretrained(Phi3VForCausalLM.from_pretrained(tiny_checkpoint), own_adapter).eval()
    assert torch.equal(logits(adapted), logits(reference))
    assert not torch.equal(logits(adapted), logits(Phi3VForCausalLM.from_pretrained(tiny_checkpoint).eval()))


def test_other_recorded_base_with_fitting_shapes_loads_with_a_warning(tiny_checkpoint, own_adapter, tmp_path, caplog):
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "copy")  # same shapes, another folder
    with caplog.at_level(logging.WARNING, logger="phi3v.model_setup"):
        adapted = load_adapter(Phi3VForCausalLM.from_pretrained(copy), own_adapter).eval()
    assert [r.getMessage() for r in caplog.records] == [
        f"{own_adapter} was trained on {tiny_checkpoint} but is loaded onto {copy}: the shapes fit, but check that "
        "this is the base you mean"
    ]
    own = load_adapter(Phi3VForCausalLM.from_pretrained(tiny_checkpoint), own_adapter).eval()
    assert torch.equal(logits(adapted), logits(own))


def test_pickled_adapter_loads_weights_only(own_adapter, tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file

    plain = shutil.copytree(own_adapter, tmp_path / "plain")
    torch.save(load_file(plain / "adapter_model.safetensors"), plain / "adapter_model.bin")
    os.remove(plain / "adapter_model.safetensors")
    assert adapter_tensor_shapes(plain) == adapter_tensor_shapes(own_adapter)

    class Payload:  # what a malicious pickle would carry: a call run at load time
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = shutil.copytree(plain, tmp_path / "evil")
    payload = {"base_model.model.lm_head.lora_A.weight": torch.zeros(1), "payload": Payload()}
    torch.save(payload, evil / "adapter_model.bin")
    with pytest.raises(ValueError) as error:
        load_adapter(Phi3VForCausalLM.from_pretrained(tiny_checkpoint), evil)
    assert re.fullmatch(
        rf"{re.escape(str(evil / 'adapter_model.bin'))}: refused to load, it holds more than tensors "
        r"\(it references (posix|nt)\.system\)", str(error.value)), str(error.value)

    os.remove(evil / "adapter_model.bin")
    with pytest.raises(ValueError, match=f"^{re.escape(str(evil))}: no adapter weights "):
        load_adapter(Phi3VForCausalLM.from_pretrained(tiny_checkpoint), evil)
    assert json.loads((evil / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_checkpoint
