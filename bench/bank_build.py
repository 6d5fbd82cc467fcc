"""Time and peak memory of building a bank for a real-sized random model (default: mamba-130m's shape).

    python -m bench.bank_build --tokenizer gpt-neox-20b.tokenizer.json --data TRAIN_SHARD \
        --buckets 4k,8k,16k,32k,64k --calibrator zo --out $OUT/bank130m

Writes a random-weight checkpoint of the shape (transformers layout), runs `extend.build_bank` on it, and
prints each bucket's calibration time and peak accelerator memory as the manifest records them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from extend.build_bank import main as build_bank
from runtime import MAMBA1, MambaLM, ModelConfig
from runtime.backend import select_backend
from runtime.checkpoint_writer import save_hf
from runtime.init_weights import init_weights
from runtime.tokenizer import Tokenizer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--n-layer", type=int, default=24)
    p.add_argument("--buckets", default="4k,8k,16k,32k,64k")
    args, build_args = p.parse_known_args(argv)
    tokenizer = Tokenizer(args.tokenizer)
    config = ModelConfig(arch=MAMBA1, d_model=args.d_model, n_layer=args.n_layer, vocab_size=50280,
                         training_context_length=2048)
    with tempfile.TemporaryDirectory() as directory:
        model = MambaLM(config, select_backend("torch", "cpu"))
        init_weights(model, seed=0)
        save_hf(model, Path(args.tokenizer), tokenizer.eos_token_id, Path(directory))
        del model
        build_bank(["--model", directory, "--buckets", args.buckets, "--data", *args.data, "--out", str(args.out),
                    "--no-progress", *build_args])
    manifest = json.loads((args.out / "bank.json").read_text())
    print(f"\n{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}: d_model {args.d_model}, "
          f"{args.n_layer} layers, {' '.join(build_args)}")
    print(f"{'bucket':>7} {'seconds':>8} {'peak GiB':>9} {'kept':>11}")
    for entry in manifest["entries"]:
        c = entry["calibrator"]
        print(f"{entry['bucket']:>7} {c['seconds']:>8.1f} {c.get('peak_memory_gib', float('nan')):>9.2f} "
              f"{entry['chosen']:>11}")


if __name__ == "__main__":
    main()
