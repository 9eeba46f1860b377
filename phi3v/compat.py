"""Everything this project takes from transformers beyond its documented public API, in one place.

A transformers minor release may rename or remove any of these (5.24 removed
`masking_utils.packed_sequence_compatibility_function` and renamed generation's `past_key_values` to `cache`), so
each use is here, with what it relies on, and tests/test_compat.py checks every one against the installed release
with a message that names the change. The versions CI tested are in requirements.txt (`TESTED_TRANSFORMERS`).

`check_transformers_version()` runs when `phi3v` is imported: an older transformers, which cannot work, stops with
one line naming the fix; a newer one, which may work, gets a warning.
"""

import inspect
import warnings

import transformers
from packaging.version import Version

# The release requirements.txt pins and CI tests; tests/test_compat.py checks that the two agree.
TESTED_TRANSFORMERS = "5.24.0"
# The oldest release with the generation API this module relies on (`cache`, `is_first_iteration`).
OLDEST_WORKING_TRANSFORMERS = "5.24.0"

INSTALL_HINT = "install the tested set: pip install -r requirements.txt"


def check_transformers_version(installed: str = transformers.__version__) -> None:
    """ImportError below OLDEST_WORKING_TRANSFORMERS, a warning above the tested minor release."""
    version = Version(installed)
    if version < Version(OLDEST_WORKING_TRANSFORMERS):
        raise ImportError(
            f"phi3v needs transformers {TESTED_TRANSFORMERS} (tested); this environment has {installed}, which is too "
            f"old for it: {INSTALL_HINT} (or pip install transformers=={TESTED_TRANSFORMERS})"
        )
    tested = Version(TESTED_TRANSFORMERS)
    if (version.major, version.minor) != (tested.major, tested.minor):
        warnings.warn(
            f"phi3v was tested with transformers {TESTED_TRANSFORMERS}; this environment has {installed}. It may "
            f"work; if anything fails, {INSTALL_HINT} (scripts/check_upgrades.sh tries the newest releases)",
            stacklevel=3,
        )


check_transformers_version()

try:
    # `create_causal_mask(config, inputs_embeds, attention_mask, cache, and_mask_function=...)` builds the mask in the
    # format of the configured attention (sdpa / eager / flex) from a mask function of ours (packed samples).
    from transformers.masking_utils import create_causal_mask

    # The model classes Phi3VForCausalLM builds on: the module path of transformers' Phi-3 implementation.
    from transformers.models.phi3.modeling_phi3 import Phi3Model, Phi3PreTrainedModel

    # The Trainer's own rule for which parameter names get weight decay (used by phi3v.optim).
    from transformers.trainer_pt_utils import get_parameter_names

    # Whether the config asks for a flash-attention kernel (any version), which takes packed samples as cu_seq_lens.
    from transformers.utils.generic import is_flash_attention_requested
except ImportError as error:  # a newer release moved something: one line, not a traceback from deep inside
    raise ImportError(
        f"phi3v cannot use transformers {transformers.__version__} ({error}); it was tested with "
        f"{TESTED_TRANSFORMERS}: {INSTALL_HINT}"
    ) from error

# The keyword names GenerationMixin.prepare_inputs_for_generation takes and generate passes (5.24): the cache,
# how many trailing tokens of input_ids this step runs (None: all of them), and whether this is the prefill.
GENERATION_CACHE_KWARG = "cache"
GENERATION_STEP_KWARGS = ("next_sequence_length", "is_first_iteration")


def keep_used_weight_conversions(model) -> None:
    """Drop the key conversions loading did not use from `model._weight_conversions`.

    transformers' ZeRO-3 loader keeps every candidate conversion (its plain loader only the used ones, each with
    `was_used()`), and `save_pretrained` reverts the kept ones on saving: it would "restore" CLIP's legacy
    `vision_model.` prefix that the checkpoint never had."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if c.was_used()]


def generation_step_parameters() -> set[str]:
    """The parameter names of the installed GenerationMixin.prepare_inputs_for_generation (checked by the tests)."""
    return set(inspect.signature(transformers.GenerationMixin.prepare_inputs_for_generation).parameters)


__all__ = [
    "TESTED_TRANSFORMERS",
    "Phi3Model",
    "Phi3PreTrainedModel",
    "create_causal_mask",
    "is_flash_attention_requested",
    "get_parameter_names",
    "keep_used_weight_conversions",
    "check_transformers_version",
]
