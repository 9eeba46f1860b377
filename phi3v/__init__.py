"""Native Phi-3-vision / Phi-3.5-vision for transformers 5: config, model, processor, and fine-tuning parts.

Importing this package registers the model type "phi3_v" with transformers' Auto classes, so that
AutoConfig, AutoModelForCausalLM and AutoProcessor load official checkpoint folders without trust_remote_code.
"""

from phi3v import compat  # noqa: F401  (first of all: checks the transformers version before anything uses it)

# isort: split
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

from phi3v.configuration import Phi3VConfig
from phi3v.image_processing import Phi3VImageProcessor
from phi3v.modeling import Phi3VForCausalLM, Phi3VModel
from phi3v.processing import Phi3VProcessor

AutoConfig.register("phi3_v", Phi3VConfig, exist_ok=True)
AutoModelForCausalLM.register(Phi3VConfig, Phi3VForCausalLM, exist_ok=True)
AutoProcessor.register(Phi3VConfig, Phi3VProcessor, exist_ok=True)

__all__ = ["Phi3VConfig", "Phi3VForCausalLM", "Phi3VModel", "Phi3VImageProcessor", "Phi3VProcessor"]
