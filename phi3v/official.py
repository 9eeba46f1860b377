"""The official file forms of the two base models, so that every folder this project writes is a drop-in for them.

A fine-tuned folder is used where the base checkpoint is: transformers with `trust_remote_code=True` (the base
repository's modeling/processing code), vLLM (`Phi3VForCausalLM`, processor from that remote code), the hub. They
read `config.json`, `preprocessor_config.json` and `processor_config.json` as the base writes them, so this
project writes them in that form, whatever transformers version runs here:

- the keys of the base's own file (phi3v/assets/<base>/, byte copies of the official files), in its order;
- LongRoPE as the base writes it, `rope_scaling: {"long_factor", "short_factor", "type": "su"}` with `rope_theta`
  beside it (transformers 5's `rope_parameters` is not written: the remote code does not know it);
- `auto_map` entries pointing at the base repository's code: "<repo>--configuration_phi3_v.Phi3VConfig", ... The
  files themselves are not copied (they stay the base repository's); transformers fetches them from that repository.

Which repository: the one the loaded files named (an `auto_map` entry "<repo>--..." of a folder this project
wrote), else the hub id the model was loaded from when its files carried the remote code ("microsoft/..."), else the
official repository of the base recognised from its config (`sliding_window`: 262144 for Phi-3.5-vision, 131072 for
Phi-3-vision-128k; Phi-3.5-vision when neither). A processor whose preprocessor_config.json names no remote code
follows the config.json beside it. The native loader (phi3v) reads all of these forms.
"""

import json
import os
import re

PHI3_5_VISION = "microsoft/Phi-3.5-vision-instruct"
PHI3_VISION_128K = "microsoft/Phi-3-vision-128k-instruct"
DEFAULT_BASE = PHI3_5_VISION

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
_ASSET_FOLDERS = {PHI3_5_VISION: "phi-3.5-vision-instruct", PHI3_VISION_128K: "phi-3-vision-128k-instruct"}

# `sliding_window` of each base's config.json: the one key whose value tells them apart.
_SLIDING_WINDOWS = {262144: PHI3_5_VISION, 131072: PHI3_VISION_128K}

# processor_config.json: Phi-3.5-vision's file. The Phi-3-vision-128k repository has none; its
# preprocessor_config.json names the same AutoProcessor class, which the same form points at.
_PROCESSOR_CONFIG = {
    "auto_map": {"AutoProcessor": "processing_phi3_v.Phi3VProcessor"},
    "processor_class": "Phi3VProcessor",
}

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def official_file(base: str, name: str) -> dict:
    """The official `name` (config.json, preprocessor_config.json, processor_config.json) of an official base."""
    if base not in _ASSET_FOLDERS:
        raise ValueError(f"{base!r} is not one of the official bases {sorted(_ASSET_FOLDERS)}")
    if name == "processor_config.json":
        return json.loads(json.dumps(_PROCESSOR_CONFIG))
    with open(os.path.join(ASSETS, _ASSET_FOLDERS[base], name)) as f:
        return json.load(f)


def is_hub_id(name) -> bool:
    """Whether `name` reads as a hub repository id ("owner/name") and is not a local path."""
    name = os.fspath(name or "")
    return bool(_HUB_ID.fullmatch(name)) and not os.path.exists(name)


def code_repo_in_auto_map(auto_map) -> str | None:
    """The repository an `auto_map` points at ("<repo>--module.Class" entries); "" when its entries name files
    beside the config (the base's own form); None when there is no auto_map."""
    if not isinstance(auto_map, dict) or not auto_map:
        return None
    for reference in auto_map.values():
        reference = reference[0] if isinstance(reference, (list, tuple)) else reference
        if isinstance(reference, str) and "--" in reference:
            return reference.split("--", 1)[0]
    return ""


def code_repo_of_source(auto_map, source) -> str | None:
    """The repository whose remote code loaded files use: the repo their auto_map names, or `source` itself when
    it is a hub id whose files carry the code (auto_map entries without a repo); None when not known."""
    repo = code_repo_in_auto_map(auto_map)
    if repo == "":
        return os.fspath(source) if source is not None and is_hub_id(source) else None
    return repo


def recognise_base(code_repo: str | None = None, sliding_window=None) -> str:
    """The official base whose file forms to write: named by the code repository, else recognised from
    `sliding_window`, else Phi-3.5-vision."""
    if code_repo in _ASSET_FOLDERS:
        return code_repo
    return _SLIDING_WINDOWS.get(sliding_window, DEFAULT_BASE)


def base_of_model_folder(folder) -> tuple[str, str] | None:
    """(base, repository) that the config.json of a local model folder points at (see the module docstring), or
    None when the folder has none: for a processor whose own file names no remote code."""
    path = os.path.join(os.fspath(folder), "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    repo = code_repo_in_auto_map(config.get("auto_map")) or None
    base = recognise_base(repo, config.get("sliding_window"))
    return base, repo or base


def pointing_at(auto_map: dict, repo: str) -> dict:
    """`auto_map` with every entry "<repo>--module.Class" (a repo already named in an entry is replaced)."""
    return {key: f"{repo}--{value.split('--', 1)[-1]}" for key, value in auto_map.items()}


def processor_config(base: str, repo: str) -> dict:
    """processor_config.json for a folder of `base`, its auto_map pointing at `repo`."""
    config = official_file(base, "processor_config.json")
    config["auto_map"] = pointing_at(config["auto_map"], repo)
    return config


def write_json(path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
