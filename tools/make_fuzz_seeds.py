"""Writes the seed corpus of the loader fuzz test (tests/fuzz_loaders.rs) into tests/fixtures/fuzz/.

Small files in the upstream formats, made by the upstream writers: a safetensors file (safetensors.torch)
and a torch.save archive with a transposed view, an offset view and an expanded (stride-0) view, and an
InternVL3-style config.json (the Qwen2 config of tests/fixtures/llm_gqa_untied nested under `llm_config`).
Run with the reference venv: /work/venv-refs/bin/python tools/make_fuzz_seeds.py
"""
import json
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import save_file

root = Path(__file__).resolve().parent.parent
out = root / "tests" / "fixtures" / "fuzz"
out.mkdir(parents=True, exist_ok=True)
g = torch.Generator().manual_seed(18)

save_file(
    {
        "w": torch.randn(3, 4, generator=g),
        "b": torch.randn(4, generator=g).to(torch.bfloat16),
        "ids": torch.arange(5, dtype=torch.int64),
        "h": torch.randn(2, 2, generator=g).to(torch.float16),
    },
    str(out / "seed.safetensors"),
    metadata={"format": "pt"},
)

base = torch.randn(4, 3, generator=g)
torch.save(
    OrderedDict([
        ("t", base.t()),
        ("row", base[2]),
        ("expanded", torch.ones(1).expand(3, 2)),
        ("step", torch.tensor(7)),
        ("mask", torch.tensor([True, False])),
    ]),
    str(out / "seed.pth"),
)

llm = json.loads((root / "tests/fixtures/llm_gqa_untied/model/config.json").read_text())
nested = {
    "architectures": ["InternVLChatModel"],
    "model_type": "internvl_chat",
    "llm_config": llm,
    "vision_config": {"hidden_size": 32, "num_hidden_layers": 1, "model_type": "intern_vit_6b"},
}
(out / "internvl3_config.json").write_text(json.dumps(nested, indent=2) + "\n")
