#!/usr/bin/env python3
"""Write SpecForge-style offline feature files with real torch.save (run once; needs torch).

    python gen_torch_real.py testdata/features_torch

The committed files under testdata/features/ are written by gen_torch_features.py without
torch; these are the real thing, so the tests check our reader against torch's own writer:
`rows_0-2000/data_<i>.ckpt` (and one `.ckpt.gz`), each a `torch.save` dict with SpecForge's keys
(`input_ids`, `loss_mask` int64 [S]; `hidden_state` bf16 [1,S,H]; `aux_hidden_state` bf16
[1,S,3H]) plus one tensor of every other dtype the ingest supports, a view with a storage offset
(a slice of a larger tensor: torch saves the whole storage) and a non-contiguous transpose.
`expected.json` maps each file to its tensors' dtype, shape and contiguous little-endian bytes
(hex), in the format of testdata/features/expected.json. Tests never need torch.
"""

import gzip
import io
import json
import os
import sys

import torch


def sample(seed: int, seq: int, hidden: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    big = torch.randn(6, hidden, generator=g, dtype=torch.float32)
    mat = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    return {
        "input_ids": torch.randint(0, 32000, (seq,), generator=g, dtype=torch.int64),
        "loss_mask": (torch.rand(seq, generator=g) > 0.3).to(torch.int64),
        "hidden_state": torch.randn(1, seq, hidden, generator=g).to(torch.bfloat16),
        "aux_hidden_state": torch.randn(1, seq, 3 * hidden, generator=g).to(torch.bfloat16),
        "f16": torch.randn(seq, 2, generator=g).to(torch.float16),
        "u8": torch.randint(0, 256, (seq,), generator=g, dtype=torch.uint8),
        "flags": torch.rand(seq, generator=g) > 0.5,
        "offset_view": big[2:5],
        "transposed": mat.t(),
    }


def main(out_dir: str) -> None:
    rows = os.path.join(out_dir, "rows_0-2000")
    os.makedirs(rows, exist_ok=True)
    expected = {}
    for i, (seq, hidden) in enumerate([(16, 8), (9, 4), (33, 8)]):
        d = sample(100 + i, seq, hidden)
        buf = io.BytesIO()
        torch.save(d, buf)
        name = f"data_{i}.ckpt" + (".gz" if i == 2 else "")
        data = gzip.compress(buf.getvalue(), mtime=0) if name.endswith(".gz") else buf.getvalue()
        with open(os.path.join(rows, name), "wb") as f:
            f.write(data)
        tensors = {}
        for k, t in d.items():
            c = t.contiguous()
            raw = c.numpy().tobytes() if c.dtype == torch.bool else c.view(torch.uint8).numpy().tobytes() if c.dtype == torch.bfloat16 else c.numpy().tobytes()
            tensors[k] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "hex": raw.hex()}
        expected[f"rows_0-2000/{name}"] = {"valid": True, "tensors": tensors}
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"torch {torch.__version__}: wrote {len(expected)} files to {rows}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "features_torch"))
