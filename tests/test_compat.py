"""Each transformers internal the project relies on (phi3v/compat.py), checked against the installed release.

When an upgrade breaks one of these, the failure names what changed, so the fix starts at the right place.
"""

import dataclasses
import inspect
import os
import re
import subprocess
import sys

import pytest
import torch
import transformers

from phi3v import compat

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_the_tested_transformers_is_the_pinned_and_the_installed_one():
    with open(os.path.join(ROOT, "requirements.txt")) as handle:
        pinned = re.search(r"^transformers==(\S+)$", handle.read(), re.M).group(1)
    assert compat.TESTED_TRANSFORMERS == pinned, "phi3v/compat.py TESTED_TRANSFORMERS must equal requirements.txt's pin"
    assert transformers.__version__ == pinned, f"CI must run the pinned transformers, not {transformers.__version__}"


def test_an_older_transformers_stops_with_one_line_naming_the_fix():
    with pytest.raises(ImportError) as error:
        compat.check_transformers_version("5.23.0")
    message = str(error.value)
    assert "\n" not in message
    assert "5.23.0" in message and compat.TESTED_TRANSFORMERS in message
    assert "pip install -r requirements.txt" in message


def test_a_newer_transformers_warns_and_the_tested_one_is_silent(recwarn):
    compat.check_transformers_version(compat.TESTED_TRANSFORMERS)
    compat.check_transformers_version(compat.TESTED_TRANSFORMERS[:-1] + "9")  # a patch release of the same minor
    assert len(recwarn) == 0
    with pytest.warns(UserWarning, match=r"tested with transformers 5\.24\.0; this environment has 5\.30\.0"):
        compat.check_transformers_version("5.30.0")


def test_importing_phi3v_next_to_an_old_transformers_says_which_version_to_install():
    # A fake transformers 5.20 ahead of the real one on sys.path: the import stops at the version check.
    code = (
        "import sys, types; fake = types.ModuleType('transformers'); fake.__version__ = '5.20.0';"
        "sys.modules['transformers'] = fake\n"
        "try:\n    import phi3v\nexcept ImportError as e:\n    print('ImportError:', e)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith(
        "ImportError: phi3v needs transformers 5.24.0 (tested); this environment has 5.20.0"
    )


def test_generation_passes_cache_and_step_keywords_by_these_names():
    names = compat.generation_step_parameters()
    missing = {compat.GENERATION_CACHE_KWARG, *compat.GENERATION_STEP_KWARGS} - names
    assert not missing, (
        f"GenerationMixin.prepare_inputs_for_generation no longer takes {sorted(missing)}: update "
        "Phi3VForCausalLM.prepare_inputs_for_generation (which decides when images go into a step)"
    )
    fields = {field.name for field in dataclasses.fields(transformers.modeling_outputs.CausalLMOutputWithPast)}
    assert "cache" in fields, "CausalLMOutputWithPast no longer has `cache`: update Phi3VForCausalLM.forward"


def test_create_causal_mask_takes_a_mask_function_of_ours():
    parameters = inspect.signature(compat.create_causal_mask).parameters
    for name in ("config", "inputs_embeds", "attention_mask", "cache", "and_mask_function"):
        assert name in parameters, f"masking_utils.create_causal_mask lost `{name}`: update packed_attention_mask"


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_packed_attention_mask_is_causal_within_each_sample(tiny_checkpoint, implementation):
    from phi3v import Phi3VForCausalLM

    model = Phi3VForCausalLM.from_pretrained(tiny_checkpoint, attn_implementation=implementation)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0]])  # samples of 3, 2 and 1 tokens in one row
    embeds = torch.zeros(1, 6, model.config.hidden_size)
    mask = model.model.packed_attention_mask(embeds, position_ids)
    allowed = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    if implementation == "eager":  # additive: 0 where attended, the dtype's minimum elsewhere
        assert mask.dtype == embeds.dtype
        assert torch.equal(mask[0, 0] == 0, allowed)
    else:
        assert torch.equal(mask[0, 0], allowed)


def test_weight_conversions_record_whether_loading_used_them():
    from transformers.core_model_loading import WeightTransform

    assert callable(getattr(WeightTransform, "was_used", None)), (
        "transformers.core_model_loading.WeightTransform.was_used is gone: update compat.keep_used_weight_conversions"
    )

    class Conversion:
        def __init__(self, used):
            self.used = used

        def was_used(self):
            return self.used

    class Model:
        _weight_conversions = [Conversion(True), Conversion(False)]

    model = Model()
    compat.keep_used_weight_conversions(model)
    assert [c.used for c in model._weight_conversions] == [True]


def test_get_parameter_names_leaves_out_forbidden_layers_and_names():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    assert compat.get_parameter_names(model, [torch.nn.LayerNorm], ["bias"]) == ["0.weight"]


def test_trainer_writes_trainer_state_after_the_checkpoint_and_rotates_last():
    # phi3v/checkpoints.py trusts a checkpoint whose trainer_state.json exists: the Trainer must write it after the
    # model, optimizer and RNG state, and remove old checkpoints only after that.
    source = inspect.getsource(transformers.Trainer._save_checkpoint)
    order = ["self.save_model(", "self._save_optimizer_and_scheduler(", "self._save_rng_state(",
             "self.state.save_to_json(", "rotate_checkpoints("]
    positions = [source.find(call) for call in order]
    assert -1 not in positions, f"Trainer._save_checkpoint no longer calls {order[positions.index(-1)]}"
    assert positions == sorted(positions), (
        "Trainer._save_checkpoint changed its write order: review phi3v/checkpoints.py"
    )


def test_training_arguments_name_activation_checkpointing_so():
    fields = {field.name for field in dataclasses.fields(transformers.TrainingArguments)}
    assert "activation_checkpointing" in fields, "TrainingArguments renamed activation_checkpointing: see arguments.py"
