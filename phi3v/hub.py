"""Finding a model's files in a local folder or on the Hugging Face hub (hub id such as
microsoft/Phi-3.5-vision-instruct, downloaded once into the hub cache)."""

import os


def resolve_file(path_or_hub_id, filename: str, **hub_kwargs) -> str:
    """Local path of `filename` from a model folder or a hub id; a clear error when it is not there."""
    path_or_hub_id = os.fspath(path_or_hub_id)
    if os.path.isdir(path_or_hub_id):
        path = os.path.join(path_or_hub_id, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path_or_hub_id} has no {filename}: is it a Phi-3-V model folder?")
        return path
    if os.path.exists(path_or_hub_id) or path_or_hub_id.startswith((".", "/")):
        raise FileNotFoundError(f"{path_or_hub_id} is not a model folder")
    from huggingface_hub import hf_hub_download

    allowed = {k: v for k, v in hub_kwargs.items() if k in ("revision", "cache_dir", "token", "local_files_only")}
    try:
        return hf_hub_download(path_or_hub_id, filename, **allowed)
    except Exception as error:  # offline, unknown repo, missing file: say what to do instead
        raise OSError(
            f"could not get {filename} of {path_or_hub_id!r} from the Hugging Face hub ({type(error).__name__}: "
            f"{error}). Without network, download the model elsewhere and pass its local folder."
        ) from error
