"""Time and peak memory of loading a full-size Phi-3.5-vision checkpoint (random weights, official layout).

Writes the checkpoint once (official config, two bf16 safetensors shards + index, 592 tensors; never more than
one shard in memory), then loads it in a fresh process with `Phi3VForCausalLM.from_pretrained(dtype=...)` and
reports the wall time and the process's peak resident memory against the size of the weights. A loader that
built an fp32 copy, or held two copies at once, would peak near 2x the bf16 size.

    python benchmarks/bench_load.py --dir /tmp/phi3v-full-random
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def write_random_checkpoint(folder: str, shard_bytes: int = 5 * 2**30) -> None:
    import torch
    from safetensors.torch import save_file

    from phi3v import Phi3VConfig, Phi3VForCausalLM
    from phi3v.official import ASSETS

    official = os.path.join(ASSETS, "phi-3.5-vision-instruct")
    os.makedirs(folder, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        shutil.copy(os.path.join(official, name), folder)
    config = Phi3VConfig.from_pretrained(official)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Phi3VForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        current[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        size += current[name].numel() * 2
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, filename), metadata={"format": "pt"})
        for name, tensor in shard.items():
            weight_map[name] = filename
            total += tensor.numel() * 2
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


LOAD = """
import resource, time, torch, json
start = time.time()
from phi3v import Phi3VForCausalLM
model = Phi3VForCausalLM.from_pretrained({folder!r}, dtype=getattr(torch, {dtype!r}))
seconds = time.time() - start
params = sum(p.numel() for p in model.parameters())
print(json.dumps({{"seconds": seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "parameters": params, "dtypes": sorted({{str(p.dtype) for p in model.parameters()}}),
                  "weights_gb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30}}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--dir", default="/tmp/phi3v-full-random")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.dir, "model.safetensors.index.json")):
        start = time.time()
        write_random_checkpoint(args.dir)
        print(f"wrote {args.dir} in {time.time() - start:.0f} s")
    out = subprocess.run([sys.executable, "-c", LOAD.format(folder=args.dir, dtype=args.dtype)],
                         capture_output=True, text=True, check=True, cwd=os.path.dirname(HERE))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=2))
    print(f"peak RSS {result['peak_rss_gb']:.2f} GiB for {result['weights_gb']:.2f} GiB of {args.dtype} weights "
          f"({result['peak_rss_gb'] / result['weights_gb']:.2f}x); load took {result['seconds']:.1f} s")


if __name__ == "__main__":
    main()
