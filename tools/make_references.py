#!/usr/bin/env python3
"""Generate the OpenUni reference cases in tests/fixtures/ with the upstream PyTorch implementations.

Every case follows the contract of shared/cases/README.md: CASE/case.json, CASE/model/ (upstream
save_pretrained layout), CASE/io.safetensors (f32 tensors, i64 token ids / scheduler timesteps, optional mid.*).
On top of that contract every numeric case also stores `bf16.<output>`: the same computation with the model
and its float inputs cast to bf16 (the output cast back to f32), so that a bf16 engine can be held to "at most
2x the error of a plain PyTorch bf16 run"; case.json's `bf16_rel_l2` holds that run's relative L2 error against
the f32 expected output. Exceptions: the DiT `timestep` stays f32 (as SanaPipeline passes it; 999 is not a bf16
value) and the mask becomes a bias inside the model; the pipeline keeps its latents and the scheduler in f32
(as SanaPipeline does), decodes `latents.to(bf16) / scaling_factor` in bf16 and converts to uint8 in f32; it
stores bf16.prompt_embeds, bf16.latents, bf16.mid.decoded and bf16.image. Scheduler cases have no bf16.* .
tests/fixtures/pth/ holds small torch.save files for the .pth reader (benign ones with *.expected.safetensors,
and hostile ones whose data.pkl calls os.system / builtins.eval: never unpickle those).

After generating a case the script re-checks it from the files on disk with independent float64 plain-PyTorch
re-implementations written from the README/spec (section "independent float64 re-implementations" below; a
readable reference for the Rust port): every stored tensor must agree to 1e-5 relative L2.

Install (once, into a venv OUTSIDE the repository; torch from PyPI is the ~3 GB CUDA build, used on CPU):
    python3 -m venv /work/venv-refs
    /work/venv-refs/bin/pip install -U pip
    /work/venv-refs/bin/pip install -r tools/requirements-refs.txt

Run (about 10 s on 2 cores, plus ~5 s of imports; nothing is downloaded, every model is built from a config):
    /work/venv-refs/bin/python tools/make_references.py                   # all cases -> tests/fixtures/
    /work/venv-refs/bin/python tools/make_references.py --only dit_sana10_mask --only pth
    /work/venv-refs/bin/python tools/make_references.py --out /tmp/refs  # e.g. to diff -r against the committed ones
    /work/venv-refs/bin/python tools/make_references.py --sensitivity    # also print how much each weight matters
    /work/venv-refs/bin/python tools/make_references.py --help           # case names and options

Determinism: CPU, float32, one thread, fixed seeds, eager attention; two runs give byte-identical files.
Every case is re-computed after reloading model/ from disk (from_pretrained / load_state_dict) and must match
exactly; the script aborts otherwise.
"""

import os

# Must be set before torch / tokenizers are imported.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["DIFFUSERS_VERBOSITY"] = "error"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import argparse
import copy
import fnmatch
import io
import json
import math
import pickletools
import shutil
import struct
import sys
import unicodedata
import warnings
import zipfile
from collections import Counter, OrderedDict
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(1)
torch.set_num_interop_threads(1)
torch.use_deterministic_algorithms(True)
torch.set_default_dtype(torch.float32)

import accelerate  # noqa: E402
import diffusers  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.models.attention_processor import SanaMultiscaleLinearAttention  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig  # noqa: E402
from transformers.models.siglip.modeling_siglip import SiglipEncoder  # noqa: E402

diffusers.utils.logging.set_verbosity_error()
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
diffusers.utils.logging.disable_progress_bar()

GENERATOR = "tools/make_references.py"
LIBRARIES = {
    "torch": torch.__version__,
    "diffusers": diffusers.__version__,
    "transformers": transformers.__version__,
    "tokenizers": tokenizers.__version__,
    "safetensors": safetensors.__version__,
    "accelerate": accelerate.__version__,
}
CPU = torch.device("cpu")
SCALING_FACTOR = 0.41407

# --------------------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------------------


def f32(t):
    return t.detach().to(torch.float32).contiguous().clone()


def rel_l2(a, b):
    a = a.detach().double()
    b = b.detach().double()
    den = b.norm()
    return float((a - b).norm() / den) if den > 0 else float((a - b).norm())


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")


def save_io(path, tensors):
    out = {}
    for k, v in tensors.items():
        v = v.detach()
        if v.dtype not in (torch.float32, torch.int64):
            raise TypeError(f"{k}: {v.dtype} is not allowed in io.safetensors")
        out[k] = v.contiguous().clone()
    save_file(out, str(path))


def save_weights(path, state_dict):
    save_file({k: v.detach().contiguous().clone() for k, v in state_dict.items()}, str(path), metadata={"format": "pt"})


def assert_same(name, got, want):
    """Exact equality (reload checks): the same code on the same weights must give the same bits."""
    for k, w in want.items():
        g = got[k]
        if g.shape != w.shape or g.dtype != w.dtype or not torch.equal(g, w):
            diff = (g.double() - w.double()).abs().max().item() if g.shape == w.shape else float("nan")
            raise AssertionError(f"{name}: {k} differs after reload (max abs {diff})")


class Recorder:
    """Forward (output) and forward-pre (input) hooks that copy tensors into a dict, as f32."""

    def __init__(self):
        self.values = {}
        self.handles = []

    def output(self, module, name, pick=None):
        def hook(mod, args, out):
            self.values[name] = f32(pick(out) if pick else out)

        self.handles.append(module.register_forward_hook(hook))

    def input(self, module, name):
        def hook(mod, args):
            self.values[name] = f32(args[0])

        self.handles.append(module.register_forward_pre_hook(hook))

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def shape_params(model, seed, x2=(), x6=("*scale_shift_table",)):
    """Make every parameter matter (shared/cases/README.md, "How the expected values were computed"):

    1. every constant-valued tensor of the default init (norm weights == 1, zero biases) gets + 0.1 * N(0, 1);
    2. every bias is multiplied by 3;
    3. tensors matching `x2` (softmax-attention q/k projections, SANA1.5 cross-attention q/k norm weights) by 2;
    4. tensors matching `x6` (SANA adaLN scale_shift_tables) by 6.
    Returns {name: constant} for the tensors of step 1 (used by the sensitivity report).
    """
    gen = torch.Generator().manual_seed(seed)
    const = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().flatten()
            if p.numel() > 1 and bool(torch.all(flat == flat[0])):
                const[name] = float(flat[0])
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.mul_(3.0)
            if any(fnmatch.fnmatchcase(name, pat) for pat in x2):
                p.mul_(2.0)
            if any(fnmatch.fnmatchcase(name, pat) for pat in x6):
                p.mul_(6.0)
    return const


def bf16_copy(module):
    return copy.deepcopy(module).to(torch.bfloat16).eval()


def sensitivity_report(name, model, run, keys, const):
    """For every parameter: relative L2 change of the compared outputs (max over `keys`) when the tensor is scaled
    by 1.01, and when a bias / originally-constant tensor is reset to its default (0 or 1)."""
    base = run(model)
    scaled, removed = [], []
    with torch.no_grad():
        for pname, p in model.named_parameters():
            orig = p.detach().clone()
            p.mul_(1.01)
            out = run(model)
            scaled.append((max(rel_l2(out[k], base[k]) for k in keys), pname))
            p.copy_(orig)
            if pname.endswith("bias") or pname in const:
                p.fill_(const.get(pname, 0.0))
                out = run(model)
                removed.append((max(rel_l2(out[k], base[k]) for k in keys), pname))
                p.copy_(orig)
    vals = sorted(v for v, _ in scaled)
    med = vals[len(vals) // 2]
    print(f"  [sensitivity {name}] {len(scaled)} tensors; 1% scale: median {med:.2e}, min {vals[0]:.2e} "
          f"({min(scaled)[1]}), max {vals[-1]:.2e}")
    weak = sorted((v, n) for v, n in scaled if v < 1e-4)
    for v, n in weak:
        print(f"      1% scale < 1e-4: {n}: {v:.2e}")
    if removed:
        rv = sorted(removed)
        print(f"    reset bias/const ({len(rv)} tensors): min {rv[0][0]:.2e} ({rv[0][1]})")
        for v, n in rv:
            if v < 1e-3:
                print(f"      reset < 1e-3: {n}: {v:.2e}")
    return {"median_1pct": med, "scaled": scaled, "removed": removed}


def case_json(component, seed, **kw):
    d = {"component": component}
    d.update(kw)
    d["generator"] = GENERATOR
    d["seed"] = seed
    d["libraries"] = LIBRARIES
    return d


# --------------------------------------------------------------------------------------------------------------
# connector (OpenUni ConnectorEncoder == SiglipEncoder without embeddings / final norm)
# --------------------------------------------------------------------------------------------------------------

CONNECTOR_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "layer_norm_eps",
                  "hidden_act")


def build_connector(cfg):
    vc = SiglipVisionConfig(**cfg, attention_dropout=0.0)
    vc._attn_implementation = "eager"
    return SiglipEncoder(vc).eval()


def run_connector(enc, x, mids=True):
    rec = Recorder()
    if mids:
        for i, layer in enumerate(enc.layers):
            rec.output(layer, f"mid.layers.{i}")
    with torch.no_grad():
        out = enc(inputs_embeds=x).last_hidden_state
    rec.close()
    res = {"outputs": f32(out)}
    res.update(rec.values)
    return res


def case_connector_b2(out_dir, args):
    seed = 1101
    cfg = {"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 3, "num_hidden_layers": 2,
           "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"}
    torch.manual_seed(seed)
    enc = build_connector(cfg)
    const = shape_params(enc, seed + 1, x2=("*.q_proj.weight", "*.k_proj.weight"))
    gen = torch.Generator().manual_seed(seed + 2)
    x = randn(gen, 2, 10, 48)

    mdir = out_dir / "model"
    mdir.mkdir(parents=True)
    write_json(mdir / "config.json", {k: cfg[k] for k in CONNECTOR_KEYS})
    save_weights(mdir / "model.safetensors", enc.state_dict())

    # reference from the reloaded folder
    cfg2 = json.loads((mdir / "config.json").read_text())
    enc2 = build_connector(cfg2)
    enc2.load_state_dict(load_file(str(mdir / "model.safetensors")), strict=True)
    res = run_connector(enc2, x)
    assert_same("connector_b2", run_connector(enc, x), res)

    b = bf16_copy(enc2)
    bf = run_connector(b, x.to(torch.bfloat16), mids=False)["outputs"]
    io_t = {"inputs": x, **res, "bf16.outputs": bf}
    bf16_err = {"outputs": rel_l2(bf, res["outputs"])}
    save_io(out_dir / "io.safetensors", io_t)
    write_json(out_dir / "case.json", case_json("connector", seed, batch=2, tokens=10, connector=cfg,
                                                bf16_rel_l2=bf16_err))
    sens = None
    if args.sensitivity:
        sens = sensitivity_report("connector_b2", enc2, lambda m: run_connector(m, x, mids=False), ["outputs"], const)
    return {"bf16": bf16_err, "sens": sens}


# --------------------------------------------------------------------------------------------------------------
# Qwen2 LLM
# --------------------------------------------------------------------------------------------------------------


def qwen2_config(vocab, hidden, inter, layers, heads, kv_heads, tied):
    cfg = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768,
        rms_norm_eps=1e-6, tie_word_embeddings=tied, initializer_range=0.1, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=True, attention_dropout=0.0,
    )
    cfg._attn_implementation = "eager"
    return cfg


def to_internvl3_config_form(config_path):
    """Rewrite a transformers-5 Qwen2 config.json into the form of InternVL3's llm_config: top-level rope_theta,
    rope_scaling {factor 2, dynamic} (with both "type" and "rope_type", as the shared cases do) and torch_dtype."""
    cfg = json.loads(Path(config_path).read_text())
    rope = cfg.pop("rope_parameters")
    assert rope["rope_type"] == "default", rope
    new = {}
    for k, v in cfg.items():
        new["torch_dtype" if k == "dtype" else k] = v
    new["rope_theta"] = rope["rope_theta"]
    new["rope_scaling"] = {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"}
    keys = sorted(new, key=lambda k: "dtype" if k == "torch_dtype" else k)
    Path(config_path).write_text(json.dumps({k: new[k] for k in keys}, indent=2, sort_keys=False) + "\n")


def load_qwen2(path):
    m = Qwen2ForCausalLM.from_pretrained(str(path), attn_implementation="eager", dtype=torch.float32)
    return m.eval()


def run_llm(m, ids, mids=True):
    rec = Recorder()
    if mids:
        rec.output(m.model.embed_tokens, "mid.embed_tokens")
        for i, layer in enumerate(m.model.layers):
            rec.output(layer, f"mid.layers.{i}", pick=lambda o: o[0] if isinstance(o, tuple) else o)
    with torch.no_grad():
        out = m(input_ids=ids, use_cache=False, output_hidden_states=True)
    rec.close()
    res = {"hidden_states": f32(out.hidden_states[-1])}
    if mids:
        res.update(rec.values)
        res["mid.logits"] = f32(out.logits)
        with torch.no_grad():
            last = m.model(input_ids=ids, use_cache=False).last_hidden_state
        assert torch.equal(f32(last), res["hidden_states"])
    return res


def case_llm_gqa_untied(out_dir, args):
    seed = 1201
    vocab, hidden, inter, layers, heads, kv = 256, 64, 128, 2, 4, 2
    torch.manual_seed(seed)
    cfg = qwen2_config(vocab, hidden, inter, layers, heads, kv, tied=False)
    m = Qwen2ForCausalLM(cfg).eval()
    const = shape_params(m, seed + 1, x2=("*.q_proj.weight", "*.k_proj.weight"))
    gen = torch.Generator().manual_seed(seed + 2)
    B, L = 2, 9
    ids = torch.randint(0, vocab, (B, L), generator=gen, dtype=torch.int64)

    mdir = out_dir / "model"
    m.save_pretrained(str(mdir))
    to_internvl3_config_form(mdir / "config.json")
    m2 = load_qwen2(mdir)
    assert set(m2.state_dict()) == set(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    assert "lm_head.weight" in load_file(str(mdir / "model.safetensors"))
    rope = m2.config.rope_parameters
    assert rope.get("rope_type") == "dynamic" and rope.get("rope_theta") == 1e6, rope

    res = run_llm(m2, ids)  # the config as written (dynamic NTK, inactive below 32768 positions)
    assert_same("llm_gqa_untied (plain-RoPE in-memory model vs reloaded dynamic config)", run_llm(m, ids), res)

    b = bf16_copy(m2)
    bf = run_llm(b, ids, mids=False)["hidden_states"]
    bf16_err = {"hidden_states": rel_l2(bf, res["hidden_states"])}
    save_io(out_dir / "io.safetensors", {"input_ids": ids, **res, "bf16.hidden_states": bf})
    write_json(out_dir / "case.json", case_json(
        "llm", seed, batch=B, seq_len=L, config_form="internvl3", tie_word_embeddings=False,
        bf16_rel_l2=bf16_err))
    sens = None
    if args.sensitivity:
        sens = sensitivity_report("llm_gqa_untied", m2, lambda mm: run_llm(mm, ids, mids=False), ["hidden_states"],
                                  const)
    return {"bf16": bf16_err, "sens": sens}


# --------------------------------------------------------------------------------------------------------------
# InternVL vision: InternViT + pixel shuffle v2 + mlp1 (component `vit`)
# --------------------------------------------------------------------------------------------------------------


def internvl_tiny_config(vit_hidden, vit_heads, vit_inter, vit_layers, llm_hidden, vocab, llm_layers=1, image=448,
                         norm_type="layer_norm", qk_norm=False, feature_layer=-1):
    """A small transformers InternVLConfig, by default at the real tile geometry (448 px, patch 14, 1025 tokens)."""
    from transformers import InternVLConfig
    vision = dict(hidden_size=vit_hidden, num_attention_heads=vit_heads, intermediate_size=vit_inter,
                  num_hidden_layers=vit_layers, image_size=[image, image], patch_size=[14, 14], num_channels=3,
                  attention_bias=True, use_qk_norm=qk_norm, norm_type=norm_type, layer_norm_eps=1e-6,
                  hidden_act="gelu", use_mean_pooling=True, use_absolute_position_embeddings=True,
                  layer_scale_init_value=0.1, initializer_range=0.1)
    text = qwen2_config(vocab, llm_hidden, 2 * llm_hidden, llm_layers, 2, 1, tied=False).to_dict()
    cfg = InternVLConfig(vision_config=vision, text_config=text, downsample_ratio=0.5, projector_hidden_act="gelu",
                         vision_feature_layer=feature_layer, vision_feature_select_strategy="default",
                         image_token_id=vocab - 1,
                         tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    return cfg


def internvl_to_original(sd, C):
    """transformers' InternVL state dict -> the original InternVL checkpoint keys (the inverse of transformers'
    convert_internvl_weights_to_hf.py: q/k/v concatenated into qkv, renamed modules)."""
    out = {}
    for k, v in sd.items():
        if k == "lm_head.weight":
            out["language_model.lm_head.weight"] = v
            continue
        if k.startswith("model.language_model."):
            out["language_model.model." + k[len("model.language_model."):]] = v
            continue
        if k.startswith("model.multi_modal_projector."):
            n = k[len("model.multi_modal_projector."):]
            for a, b in (("layer_norm.", "mlp1.0."), ("linear_1.", "mlp1.1."), ("linear_2.", "mlp1.3.")):
                if n.startswith(a):
                    out[b + n[len(a):]] = v
            continue
        assert k.startswith("model.vision_tower."), k
        n = k[len("model.vision_tower."):]
        if ".attention.k_proj." in n or ".attention.v_proj." in n:
            continue
        if ".attention.q_proj." in n:
            kind = n.rsplit(".", 1)[1]
            stem = n.split(".attention.q_proj.")[0]
            qkv = torch.cat([sd[f"model.vision_tower.{stem}.attention.{x}_proj.{kind}"] for x in "qkv"], 0)
            n = f"{stem}.attn.qkv.{kind}"
            v = qkv
        for a, b in (("embeddings.cls_token", "embeddings.class_embedding"),
                     ("embeddings.position_embeddings", "embeddings.position_embedding"),
                     ("embeddings.patch_embeddings.projection.", "embeddings.patch_embedding."),
                     ("encoder.layer.", "encoder.layers."), (".layernorm_before.", ".norm1."),
                     (".layernorm_after.", ".norm2."), (".attention.projection_layer.", ".attn.proj."),
                     (".lambda_1", ".ls1"), (".lambda_2", ".ls2"), (".attention.q_norm.", ".attn.q_norm."),
                     (".attention.k_norm.", ".attn.k_norm.")):
            n = n.replace(a, b)
        out["vision_model." + n] = v
    return out


def internvl_original_config(cfg, llm_config_path):
    """The original InternVL3 config.json nesting (InternVLChatConfig: vision_config + llm_config) for `cfg`."""
    vc = cfg.vision_config
    llm = json.loads(Path(llm_config_path).read_text())
    image = vc.image_size[0]
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": 0.5,
        "dynamic_image_size": True, "force_image_size": image, "max_dynamic_patch": 12, "min_dynamic_patch": 1,
        "use_thumbnail": True, "ps_version": "v2", "select_layer": cfg.vision_feature_layer, "template": "internvl2_5",
        "pad2square": False,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_size": cfg.text_config.hidden_size,
        "system_message": None,
        "vision_config": {
            "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": vc.hidden_size,
            "intermediate_size": vc.intermediate_size, "num_hidden_layers": vc.num_hidden_layers,
            "num_attention_heads": vc.num_attention_heads, "image_size": image, "patch_size": 14, "num_channels": 3,
            "norm_type": vc.norm_type, "layer_norm_eps": 1e-6, "qkv_bias": True, "qk_normalization": vc.use_qk_norm,
            "hidden_act": "gelu", "use_flash_attn": False, "drop_path_rate": 0.0, "dropout": 0.0,
            "attention_dropout": 0.0, "initializer_factor": 0.1, "torch_dtype": "bfloat16",
        },
        "llm_config": llm,
    }


def save_internvl_original(m, cfg, out_dir):
    """`out_dir/model`: the original layout (converted keys, InternVLChatConfig nesting with the llm_config in
    InternVL3's form, bf16 tensors in one model.safetensors)."""
    mdir = out_dir / "model"
    mdir.mkdir()
    tmp = out_dir / "_llm"
    Qwen2ForCausalLM(cfg.text_config).save_pretrained(str(tmp))
    to_internvl3_config_form(tmp / "config.json")
    write_json(mdir / "config.json", internvl_original_config(cfg, tmp / "config.json"))
    shutil.rmtree(tmp)
    orig = internvl_to_original({k: v.to(torch.bfloat16) for k, v in m.state_dict().items()}, cfg.vision_config.hidden_size)
    save_weights(mdir / "model.safetensors", orig)
    return mdir


def tile_pixels(T, seed, size=448):
    """`T` normalised 448x448 tiles as the model card's load_image gives them (ImageNet mean/std, then rounded to
    bf16 as the card's `.to(torch.bfloat16)` does): a smooth synthetic RGB pattern with edges, in [0, 255]."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    tiles = []
    for t in range(T):
        ph = torch.rand(3, generator=gen) * 6.28
        r = 127.5 + 100 * torch.sin(xx / 37.0 + ph[0]) * torch.cos(yy / 53.0)
        g = 127.5 + 120 * torch.sin((xx + yy) / 61.0 + ph[1])
        b = torch.where((xx // 56 + yy // 56) % 2 == 0, 40.0, 215.0) + 30 * torch.cos(yy / 19.0 + ph[2])
        u8 = torch.stack([r, g, b]).round().clamp(0, 255)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
        tiles.append(((u8 / 255.0 - mean) / std))
    return torch.stack(tiles).to(torch.bfloat16).to(torch.float32)


def run_vit(m, pixel_values, mids=True):
    rec = Recorder()
    if mids:
        for i, layer in enumerate(m.model.vision_tower.encoder.layer):
            rec.output(layer, f"mid.vision_model.encoder.layers.{i}")
    with torch.no_grad():
        feats = m.model.get_image_features(pixel_values=pixel_values.to(m.dtype),
                                           vision_feature_layer=m.config.vision_feature_layer)
    rec.close()
    emb = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    res = {"vit_embeds": f32(emb)}
    res.update(rec.values)
    return res


def case_vit_tiny(out_dir, args):
    """InternViT (2 layers, width 128, 2 heads of 64) + pixel shuffle v2 + mlp1 at the real 448/14 geometry,
    through transformers' InternVLForConditionalGeneration, saved in the ORIGINAL InternVL3 layout (bf16 weights
    as the released checkpoints; the f32 run uses those bf16 values). `native_model/` holds the same model as
    transformers saves it (its own tensor names and config), for the loader test of the other layout."""
    from transformers import InternVLForConditionalGeneration
    seed = 1701
    torch.manual_seed(seed)
    cfg = internvl_tiny_config(vit_hidden=128, vit_heads=2, vit_inter=256, vit_layers=2, llm_hidden=64, vocab=128)
    m = InternVLForConditionalGeneration(cfg).eval()
    const = shape_params(m, seed + 1, x2=("*.q_proj.weight", "*.k_proj.weight"))
    with torch.no_grad():
        # Position embeddings and the class token start at zero: give them content (and the layer scales a
        # spread around their init) so that a wrong position or a lost class token shows in the output.
        gen = torch.Generator().manual_seed(seed + 3)
        emb = m.model.vision_tower.embeddings
        emb.position_embeddings.copy_(0.5 * randn(gen, *emb.position_embeddings.shape))
        emb.cls_token.copy_(randn(gen, *emb.cls_token.shape))
        for layer in m.model.vision_tower.encoder.layer:
            layer.lambda_1.copy_(0.5 + 0.5 * torch.rand(layer.lambda_1.shape, generator=gen))
            layer.lambda_2.copy_(0.5 + 0.5 * torch.rand(layer.lambda_2.shape, generator=gen))
        for p in m.parameters():  # the released checkpoints are bf16: use bf16-representable weights
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    pixel_values = tile_pixels(1, seed + 2)
    res = run_vit(m, pixel_values)
    assert res["vit_embeds"].shape == (1, 256, 64), res["vit_embeds"].shape

    # The same model as transformers saves it (layout "native"), reloaded: must give the same bits.
    ndir = out_dir / "native_model"
    m.to(torch.bfloat16).save_pretrained(str(ndir))
    m.to(torch.float32)
    m2 = InternVLForConditionalGeneration.from_pretrained(str(ndir), dtype=torch.float32, attn_implementation="eager").eval()
    assert_same("vit_tiny (reloaded native layout)", run_vit(m2, pixel_values), res)

    save_internvl_original(m, cfg, out_dir)

    b = bf16_copy(m)
    bf = run_vit(b, pixel_values, mids=False)["vit_embeds"]
    bf16_err = {"vit_embeds": rel_l2(bf, res["vit_embeds"])}
    save_io(out_dir / "io.safetensors", {"pixel_values": pixel_values, **res, "bf16.vit_embeds": bf})
    write_json(out_dir / "case.json", case_json(
        "vit", seed, tiles=1, image_size=448, patch_size=14, layout="original", weights_dtype="bfloat16",
        reference="transformers InternVLForConditionalGeneration.get_image_features (eager), converted to the "
                  "original InternVL keys", bf16_rel_l2=bf16_err))
    sens = None
    if args.sensitivity:
        sens = sensitivity_report("vit_tiny", m, lambda mm: run_vit(mm, pixel_values, mids=False), ["vit_embeds"],
                                  const)
    return {"bf16": bf16_err, "sens": sens}


def case_vit_rmsnorm_qknorm(out_dir, args):
    """InternViT-6B's variants on a tiny geometry (56 px tiles, 4x4 patches, 4 image tokens per tile, two tiles):
    norm_type rms_norm, qk_normalization (RMSNorm over all heads' q and k), select_layer -2 (the second-to-last
    layer feeds the projector). KB-sized; same reference path as vit_tiny."""
    from transformers import InternVLForConditionalGeneration
    seed = 1751
    torch.manual_seed(seed)
    cfg = internvl_tiny_config(vit_hidden=64, vit_heads=2, vit_inter=128, vit_layers=3, llm_hidden=32, vocab=64,
                               image=56, norm_type="rms_norm", qk_norm=True, feature_layer=-2)
    m = InternVLForConditionalGeneration(cfg).eval()
    const = shape_params(m, seed + 1, x2=("*.q_proj.weight", "*.k_proj.weight"))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 3)
        emb = m.model.vision_tower.embeddings
        emb.position_embeddings.copy_(0.5 * randn(gen, *emb.position_embeddings.shape))
        emb.cls_token.copy_(randn(gen, *emb.cls_token.shape))
        for p in m.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    assert isinstance(m.model.vision_tower.encoder.layer[0].attention.q_norm, nn.Module)
    pixel_values = tile_pixels(2, seed + 2, size=56)
    res = run_vit(m, pixel_values)
    assert res["vit_embeds"].shape == (2, 4, 32), res["vit_embeds"].shape
    save_internvl_original(m, cfg, out_dir)
    b = bf16_copy(m)
    bf = run_vit(b, pixel_values, mids=False)["vit_embeds"]
    bf16_err = {"vit_embeds": rel_l2(bf, res["vit_embeds"])}
    save_io(out_dir / "io.safetensors", {"pixel_values": pixel_values, **res, "bf16.vit_embeds": bf})
    write_json(out_dir / "case.json", case_json(
        "vit", seed, tiles=2, image_size=56, patch_size=14, layout="original", weights_dtype="bfloat16",
        norm_type="rms_norm", qk_normalization=True, select_layer=-2,
        reference="transformers InternVLForConditionalGeneration.get_image_features (eager), converted to the "
                  "original InternVL keys", bf16_rel_l2=bf16_err))
    sens = None
    if args.sensitivity:
        sens = sensitivity_report("vit_rmsnorm_qknorm", m, lambda mm: run_vit(mm, pixel_values, mids=False),
                                  ["vit_embeds"], const)
    return {"bf16": bf16_err, "sens": sens}


INTERNVL2_5_SYSTEM = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。")


def internvl2_5_prompt(question, tiles):
    """The model card's chat() prompt: internvl2_5 template, its system message, one image of `tiles` tiles."""
    image = "<img>" + "<IMG_CONTEXT>" * (256 * tiles) + "</img>"
    return (f"<|im_start|>system\n{INTERNVL2_5_SYSTEM}<|im_end|>\n<|im_start|>user\n{image}\n{question}<|im_end|>\n"
            "<|im_start|>assistant\n")


def case_chat_tiny(out_dir, args):
    """Image chat: the templated prompt's ids (256 <IMG_CONTEXT> slots) + one tile -> the prefill logits of the last
    position and the greedy continuation of transformers' InternVLForConditionalGeneration.generate (KV cache,
    eos = <|im_end|>). ViT width 64 (1 head of 64, 1 layer), LLM 2 layers of width 64, a BPE tokenizer with
    InternVL3's special tokens; weights bf16-representable, saved in the original layout."""
    from transformers import InternVLForConditionalGeneration
    seed = 1801
    corpus = ["Describe the image in one sentence.", "What colour is the square?", "A red square on a blue field."]
    tok_text, bpe_vocab = build_tokenizer_json(corpus, n_merges=24)
    vocab = bpe_vocab + len(SPECIALS)
    ids_of = {sp: bpe_vocab + i for i, sp in enumerate(SPECIALS)}
    assert ids_of["<IMG_CONTEXT>"] == vocab - 1
    torch.manual_seed(seed)
    cfg = internvl_tiny_config(vit_hidden=64, vit_heads=1, vit_inter=128, vit_layers=1, llm_hidden=64, vocab=vocab,
                               llm_layers=2)
    m = InternVLForConditionalGeneration(cfg).eval()
    shape_params(m, seed + 1, x2=("*.q_proj.weight", "*.k_proj.weight"))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 3)
        emb = m.model.vision_tower.embeddings
        emb.position_embeddings.copy_(0.5 * randn(gen, *emb.position_embeddings.shape))
        emb.cls_token.copy_(randn(gen, *emb.cls_token.shape))
        for p in m.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    tok = Tokenizer.from_str(tok_text)
    ids = torch.tensor([tok.encode(internvl2_5_prompt("What colour is the square?", 1)).ids], dtype=torch.int64)
    assert int((ids == ids_of["<IMG_CONTEXT>"]).sum()) == 256
    pixel_values = tile_pixels(1, seed + 2)
    eos, N = ids_of["<|im_end|>"], 8
    with torch.no_grad():
        logits = m(input_ids=ids, pixel_values=pixel_values).logits[:, -1]
        out = m.generate(input_ids=ids, pixel_values=pixel_values, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=N, eos_token_id=eos, pad_token_id=eos, output_scores=True,
                         return_dict_in_generate=True)
    generated = out.sequences[:, ids.shape[1]:]
    # Greedy must be decidable at f32 precision: every step's best logit leads the next by a clear margin.
    margins = [float(torch.topk(sc[0], 2).values[0] - torch.topk(sc[0], 2).values[1]) for sc in out.scores]
    assert min(margins) > 1e-3, margins
    assert torch.equal(out.scores[0][0], logits[0].to(out.scores[0].dtype)) or rel_l2(out.scores[0][0], logits[0]) < 1e-6

    mdir = save_internvl_original(m, cfg, out_dir)
    (mdir / "tokenizer.json").write_text(tok_text)
    save_io(out_dir / "io.safetensors", {"input_ids": ids, "pixel_values": pixel_values, "prefill_logits": f32(logits),
                                         "generated_ids": generated.to(torch.int64)})
    write_json(out_dir / "case.json", case_json(
        "chat", seed, max_new_tokens=N, eos_token_id=eos, tiles=1, template="internvl2_5",
        question="What colour is the square?", min_greedy_margin=min(margins),
        reference="transformers InternVLForConditionalGeneration.generate (greedy, eager, KV cache)"))
    return {"bf16": {}, "extra": f"generated {generated.tolist()}, min top-2 margin {min(margins):.3g}"}


# --------------------------------------------------------------------------------------------------------------
# SANA transformer
# --------------------------------------------------------------------------------------------------------------


def sana_config(structure, heads, head_dim, cross_heads, cross_head_dim, caption_channels, layers):
    inner = heads * head_dim
    assert cross_heads * cross_head_dim == inner
    return dict(
        in_channels=32, out_channels=32, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers,
        num_cross_attention_heads=cross_heads, cross_attention_head_dim=cross_head_dim, cross_attention_dim=inner,
        caption_channels=caption_channels, mlp_ratio=2.5, dropout=0.0, attention_bias=False,
        sample_size=16 if structure == "sana-1.0" else 32, patch_size=1, norm_elementwise_affine=False,
        norm_eps=1e-6, interpolation_scale=None, guidance_embeds=False,
        qk_norm=None if structure == "sana-1.0" else "rms_norm_across_heads", timestep_scale=1.0,
    )


def sana_x2(structure):
    pats = ["transformer_blocks.*.attn2.to_q.weight", "transformer_blocks.*.attn2.to_k.weight"]
    if structure == "sana-1.5":
        pats += ["transformer_blocks.*.attn2.norm_q.weight", "transformer_blocks.*.attn2.norm_k.weight"]
    return tuple(pats)


def run_dit(m, x, enc, t, mask, mids=True):
    rec = Recorder()
    if mids:
        rec.output(m.patch_embed, "mid.patch_embed")
        rec.output(m.time_embed, "mid.time_embed.timestep", pick=lambda o: o[0])
        rec.output(m.time_embed, "mid.time_embed.embedded_timestep", pick=lambda o: o[1])
        rec.output(m.caption_projection, "mid.caption_projection")
        rec.output(m.caption_norm, "mid.caption_norm")
        for i, blk in enumerate(m.transformer_blocks):
            rec.output(blk, f"mid.transformer_blocks.{i}")
        rec.output(m.norm_out, "mid.norm_out")
    with torch.no_grad():
        out = m(hidden_states=x, encoder_hidden_states=enc, timestep=t, encoder_attention_mask=mask,
                return_dict=False)[0]
    rec.close()
    res = {"output": f32(out)}
    res.update(rec.values)
    return res


def make_dit_case(out_dir, args, name, seed, structure, heads, head_dim, cross_heads, cross_head_dim, caption_channels,
                  layers, B, hw, L, timesteps, mask_rows):
    cfg = sana_config(structure, heads, head_dim, cross_heads, cross_head_dim, caption_channels, layers)
    torch.manual_seed(seed)
    m = SanaTransformer2DModel(**cfg).eval()
    const = shape_params(m, seed + 1, x2=sana_x2(structure))
    gen = torch.Generator().manual_seed(seed + 2)
    h, w = hw
    x = randn(gen, B, 32, h, w)
    enc = randn(gen, B, L, caption_channels)
    t = torch.tensor(timesteps, dtype=torch.float32)
    mask = None
    if mask_rows is not None:
        mask = torch.tensor(mask_rows, dtype=torch.float32)

    mdir = out_dir / "model"
    m.save_pretrained(str(mdir))
    m2 = SanaTransformer2DModel.from_pretrained(str(mdir), torch_dtype=torch.float32).eval()
    res = run_dit(m2, x, enc, t, mask)
    assert_same(name, run_dit(m, x, enc, t, mask), res)
    C = heads * head_dim
    assert res["mid.patch_embed"].shape == (B, h * w, C)
    assert res["mid.time_embed.timestep"].shape == (B, 6 * C)
    if mask is not None:  # the mask must matter for the padded row(s) only
        nomask = run_dit(m2, x, enc, t, None, mids=False)["output"]
        for r in range(B):
            padded = bool((mask[r] == 0).any())
            d = rel_l2(nomask[r], res["output"][r])
            assert (d > 1e-3) if padded else (d == 0.0), (r, d)

    # bf16: weights, latent and caption in bf16; the timestep stays f32 as SanaPipeline passes it (999 is not
    # representable in bf16) and the mask is turned into a bias of the hidden dtype inside the model.
    b = bf16_copy(m2)
    bf = run_dit(b, x.to(torch.bfloat16), enc.to(torch.bfloat16), t, mask, mids=False)["output"]
    bf16_err = {"output": rel_l2(bf, res["output"])}
    io_t = {"hidden_states": x, "encoder_hidden_states": enc, "timestep": t, **res, "bf16.output": bf}
    if mask is not None:
        io_t["encoder_attention_mask"] = mask
    save_io(out_dir / "io.safetensors", io_t)
    write_json(out_dir / "case.json", case_json(
        "dit", seed, structure=structure, batch=B, latent_hw=[h, w], caption_len=L, has_mask=mask is not None,
        bf16_rel_l2=bf16_err))
    sens = None
    if args.sensitivity:
        sens = sensitivity_report(name, m2, lambda mm: run_dit(mm, x, enc, t, mask, mids=False), ["output"], const)
    return {"bf16": bf16_err, "sens": sens}


def case_dit_sana10_mask(out_dir, args):
    # sana-1.0 structure: linear self-attention 2 x 32, softmax cross-attention 4 x 16 (heads != self heads),
    # caption_channels 40, 2 blocks; latent 4x6 (non-square), caption length 6, row 1 has 2 padded caption tokens.
    return make_dit_case(out_dir, args, "dit_sana10_mask", 1301, "sana-1.0", heads=2, head_dim=32, cross_heads=4,
                         cross_head_dim=16, caption_channels=40, layers=2, B=2, hw=(4, 6), L=6,
                         timesteps=[999.0, 437.0], mask_rows=[[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def case_dit_sana15_qknorm(out_dir, args):
    # sana-1.5 structure (qk_norm rms_norm_across_heads in both attentions): self 2 x 32, cross 2 x 32,
    # caption_channels 24, 1 block (block chaining is covered by dit_sana10_mask; this keeps fixtures small);
    # latent 6x4 (h > w), caption length 5, no mask.
    return make_dit_case(out_dir, args, "dit_sana15_qknorm", 1401, "sana-1.5", heads=2, head_dim=32, cross_heads=2,
                         cross_head_dim=32, caption_channels=24, layers=1, B=2, hw=(6, 4), L=5,
                         timesteps=[982.0, 136.0], mask_rows=None)


# --------------------------------------------------------------------------------------------------------------
# scheduler
# --------------------------------------------------------------------------------------------------------------


def sana_scheduler_config(flow_shift):
    return {
        "algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
        "prediction_type": "flow_prediction", "use_flow_sigmas": True, "final_sigmas_type": "zero",
        "lower_order_final": True, "euler_at_final": False, "timestep_spacing": "linspace",
        "num_train_timesteps": 1000, "steps_offset": 0, "thresholding": False, "flow_shift": flow_shift,
    }


def run_scheduler(sched_cfg, N, x_init, velocities):
    s = DPMSolverMultistepScheduler(**sched_cfg)
    s.set_timesteps(N)
    sigmas = f32(s.sigmas)
    timesteps = s.timesteps.clone()
    assert timesteps.dtype == torch.int64 and sigmas.shape == (N + 1,) and timesteps.shape == (N,)
    x = x_init.clone()
    samples = []
    for i in range(N):
        x = s.step(velocities[i], s.timesteps[i], x, return_dict=False)[0]
        samples.append(f32(x))
    return {"sigmas": sigmas, "timesteps": timesteps, "x_final": f32(x), "mid.samples": torch.stack(samples)}


def make_scheduler_case(out_dir, args, seed, N, shift, hw):
    cfg = sana_scheduler_config(shift)
    gen = torch.Generator().manual_seed(seed)
    h, w = hw
    x_init = randn(gen, 1, 32, h, w)
    vel = randn(gen, N, 1, 32, h, w)
    res = run_scheduler(cfg, N, x_init, vel)
    # reload check: the scheduler rebuilt from the configuration stored in case.json
    write_json(out_dir / "case.json", case_json("scheduler", seed, num_steps=N, flow_shift=shift, latent_hw=[h, w],
                                                scheduler_config=cfg))
    cfg2 = json.loads((out_dir / "case.json").read_text())["scheduler_config"]
    assert_same(f"scheduler_{N}", run_scheduler(cfg2, N, x_init, vel), res)
    assert float(res["sigmas"][-1]) == 0.0
    save_io(out_dir / "io.safetensors", {"x_init": x_init, "velocities": vel, **res})
    return {"bf16": {}, "sens": None}


def case_scheduler_20_shift3(out_dir, args):
    return make_scheduler_case(out_dir, args, 1501, 20, 3.0, (2, 3))


def case_scheduler_12_shift6(out_dir, args):
    return make_scheduler_case(out_dir, args, 1511, 12, 6.0, (2, 3))


def run_euler(shift, N, x_init, velocities):
    s = FlowMatchEulerDiscreteScheduler(shift=shift)
    s.set_timesteps(N)
    sigmas, timesteps = f32(s.sigmas), f32(s.timesteps)
    x = x_init.clone()
    samples = []
    for i in range(N):
        x = s.step(velocities[i], s.timesteps[i], x, return_dict=False)[0]
        samples.append(f32(x))
    return {"sigmas": sigmas, "timesteps": timesteps, "x_final": f32(x), "mid.samples": torch.stack(samples)}


def case_scheduler_euler_10_shift3(out_dir, args):
    """Flow Euler (diffusers FlowMatchEulerDiscreteScheduler(shift)): float timesteps, x += (s1 - s0) v."""
    seed, N, shift, (h, w) = 1521, 10, 3.0, (2, 3)
    gen = torch.Generator().manual_seed(seed)
    x_init = randn(gen, 1, 32, h, w)
    vel = randn(gen, N, 1, 32, h, w)
    res = run_euler(shift, N, x_init, vel)
    write_json(out_dir / "case.json", case_json("scheduler", seed, sampler="flow_euler", num_steps=N, flow_shift=shift,
                                                latent_hw=[h, w]))
    assert float(res["sigmas"][-1]) == 0.0
    save_io(out_dir / "io.safetensors", {"x_init": x_init, "velocities": vel, **res})
    return {"bf16": {}, "sens": None}


# --------------------------------------------------------------------------------------------------------------
# DC-AE decoder
# --------------------------------------------------------------------------------------------------------------

DCAE_BLOCKS = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
DCAE_MS = ((), (), (), (5,), (5,), (5,))


def dcae_config(dec_channels, dec_layers, head_dim, enc_channels=(2,) * 6):
    return dict(
        in_channels=3, latent_channels=32, attention_head_dim=head_dim,
        encoder_block_types=DCAE_BLOCKS, decoder_block_types=DCAE_BLOCKS,
        encoder_block_out_channels=tuple(enc_channels), decoder_block_out_channels=tuple(dec_channels),
        encoder_layers_per_block=(0,) * 6, decoder_layers_per_block=tuple(dec_layers),
        encoder_qkv_multiscales=DCAE_MS, decoder_qkv_multiscales=DCAE_MS,
        upsample_block_type="interpolate", downsample_block_type="conv",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=SCALING_FACTOR,
    )


class LinearPathGuard:
    """Asserts that every EfficientViT attention of the decoder takes diffusers' LINEAR attention path
    (SanaMultiscaleAttnProcessor2_0 uses it only when H*W > attention_head_dim)."""

    def __init__(self, vae, allow_quadratic=False):
        self.allow_quadratic = allow_quadratic
        self.quadratic = 0
        self.calls = 0
        self.handles = []
        for name, mod in vae.decoder.named_modules():
            if isinstance(mod, SanaMultiscaleLinearAttention):
                self.handles.append(mod.register_forward_pre_hook(self._make(name)))
        self.n_modules = len(self.handles)

    def _make(self, name):
        def hook(mod, args):
            h, w = args[0].shape[-2:]
            if h * w <= mod.attention_head_dim:
                assert self.allow_quadratic, f"{name}: {h}x{w} <= {mod.attention_head_dim}: quadratic path"
                self.quadratic += 1
            self.calls += 1

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def run_vae(vae, z, mids=True, allow_quadratic=False):
    rec = Recorder()
    guard = LinearPathGuard(vae, allow_quadratic)
    if mids:
        n = len(vae.decoder.up_blocks)
        rec.input(vae.decoder.up_blocks[n - 1], "mid.decoder.stem")
        for i in range(n):
            rec.output(vae.decoder.up_blocks[i], f"mid.decoder.up_blocks.{i}")
        rec.input(vae.decoder.conv_out, "mid.decoder.conv_out_input")
    with torch.no_grad():
        out = vae.decode(z, return_dict=False)[0]
    rec.close()
    guard.close()
    assert guard.n_modules > 0 and guard.calls == guard.n_modules, (guard.calls, guard.n_modules)
    assert not allow_quadratic or guard.quadratic > 0, "the case was meant to take the quadratic path"
    res = {"sample": f32(out)}
    res.update(rec.values)
    return res


def case_vae_quadratic_small(out_dir, args):
    """The other attention path: diffusers' EfficientViT attention is 'quadratic' (ReLU-normalised
    scores K^T Q) when H*W <= attention_head_dim. Latent 2x3 with head_dim 8: stage 5 has 6 <= 8
    positions (quadratic), stage 4 has 24 > 8 (linear), stage 3 has 96 (linear)."""
    seed = 1611
    cfg = dcae_config((4, 4, 8, 8, 16, 32), (1, 1, 1, 1, 1, 1), head_dim=8)
    torch.manual_seed(seed)
    vae = AutoencoderDC(**cfg).eval()
    shape_params(vae, seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    B, h, w = 1, 2, 3
    z = randn(gen, B, 32, h, w)
    mdir = out_dir / "model"
    vae.save_pretrained(str(mdir))
    vae2 = AutoencoderDC.from_pretrained(str(mdir), torch_dtype=torch.float32).eval()
    res = run_vae(vae2, z, allow_quadratic=True)
    assert_same("vae_quadratic_small", run_vae(vae, z, allow_quadratic=True), res)
    b = bf16_copy(vae2)
    bf = run_vae(b, z.to(torch.bfloat16), mids=False, allow_quadratic=True)["sample"]
    bf16_err = {"sample": rel_l2(bf, res["sample"])}
    save_io(out_dir / "io.safetensors", {"latent": z, **res, "bf16.sample": bf})
    write_json(out_dir / "case.json", case_json("vae", seed, batch=B, latent_hw=[h, w], image_hw=[32 * h, 32 * w],
                                                attention_path="quadratic in stage 5, linear in stages 3-4",
                                                bf16_rel_l2=bf16_err))
    return {"bf16": bf16_err, "sens": None}


def case_vae_linear_nonsquare(out_dir, args):
    seed = 1601
    # channels [4, 8, 8, 16, 32, 64] (each stage's channel count x4/previous is an integer, in_shortcut repeats 2),
    # 2 ResBlocks in stages 0 and 1, 1 block elsewhere; attention_head_dim 8 -> 2/4/8 heads in stages 3/4/5.
    # latent 3x4: stage 5 has 12 > 8 positions, so every EfficientViT block takes the linear path (asserted).
    cfg = dcae_config((4, 8, 8, 16, 32, 64), (2, 2, 1, 1, 1, 1), head_dim=8)
    torch.manual_seed(seed)
    vae = AutoencoderDC(**cfg).eval()
    const = shape_params(vae, seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    B, h, w = 1, 3, 4
    z = randn(gen, B, 32, h, w)

    mdir = out_dir / "model"
    vae.save_pretrained(str(mdir))
    vae2 = AutoencoderDC.from_pretrained(str(mdir), torch_dtype=torch.float32).eval()
    res = run_vae(vae2, z)
    assert_same("vae_linear_nonsquare", run_vae(vae, z), res)
    assert res["sample"].shape == (B, 3, 32 * h, 32 * w)
    b = bf16_copy(vae2)
    bf = run_vae(b, z.to(torch.bfloat16), mids=False)["sample"]
    bf16_err = {"sample": rel_l2(bf, res["sample"])}
    save_io(out_dir / "io.safetensors", {"latent": z, **res, "bf16.sample": bf})
    write_json(out_dir / "case.json", case_json("vae", seed, batch=B, latent_hw=[h, w], image_hw=[32 * h, 32 * w],
                                                attention_path="linear", bf16_rel_l2=bf16_err))
    sens = None
    if args.sensitivity:
        dec_only = [n for n, _ in vae2.named_parameters() if n.startswith("decoder.")]

        class Dec(nn.Module):
            def __init__(self, v):
                super().__init__()
                self.v = v

            def named_parameters(self, *a, **k):  # decoder only: the encoder stub is never run
                return [(n, p) for n, p in self.v.named_parameters() if n in dec_only]

        sens = sensitivity_report("vae_linear_nonsquare", Dec(vae2), lambda mm: run_vae(mm.v, z, mids=False),
                                  ["sample"], const)
    return {"bf16": bf16_err, "sens": sens}


# --------------------------------------------------------------------------------------------------------------
# tokenizer (tiny Qwen2-style byte-level BPE)
# --------------------------------------------------------------------------------------------------------------

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]


def gpt2_byte_alphabet():
    """GPT-2 / Qwen2 bytes_to_unicode, in vocabulary order (id i = i-th character)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def qwen2_pre_tokenizer():
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])


def build_tokenizer_json(corpus, n_merges):
    """Byte-level BPE with Qwen2's normalizer / pre-tokenizer / post-processor / decoder. Merges are learnt by a
    deterministic greedy BPE (highest pair count, ties broken by the lexicographically smallest pair); special
    tokens follow the BPE vocabulary in Qwen2 / InternVL3 order. Returns the tokenizer.json text."""
    norm = normalizers.NFC()
    pre = qwen2_pre_tokenizer()
    words = Counter()
    for text in corpus:
        for piece, _ in pre.pre_tokenize_str(norm.normalize_str(text)):
            words[piece] += 1
    alphabet = gpt2_byte_alphabet()
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    splits = {wd: list(wd) for wd in words}
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for wd, c in words.items():
            s = splits[wd]
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        (a, b), _ = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append((a, b))
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
        for wd, s in splits.items():
            i, new = 0, []
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    new.append(a + b)
                    i += 2
                else:
                    new.append(s[i])
                    i += 1
            splits[wd] = new
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False, ignore_merges=False))
    tok.normalizer = norm
    tok.pre_tokenizer = pre
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                       special=True) for s in SPECIALS])
    js = json.loads(tok.to_str())
    # Qwen2's own tokenizer.json stores merges as "a b" strings (tokenizers >= 0.20 writes [a, b] pairs).
    js["model"]["merges"] = [" ".join(mm) if isinstance(mm, list) else mm for mm in js["model"]["merges"]]
    # the Python binding of decoders.ByteLevel takes no options; write Qwen2's values (they do not change decoding)
    js["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return json.dumps(js, indent=2, ensure_ascii=False) + "\n", len(vocab)


# --------------------------------------------------------------------------------------------------------------
# pipeline
# --------------------------------------------------------------------------------------------------------------


def chat_strings(prompt, negative_prompt):
    tmpl = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<img>"
    cond = tmpl.format(f"Generate an image: {prompt.strip()}")
    if negative_prompt is None:
        uncond = tmpl.format("Generate an image.")
    else:
        uncond = tmpl.format(f"Generate an image: {negative_prompt.strip()}")
    return cond, uncond


class OpenUniHead(nn.Module):
    """meta_queries + connector + projector, with OpenUni's parameter names."""

    def __init__(self, conn_cfg, num_queries, caption_channels):
        super().__init__()
        D = conn_cfg["hidden_size"]
        self.meta_queries = nn.Parameter(torch.zeros(num_queries, D))
        self.connector = build_connector(conn_cfg)
        self.projector = nn.Linear(D, caption_channels)


class PipelineModels(nn.Module):
    def __init__(self, llm, head, transformer, vae):
        super().__init__()
        self.llm, self.head, self.transformer, self.vae = llm, head, transformer, vae


def run_pipeline(pm, ids_cond, ids_uncond, noise, num_steps, guidance, height, width, flow_shift, mids=True):
    llm, head, tr, vae = pm.llm, pm.head, pm.transformer, pm.vae
    Q = head.meta_queries.shape[0]
    res = {}
    with torch.no_grad():
        hidden = {}
        for tag, ids in (("uncond", ids_uncond), ("cond", ids_cond)):
            emb = llm.get_input_embeddings()(ids)
            x = torch.cat([emb, head.meta_queries[None].to(emb.dtype)], dim=1)
            pos = torch.arange(x.shape[1], dtype=torch.int64)[None]
            out = llm.model(inputs_embeds=x, position_ids=pos, use_cache=False)
            hidden[tag] = out.last_hidden_state[:, -Q:]
        h = torch.cat([hidden["uncond"], hidden["cond"]], dim=0)
        conn = head.connector(inputs_embeds=h).last_hidden_state
        pe = head.projector(conn)
    res["prompt_embeds"] = f32(pe)
    if mids:
        res["mid.llm.hidden_cond"] = f32(hidden["cond"])
        res["mid.llm.hidden_uncond"] = f32(hidden["uncond"])
        res["mid.connector"] = f32(conn)

    sched = DPMSolverMultistepScheduler(**sana_scheduler_config(flow_shift))
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tr, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    dit_out, steps = [], []
    hdl = tr.register_forward_hook(lambda m, a, o: dit_out.append(f32(o[0])))

    def on_step(p, i, t, kw):
        steps.append(f32(kw["latents"]))
        return {}

    ones = torch.ones(1, Q, dtype=torch.float32)
    with torch.no_grad():
        lat = pipe(prompt=None, negative_prompt=None, prompt_embeds=pe[1:2], prompt_attention_mask=ones,
                   negative_prompt_embeds=pe[0:1], negative_prompt_attention_mask=ones, latents=noise.clone(),
                   num_inference_steps=num_steps, guidance_scale=guidance, height=height, width=width,
                   use_resolution_binning=False, output_type="latent", return_dict=False,
                   callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["latents"])[0]
        hdl.remove()
        assert lat.dtype == torch.float32
        dec = vae.decode(lat.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    dec = f32(dec)
    pre = 127.5 * dec + 128.0
    img = torch.clamp(pre, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).to(torch.float32).contiguous()
    res["latents"] = f32(lat)
    res["image"] = img
    res["mid.decoded"] = dec
    if mids:
        res["mid.timesteps"] = pipe.scheduler.timesteps.clone()
        res["mid.sigmas"] = f32(pipe.scheduler.sigmas)
        res["mid.dit_out"] = torch.stack(dit_out)
        res["mid.latents_steps"] = torch.stack(steps)
        assert len(dit_out) == num_steps and dit_out[0].shape[0] == 2
    res["_pre_uint8"] = pre
    return res


def load_pipeline_models(mdir, conn_cfg):
    llm = load_qwen2(mdir / "llm")
    sd = load_file(str(mdir / "openuni.safetensors"))
    Q = sd["meta_queries"].shape[0]
    C = sd["projector.weight"].shape[0]
    head = OpenUniHead(conn_cfg, Q, C)
    head.load_state_dict(sd, strict=True)
    tr = SanaTransformer2DModel.from_pretrained(str(mdir / "transformer"), torch_dtype=torch.float32)
    vae = AutoencoderDC.from_pretrained(str(mdir / "vae"), torch_dtype=torch.float32)
    return PipelineModels(llm, head, tr, vae).eval()


def case_pipeline_tiny(out_dir, args):
    seed = 1701
    prompt = "  A cafe\u0301 owner's red bicycle, 2 dogs & 13 cats at sunset!\n"  # decomposed e + U+0301 -> NFC
    negative_prompt = None
    num_steps, guidance, height, width, Q, shift = 3, 4.5, 64, 64, 8, 3.0
    D, caption_channels = 48, 40
    conn_cfg = {"hidden_size": D, "intermediate_size": 96, "num_attention_heads": 3, "num_hidden_layers": 1,
                "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"}

    # tokenizer
    cond_s, uncond_s = chat_strings(prompt, negative_prompt)
    corpus = ["user\nGenerate an image: a photo of a cat sitting on a sofa\nassistant\n"] * 3 + [
        "user\nGenerate an image.\nassistant\n",
        "a red bicycle leaning against a brick wall at sunset",
        "two dogs and thirteen cats playing in the garden of the cafe",
        "the quick brown fox jumps over the lazy dog",
        "an owner's shop, a painting of the sea, a city street at night",
    ]
    tok_text, bpe_vocab = build_tokenizer_json(corpus, n_merges=54)
    llm_vocab = 328
    assert bpe_vocab + len(SPECIALS) <= llm_vocab

    mdir = out_dir / "model"
    (mdir / "llm").mkdir(parents=True)
    (mdir / "llm" / "tokenizer.json").write_text(tok_text)
    tk = Tokenizer.from_file(str(mdir / "llm" / "tokenizer.json"))
    ids_c = tk.encode(cond_s, add_special_tokens=True).ids
    ids_u = tk.encode(uncond_s, add_special_tokens=True).ids
    from transformers import PreTrainedTokenizerFast
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(mdir / "llm" / "tokenizer.json"))
    assert hf_tok.encode(cond_s, add_special_tokens=True) == ids_c
    assert hf_tok.encode(uncond_s, add_special_tokens=True) == ids_u
    assert tk.decode(ids_c, skip_special_tokens=False) == unicodedata.normalize("NFC", cond_s)
    for s in SPECIALS[1:4]:
        assert tk.token_to_id(s) is not None
    assert ids_c[0] == tk.token_to_id("<|im_start|>") and ids_c[-1] == tk.token_to_id("<img>")
    ids_cond = torch.tensor([ids_c], dtype=torch.int64)
    ids_uncond = torch.tensor([ids_u], dtype=torch.int64)

    # models
    torch.manual_seed(seed)
    llm = Qwen2ForCausalLM(qwen2_config(llm_vocab, D, 96, 2, 3, 1, tied=False)).eval()
    head = OpenUniHead(conn_cfg, Q, caption_channels)
    tcfg = sana_config("sana-1.0", heads=2, head_dim=32, cross_heads=2, cross_head_dim=32,
                       caption_channels=caption_channels, layers=1)
    tr = SanaTransformer2DModel(**tcfg).eval()
    # VAE: 64x64 -> latent 2x2 (4 positions), so attention_head_dim 2 keeps every stage on the linear path.
    vae = AutoencoderDC(**dcae_config((4, 4, 4, 8, 16, 32), (1,) * 6, head_dim=2)).eval()
    with torch.no_grad():
        head.meta_queries.copy_(torch.randn(Q, D, generator=torch.Generator().manual_seed(seed + 5)) * D ** -0.5)
    pm = PipelineModels(llm, head, tr, vae).eval()
    const = shape_params(pm, seed + 1, x2=(
        "llm.*.q_proj.weight", "llm.*.k_proj.weight", "head.connector.*.q_proj.weight",
        "head.connector.*.k_proj.weight") + tuple("transformer." + p for p in sana_x2("sana-1.0")))
    gen = torch.Generator().manual_seed(seed + 2)
    noise = randn(gen, 1, 32, height // 32, width // 32)

    llm.save_pretrained(str(mdir / "llm"))
    to_internvl3_config_form(mdir / "llm" / "config.json")
    hsd = head.state_dict()
    save_weights(mdir / "openuni.safetensors", {"meta_queries": hsd["meta_queries"],
                                                **{k: v for k, v in hsd.items() if k.startswith("connector.")},
                                                "projector.weight": hsd["projector.weight"],
                                                "projector.bias": hsd["projector.bias"]})
    tr.save_pretrained(str(mdir / "transformer"))
    vae.save_pretrained(str(mdir / "vae"))
    DPMSolverMultistepScheduler(**sana_scheduler_config(shift)).save_pretrained(str(mdir / "scheduler"))

    pm2 = load_pipeline_models(mdir, conn_cfg)
    sched2 = DPMSolverMultistepScheduler.from_pretrained(str(mdir / "scheduler"))
    assert sched2.config.flow_shift == shift and sched2.config.use_flow_sigmas
    kw = dict(num_steps=num_steps, guidance=guidance, height=height, width=width, flow_shift=shift)
    res = run_pipeline(pm2, ids_cond, ids_uncond, noise, **kw)
    first = run_pipeline(pm, ids_cond, ids_uncond, noise, **kw)
    pre = res.pop("_pre_uint8")
    first.pop("_pre_uint8")
    assert_same("pipeline_tiny", first, res)
    frac = (pre - pre.round()).abs()
    near = float(((frac < 1e-3) & (pre > 0) & (pre < 255)).double().mean())

    b = bf16_copy(pm2)
    bres = run_pipeline(b, ids_cond, ids_uncond, noise, mids=False, **kw)
    bf16_err = {"prompt_embeds": rel_l2(bres["prompt_embeds"], res["prompt_embeds"]),
                "latents": rel_l2(bres["latents"], res["latents"]),
                "mid.decoded": rel_l2(bres["mid.decoded"], res["mid.decoded"]),
                "image": rel_l2(bres["image"], res["image"])}
    io_t = {"input_ids_cond": ids_cond, "input_ids_uncond": ids_uncond, "noise": noise, **res,
            "bf16.prompt_embeds": bres["prompt_embeds"], "bf16.latents": bres["latents"],
            "bf16.mid.decoded": bres["mid.decoded"], "bf16.image": bres["image"]}
    save_io(out_dir / "io.safetensors", io_t)
    write_json(out_dir / "case.json", case_json(
        "pipeline", seed, prompt=prompt, negative_prompt=negative_prompt, num_steps=num_steps,
        guidance_scale=guidance, height=height, width=width, num_queries=Q, flow_shift=shift, connector=conn_cfg,
        bf16_rel_l2=bf16_err, image_near_integer_fraction=near))
    sens = None
    if args.sensitivity:
        keys = ["prompt_embeds", "latents", "mid.decoded"]
        sens = sensitivity_report("pipeline_tiny", pm2, lambda mm: run_pipeline(mm, ids_cond, ids_uncond, noise,
                                                                               mids=False, **kw), keys, const)
    return {"bf16": bf16_err, "sens": sens, "extra": f"ids cond {len(ids_c)} uncond {len(ids_u)}; "
                                                       f"pixels within 1e-3 of an integer {near:.4f}"}


# --------------------------------------------------------------------------------------------------------------
# .pth reader fixtures
# --------------------------------------------------------------------------------------------------------------

HOSTILE_MARKER = "/tmp/openuni_hostile_pth_executed"


def _zip_replace(src_bytes, replacements):
    """Re-pack a torch.save zip (all entries stored, fixed timestamps) with some entries replaced."""
    zin = zipfile.ZipFile(io.BytesIO(src_bytes))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            for suffix, new in replacements.items():
                if info.filename.endswith(suffix):
                    data = new
            zi = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            zi.compress_type = zipfile.ZIP_STORED
            zi.external_attr = 0o644 << 16
            zout.writestr(zi, data)
    return out.getvalue()


def _pickle_str(s, proto4=False):
    b = s.encode("utf-8")
    if proto4 and len(b) < 256:
        return b"\x8c" + bytes([len(b)]) + b  # SHORT_BINUNICODE
    return b"X" + struct.pack("<I", len(b)) + b  # BINUNICODE


def hostile_pickle_global():
    """{'meta_queries': os.system('echo ... > MARKER')} with protocol 2 opcodes (GLOBAL, as torch.save writes)."""
    return (b"\x80\x02" + b"}" + _pickle_str("meta_queries") + b"cos\nsystem\n"
            + _pickle_str(f"echo pwned > {HOSTILE_MARKER}") + b"\x85" + b"R" + b"s" + b".")


def hostile_pickle_stack_global():
    """{'meta_queries': builtins.eval('...')} with protocol 4 STACK_GLOBAL."""
    code = f"__import__('os').system('echo pwned > {HOSTILE_MARKER}')"
    return (b"\x80\x04" + b"}" + _pickle_str("meta_queries", True) + _pickle_str("builtins", True)
            + _pickle_str("eval", True) + b"\x93" + _pickle_str(code, True) + b"\x85" + b"R" + b"s" + b".")


def case_pth(out_dir, args):
    gen = torch.Generator().manual_seed(1801)
    D, I, Q, C = 16, 24, 4, 8
    # flat f32 state dict, an OrderedDict with _metadata like module.state_dict(); several tensors are views.
    mq = randn(gen, Q, D)
    q_base = randn(gen, D, D)
    q_w = q_base.t()  # non-contiguous: strides (1, D)
    assert not q_w.is_contiguous()
    k_w = randn(gen, D, D)
    v_w = randn(gen, D, D).t().contiguous()
    fc1_base = randn(gen, I, D + 6)
    fc1_w = fc1_base[:, 2:2 + D]  # non-contiguous and storage offset 2
    big = randn(gen, 5 + C * D + C + 3)  # projector weight and bias share one storage, offsets 5 and 5 + C*D
    p_w = big[5:5 + C * D].view(C, D)
    p_b = big[5 + C * D:5 + C * D + C]
    ln_w = 1.0 + 0.1 * randn(gen, D)
    flat = OrderedDict([
        ("meta_queries", mq),
        ("connector.layers.0.self_attn.q_proj.weight", q_w),
        ("connector.layers.0.self_attn.k_proj.weight", k_w),
        ("connector.layers.0.self_attn.v_proj.weight", v_w),
        ("connector.layers.0.layer_norm1.weight", ln_w),
        ("connector.layers.0.mlp.fc1.weight", fc1_w),
        ("projector.weight", p_w),
        ("projector.bias", p_b),
    ])
    flat._metadata = OrderedDict([("", {"version": 1}), ("connector", {"version": 1})])
    views = {"connector.layers.0.self_attn.q_proj.weight": "transposed view, strides (1,16), offset 0",
             "connector.layers.0.mlp.fc1.weight": "column slice, shape [24,16], strides (22,1), storage offset 2",
             "projector.weight": "view of a shared 1-D storage at offset 5",
             "projector.bias": "same storage as projector.weight, offset 133"}

    # {'state_dict': {'module.' + k: bf16}, 'meta': {...}}; views again (transposed, sliced, shared storage).
    bq = randn(gen, D, D).to(torch.bfloat16)
    bbig = randn(gen, 3 + C * D + C).to(torch.bfloat16)
    bfc1 = randn(gen, I, D + 4).to(torch.bfloat16)
    bsd = OrderedDict([
        ("module.meta_queries", randn(gen, Q, D).to(torch.bfloat16)),
        ("module.connector.layers.0.self_attn.q_proj.weight", bq.t()),
        ("module.connector.layers.0.self_attn.q_proj.bias", randn(gen, D).to(torch.bfloat16)),
        ("module.connector.layers.0.mlp.fc1.weight", bfc1[:, 1:1 + D]),
        ("module.projector.weight", bbig[3:3 + C * D].view(C, D)),
        ("module.projector.bias", bbig[3 + C * D:]),
    ])
    wrapped = {"state_dict": bsd, "meta": {"step": 1000, "note": "tiny OpenUni-like checkpoint"}}

    torch.save(flat, str(out_dir / "openuni_flat_f32.pth"))
    save_file({k: f32(v) for k, v in flat.items()}, str(out_dir / "openuni_flat_f32.expected.safetensors"),
              metadata={"note": json.dumps({"source": "openuni_flat_f32.pth", "views": views}, sort_keys=True)})
    torch.save(wrapped, str(out_dir / "openuni_state_dict_bf16.pth"))
    save_file({k: f32(v) for k, v in bsd.items()}, str(out_dir / "openuni_state_dict_bf16.expected.safetensors"),
              metadata={"note": "source openuni_state_dict_bf16.pth; keys exactly as in ['state_dict'] (module. "
                                "prefix kept); bf16 values widened to f32"})

    # check our own (benign) files round-trip through torch.load's restricted unpickler
    for fname, sd in (("openuni_flat_f32", flat), ("openuni_state_dict_bf16", bsd)):
        obj = torch.load(str(out_dir / f"{fname}.pth"), map_location="cpu", weights_only=True)
        got = obj["state_dict"] if "state_dict" in obj else obj
        exp = load_file(str(out_dir / f"{fname}.expected.safetensors"))
        assert list(got) == list(sd) and set(exp) == set(sd)
        for k in sd:
            assert got[k].dtype == sd[k].dtype and torch.equal(got[k], sd[k]) and torch.equal(f32(got[k]), exp[k]), k
        if fname == "openuni_flat_f32":
            assert got["projector.weight"].storage_offset() == 5 and not got[
                "connector.layers.0.self_attn.q_proj.weight"].is_contiguous()

    # resource-hostile files (real torch.save output): a stride-0 view of a one-element storage that would
    # materialise as 4096x4096 floats, and a tensor named like safetensors' metadata table.
    torch.save(OrderedDict([("w", torch.ones(2)), ("amplified", torch.zeros(1).expand(4096, 4096))]),
               str(out_dir / "amplified.pth"))
    torch.save(OrderedDict([("__metadata__", torch.ones(2)), ("w", torch.ones(3))]), str(out_dir / "metadata_key.pth"))

    # hostile files: a real torch.save archive whose data.pkl calls os.system / builtins.eval when unpickled.
    # They are built from opcodes and never unpickled here (only disassembled).
    for fname, pkl in (("hostile", hostile_pickle_global()), ("hostile_eval", hostile_pickle_stack_global())):
        buf_path = out_dir / f"{fname}.pth"
        torch.save({"meta_queries": torch.zeros(2, 2)}, str(buf_path))
        data = _zip_replace(buf_path.read_bytes(), {"/data.pkl": pkl})
        buf_path.write_bytes(data)
        z = zipfile.ZipFile(str(buf_path))
        names = z.namelist()
        assert f"{fname}/data.pkl" in names and f"{fname}/version" in names and f"{fname}/byteorder" in names
        dis = io.StringIO()
        pickletools.dis(z.read(f"{fname}/data.pkl"), out=dis)
        text = dis.getvalue()
        assert ("GLOBAL     'os system'" in text) or ("STACK_GLOBAL" in text and "'eval'" in text), text
    return {"bf16": {}, "sens": None}



# --------------------------------------------------------------------------------------------------------------
# independent float64 re-implementations (written from shared/cases/README.md and the spec, not from the upstream
# code) that re-check every generated case from its files on disk: model/ + io.safetensors.
# --------------------------------------------------------------------------------------------------------------

DT = torch.float64
CC_RESULTS = []


def W(sd, k):
    return sd[k].to(DT)


def rel(a, b):  # noqa: F811
    a = a.to(DT); b = b.to(DT)
    return float((a - b).norm() / b.norm())


def report(case, name, got, want, tol=1e-5):
    r = rel(got, want)
    m = float((got.to(DT) - want.to(DT)).abs().max())
    CC_RESULTS.append((case, name, r, m, r <= tol))
    return r <= tol


def layernorm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps)
    if w is not None:
        y = y * w + b
    return y


def rmsnorm(x, w, eps, b=None):
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    y = y * w
    if b is not None:
        y = y + b
    return y


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def silu(x):
    return x * torch.sigmoid(x)


def lin(x, sd, p, bias=True):
    y = x @ W(sd, p + ".weight").T
    if bias:
        y = y + W(sd, p + ".bias")
    return y


# ---------------- connector
def ref_connector(sd, cfg, x, prefix=""):
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = D // H
    mids = []
    for i in range(cfg["num_hidden_layers"]):
        p = f"{prefix}layers.{i}."
        h = layernorm(x, W(sd, p + "layer_norm1.weight"), W(sd, p + "layer_norm1.bias"), cfg["layer_norm_eps"])
        B, N, _ = h.shape
        q = lin(h, sd, p + "self_attn.q_proj").view(B, N, H, hd).transpose(1, 2)
        k = lin(h, sd, p + "self_attn.k_proj").view(B, N, H, hd).transpose(1, 2)
        v = lin(h, sd, p + "self_attn.v_proj").view(B, N, H, hd).transpose(1, 2)
        a = torch.softmax(q @ k.transpose(-1, -2) * hd ** -0.5, -1) @ v
        x = x + lin(a.transpose(1, 2).reshape(B, N, D), sd, p + "self_attn.out_proj")
        h = layernorm(x, W(sd, p + "layer_norm2.weight"), W(sd, p + "layer_norm2.bias"), cfg["layer_norm_eps"])
        x = x + lin(gelu_tanh(lin(h, sd, p + "mlp.fc1")), sd, p + "mlp.fc2")
        mids.append(x)
    return x, mids


# ---------------- qwen2
def ref_qwen2(sd, cfg, emb):
    """emb [B,L,D] input embeddings; plain RoPE with theta from the config, positions 0..L-1, causal."""
    D, H, KV = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = D // H
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    eps = cfg["rms_norm_eps"]
    B, L, _ = emb.shape
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=DT) / hd))
    ang = torch.arange(L, dtype=DT)[:, None] * inv[None]
    cos = torch.cat([ang.cos(), ang.cos()], -1)
    sin = torch.cat([ang.sin(), ang.sin()], -1)

    def rope(t):
        t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    mask = torch.full((L, L), float("-inf"), dtype=DT).triu(1)
    x = emb
    mids = []
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rmsnorm(x, W(sd, p + "input_layernorm.weight"), eps)
        q = rope(lin(h, sd, p + "self_attn.q_proj").view(B, L, H, hd).transpose(1, 2))
        k = rope(lin(h, sd, p + "self_attn.k_proj").view(B, L, KV, hd).transpose(1, 2))
        v = lin(h, sd, p + "self_attn.v_proj").view(B, L, KV, hd).transpose(1, 2)
        k = k.repeat_interleave(H // KV, 1)
        v = v.repeat_interleave(H // KV, 1)
        a = torch.softmax(q @ k.transpose(-1, -2) * hd ** -0.5 + mask, -1) @ v
        x = x + lin(a.transpose(1, 2).reshape(B, L, D), sd, p + "self_attn.o_proj", bias=False)
        h = rmsnorm(x, W(sd, p + "post_attention_layernorm.weight"), eps)
        x = x + lin(silu(lin(h, sd, p + "mlp.gate_proj", False)) * lin(h, sd, p + "mlp.up_proj", False), sd,
                    p + "mlp.down_proj", False)
        mids.append(x)
    return rmsnorm(x, W(sd, "model.norm.weight"), eps), mids


# ---------------- sana
def ref_sana(sd, cfg, x, enc, t, mask):
    B, Cin, h, w = x.shape
    C = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    Hs, hs = cfg["num_attention_heads"], cfg["attention_head_dim"]
    Hc, hc = cfg["num_cross_attention_heads"], cfg["cross_attention_head_dim"]
    qkn = cfg["qk_norm"]
    mids = {}
    tok = F.conv2d(x, W(sd, "patch_embed.proj.weight"), W(sd, "patch_embed.proj.bias")).flatten(2).transpose(1, 2)
    mids["mid.patch_embed"] = tok
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=DT) / half)
    arg = t.to(DT)[:, None] * freqs[None]
    temb = torch.cat([arg.cos(), arg.sin()], -1)
    e = lin(silu(lin(temb, sd, "time_embed.emb.timestep_embedder.linear_1")), sd,
            "time_embed.emb.timestep_embedder.linear_2")
    tmod = lin(silu(e), sd, "time_embed.linear")
    mids["mid.time_embed.timestep"] = tmod
    mids["mid.time_embed.embedded_timestep"] = e
    c = lin(gelu_tanh(lin(enc, sd, "caption_projection.linear_1")), sd, "caption_projection.linear_2")
    mids["mid.caption_projection"] = c
    c = rmsnorm(c, W(sd, "caption_norm.weight"), 1e-5)
    mids["mid.caption_norm"] = c
    L = c.shape[1]
    bias = torch.zeros(B, 1, 1, L, dtype=DT)
    if mask is not None:
        bias = ((1 - mask.to(DT)) * -10000.0)[:, None, None, :]
    N = h * w
    for i in range(cfg["num_layers"]):
        p = f"transformer_blocks.{i}."
        mod = W(sd, p + "scale_shift_table")[None] + tmod.view(B, 6, C)
        sh_msa, sc_msa, g_msa, sh_mlp, sc_mlp, g_mlp = [m[:, None] for m in mod.unbind(1)]
        hh = layernorm(tok, None, None, 1e-6) * (1 + sc_msa) + sh_msa
        q = hh @ W(sd, p + "attn1.to_q.weight").T
        k = hh @ W(sd, p + "attn1.to_k.weight").T
        v = hh @ W(sd, p + "attn1.to_v.weight").T
        if qkn:
            q = rmsnorm(q, W(sd, p + "attn1.norm_q.weight"), 1e-5)
            k = rmsnorm(k, W(sd, p + "attn1.norm_k.weight"), 1e-5)
        q = F.relu(q.view(B, N, Hs, hs).transpose(1, 2))
        k = F.relu(k.view(B, N, Hs, hs).transpose(1, 2))
        v = v.view(B, N, Hs, hs).transpose(1, 2)
        kv = k.transpose(-1, -2) @ v  # [B,H,d,d]
        num = q @ kv
        den = q @ k.sum(2, keepdim=True).transpose(-1, -2)  # [B,H,N,1]
        a = (num / (den + 1e-15)).transpose(1, 2).reshape(B, N, C)
        tok = tok + g_msa * lin(a, sd, p + "attn1.to_out.0")
        q = lin(tok, sd, p + "attn2.to_q")
        k = lin(c, sd, p + "attn2.to_k")
        v = lin(c, sd, p + "attn2.to_v")
        if qkn:
            q = rmsnorm(q, W(sd, p + "attn2.norm_q.weight"), 1e-5)
            k = rmsnorm(k, W(sd, p + "attn2.norm_k.weight"), 1e-5)
        q = q.view(B, N, Hc, hc).transpose(1, 2)
        k = k.view(B, L, Hc, hc).transpose(1, 2)
        v = v.view(B, L, Hc, hc).transpose(1, 2)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hc) + bias, -1) @ v
        tok = tok + lin(a.transpose(1, 2).reshape(B, N, Hc * hc), sd, p + "attn2.to_out.0")
        hh = layernorm(tok, None, None, 1e-6) * (1 + sc_mlp) + sh_mlp
        img = hh.view(B, h, w, C).permute(0, 3, 1, 2)
        y = silu(F.conv2d(img, W(sd, p + "ff.conv_inverted.weight"), W(sd, p + "ff.conv_inverted.bias")))
        y = F.conv2d(y, W(sd, p + "ff.conv_depth.weight"), W(sd, p + "ff.conv_depth.bias"), padding=1,
                     groups=y.shape[1])
        y, gate = y.chunk(2, 1)
        y = F.conv2d(y * silu(gate), W(sd, p + "ff.conv_point.weight"))
        tok = tok + g_mlp * y.flatten(2).transpose(1, 2)
        mids[f"mid.transformer_blocks.{i}"] = tok
    sh, sc = (W(sd, "scale_shift_table")[None] + e[:, None]).unbind(1)
    hh = layernorm(tok, None, None, 1e-6) * (1 + sc[:, None]) + sh[:, None]
    mids["mid.norm_out"] = hh
    out = lin(hh, sd, "proj_out").view(B, h, w, -1).permute(0, 3, 1, 2)
    return out, mids


# ---------------- dc-ae decoder
def rms_c(x, sd, p, eps=1e-5):  # RMSNorm over channels of NCHW, weight and bias
    y = x.permute(0, 2, 3, 1)
    y = rmsnorm(y, W(sd, p + ".weight"), eps, W(sd, p + ".bias"))
    return y.permute(0, 3, 1, 2)


def conv(x, sd, p, pad, groups=1, bias=True):
    return F.conv2d(x, W(sd, p + ".weight"), W(sd, p + ".bias") if bias else None, padding=pad, groups=groups)


def chan_lin(x, sd, p):  # Linear over channels of NCHW (no bias)
    return torch.einsum("bchw,oc->bohw", x, W(sd, p + ".weight"))


def ref_dcae_decode(sd, cfg, z):
    chans = cfg["decoder_block_out_channels"]
    layers = cfg["decoder_layers_per_block"]
    types = cfg["decoder_block_types"]
    hd = cfg["attention_head_dim"]
    mids = {}
    x = conv(z, sd, "decoder.conv_in", 1) + z.repeat_interleave(chans[-1] // z.shape[1], 1)
    mids["mid.decoder.stem"] = x
    for i in reversed(range(6)):
        p = f"decoder.up_blocks.{i}."
        j = 0
        if i < 5 and layers[i] > 0:
            up = conv(F.interpolate(x, scale_factor=2, mode="nearest"), sd, p + "0.conv", 1)
            r = chans[i] * 4 // x.shape[1]
            x = up + F.pixel_shuffle(x.repeat_interleave(r, 1), 2)
            j = 1
        for _ in range(layers[i]):
            q = p + f"{j}."
            if types[i] == "ResBlock":
                y = conv(silu(conv(x, sd, q + "conv1", 1)), sd, q + "conv2", 1, bias=False)
                x = x + rms_c(y, sd, q + "norm")
            else:
                B, C, H, Wd = x.shape
                qkv = torch.cat([chan_lin(x, sd, q + "attn.to_q"), chan_lin(x, sd, q + "attn.to_k"),
                                 chan_lin(x, sd, q + "attn.to_v")], 1)
                heads = C // hd
                ms = F.conv2d(qkv, W(sd, q + "attn.to_qkv_multiscale.0.proj_in.weight"), padding=2,
                              groups=qkv.shape[1])
                ms = F.conv2d(ms, W(sd, q + "attn.to_qkv_multiscale.0.proj_out.weight"), groups=3 * heads)
                allq = torch.cat([qkv, ms], 1).reshape(B, -1, 3 * hd, H * Wd)
                qq, kk, vv = allq.chunk(3, 2)
                qq, kk = F.relu(qq), F.relu(kk)
                # diffusers quadratic path (H*W <= hd) computes the same formula in another order
                vp = F.pad(vv, (0, 0, 0, 1), value=1.0)
                o = (vp @ kk.transpose(-1, -2)) @ qq
                o = o[:, :, :-1] / (o[:, :, -1:] + 1e-15)
                o = o.reshape(B, -1, H, Wd)
                x = x + rms_c(chan_lin(o, sd, q + "attn.to_out"), sd, q + "attn.norm_out")
                y = silu(conv(x, sd, q + "conv_out.conv_inverted", 0))
                y = conv(y, sd, q + "conv_out.conv_depth", 1, groups=y.shape[1])
                y, g = y.chunk(2, 1)
                y = conv(y * silu(g), sd, q + "conv_out.conv_point", 0, bias=False)
                x = x + rms_c(y, sd, q + "conv_out.norm")
            j += 1
        mids[f"mid.decoder.up_blocks.{i}"] = x
    x = F.relu(rms_c(x, sd, "decoder.norm_out"))
    mids["mid.decoder.conv_out_input"] = x
    return conv(x, sd, "decoder.conv_out", 1), mids


# ---------------- scheduler
def ref_sigmas(N, shift):
    alphas = torch.linspace(1, 1 / 1000, N + 1, dtype=DT)
    s = 1 - alphas
    s = torch.flip(shift * s / (1 + (shift - 1) * s), [0])[:-1]
    sig = torch.cat([s, torch.zeros(1, dtype=DT)])
    ts = (sig[:-1] * 1000).to(torch.int64)
    return sig, ts


def ref_dpm_solve(sig, x, vel_fn):
    """DPM-Solver++ 2M midpoint, flow prediction, lower_order_final, final sigma 0."""
    N = len(sig) - 1
    lam = lambda s: math.log(1 - s) - math.log(s)
    prev = None
    samples = []
    for i in range(N):
        v = vel_fn(i, x)
        s, t = float(sig[i]), float(sig[i + 1])
        x0 = x - s * v
        if t == 0:
            x = x0
        else:
            h = lam(t) - lam(s)
            at = 1 - t
            if prev is None or (i == N - 1 and N < 15):
                x = (t / s) * x - at * (math.exp(-h) - 1) * x0
            else:
                s1 = float(sig[i - 1])
                h0 = lam(s) - lam(s1)
                r0 = h0 / h
                D0, D1 = x0, (x0 - prev) / r0
                x = (t / s) * x - at * (math.exp(-h) - 1) * D0 - 0.5 * at * (math.exp(-h) - 1) * D1
        prev = x0
        samples.append(x)
    return x, samples



def cc_connector(d, name):
    io_t = load_file(str(d / "io.safetensors"))
    cfg = json.loads((d / "model/config.json").read_text())
    sd = load_file(str(d / "model/model.safetensors"))
    out, mids = ref_connector(sd, cfg, io_t["inputs"].to(DT))
    report(name, "outputs", out, io_t["outputs"])
    for i, m in enumerate(mids):
        report(name, f"mid.layers.{i}", m, io_t[f"mid.layers.{i}"])



# ---------------- InternViT (original layout) + pixel shuffle v2 (spec §5 index formula) + mlp1
def ref_vit(sd, cfg, px):
    vc = cfg["vision_config"]
    C, H, p = vc["hidden_size"], vc["num_attention_heads"], vc["patch_size"]
    hd, eps = C // H, vc["layer_norm_eps"]

    def norm(x, P):
        if vc["norm_type"] == "rms_norm":
            return rmsnorm(x, W(sd, P + ".weight"), eps)
        return layernorm(x, W(sd, P + ".weight"), W(sd, P + ".bias"), eps)

    T, g = px.shape[0], px.shape[-1] // p
    x = F.conv2d(px.to(DT), W(sd, "vision_model.embeddings.patch_embedding.weight"),
                 W(sd, "vision_model.embeddings.patch_embedding.bias"), stride=p)       # [T, C, g, g]
    x = x.flatten(2).transpose(1, 2)                                                      # patch = row * g + col
    cls = W(sd, "vision_model.embeddings.class_embedding").reshape(1, 1, C).expand(T, 1, C)
    x = torch.cat([cls, x], 1) + W(sd, "vision_model.embeddings.position_embedding").reshape(1, g * g + 1, C)
    mids = []
    for i in range(vc["num_hidden_layers"]):
        P = f"vision_model.encoder.layers.{i}."
        h = norm(x, P + "norm1")
        q, k, v = lin(h, sd, P + "attn.qkv").view(T, -1, 3, C).unbind(2)
        if vc["qk_normalization"]:  # RMSNorm over all heads' channels together
            q = rmsnorm(q, W(sd, P + "attn.q_norm.weight"), eps)
            k = rmsnorm(k, W(sd, P + "attn.k_norm.weight"), eps)
        q, k, v = (t.reshape(T, -1, H, hd).transpose(1, 2) for t in (q, k, v))
        a = torch.softmax((q * hd ** -0.5) @ k.transpose(-1, -2), -1) @ v
        x = x + W(sd, P + "ls1") * lin(a.transpose(1, 2).reshape(T, -1, C), sd, P + "attn.proj")
        h = norm(x, P + "norm2")
        h = lin(h, sd, P + "mlp.fc1")
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        x = x + W(sd, P + "ls2") * lin(h, sd, P + "mlp.fc2")
        mids.append(x)
    grid = mids[cfg.get("select_layer", -1)][:, 1:].reshape(T, g, g, C)
    h2 = g // 2
    out = torch.empty(T, h2 * h2, 4 * C, dtype=DT)
    for r2 in range(h2):          # out[t, r2*h2 + c2, dy*2C + dx*C + ch] = grid[t, 2*r2 + dy, 2*c2 + dx, ch]
        for c2 in range(h2):
            for dy in range(2):
                for dx in range(2):
                    out[:, r2 * h2 + c2, (2 * dy + dx) * C:(2 * dy + dx + 1) * C] = grid[:, 2 * r2 + dy, 2 * c2 + dx]
    y = layernorm(out, W(sd, "mlp1.0.weight"), W(sd, "mlp1.0.bias"), 1e-5)
    y = lin(y, sd, "mlp1.1")
    y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
    return lin(y, sd, "mlp1.3"), mids


def cc_vit(d, name):
    io_t = load_file(str(d / "io.safetensors"))
    cfg = json.loads((d / "model/config.json").read_text())
    sd = load_file(str(d / "model/model.safetensors"))
    out, mids = ref_vit(sd, cfg, io_t["pixel_values"])
    report(name, "vit_embeds", out, io_t["vit_embeds"])
    for i, m in enumerate(mids):
        report(name, f"mid.vision_model.encoder.layers.{i}", m, io_t[f"mid.vision_model.encoder.layers.{i}"])



def cc_chat(d, name):
    """Float64 chat from the original-layout files: ViT -> scatter into the <IMG_CONTEXT> rows -> Qwen2 (no cache:
    the whole sequence again per step) -> greedy ids; the image context id from tokenizer.json's added tokens."""
    io_t = load_file(str(d / "io.safetensors"))
    cj = json.loads((d / "case.json").read_text())
    cfg = json.loads((d / "model/config.json").read_text())
    sd = load_file(str(d / "model/model.safetensors"))
    tj = json.loads((d / "model/tokenizer.json").read_text())
    ctx = [t["id"] for t in tj["added_tokens"] if t["content"] == "<IMG_CONTEXT>"][0]
    vit, _ = ref_vit(sd, cfg, io_t["pixel_values"])
    llm = {k[len("language_model."):]: v for k, v in sd.items() if k.startswith("language_model.")}
    ids = io_t["input_ids"][0].tolist()
    table = W(llm, "model.embed_tokens.weight")
    head = W(llm, "lm_head.weight")
    img = vit.reshape(-1, vit.shape[-1])
    gen = []
    for step in range(cj["max_new_tokens"]):
        emb = table[torch.tensor(ids)].clone()
        emb[torch.tensor(ids) == ctx] = img
        hs, _ = ref_qwen2(llm, cfg["llm_config"], emb[None])
        logits = hs[0, -1] @ head.T
        if step == 0:
            report(name, "prefill_logits", logits[None], io_t["prefill_logits"])
        nxt = int(logits.argmax())
        gen.append(nxt)
        ids.append(nxt)
        if nxt == cj["eos_token_id"]:
            break
    want = io_t["generated_ids"][0].tolist()
    CC_RESULTS.append((name, "generated_ids", 0.0 if gen == want else 1.0, 0.0, gen == want))


def cc_llm(d, name):
    io_t = load_file(str(d / "io.safetensors"))
    cfg = json.loads((d / "model/config.json").read_text())
    sd = load_file(str(d / "model/model.safetensors"))
    emb = W(sd, "model.embed_tokens.weight")[io_t["input_ids"]]
    hs, mids = ref_qwen2(sd, cfg, emb)
    report(name, "hidden_states", hs, io_t["hidden_states"])
    report(name, "mid.embed_tokens", emb, io_t["mid.embed_tokens"])
    for i, m in enumerate(mids):
        report(name, f"mid.layers.{i}", m, io_t[f"mid.layers.{i}"])
    head = W(sd, "lm_head.weight") if "lm_head.weight" in sd else W(sd, "model.embed_tokens.weight")
    report(name, "mid.logits", hs @ head.T, io_t["mid.logits"])


def cc_dit(d, name):
    io_t = load_file(str(d / "io.safetensors"))
    cfg = json.loads((d / "model/config.json").read_text())
    sd = load_file(str(d / "model/diffusion_pytorch_model.safetensors"))
    out, mids = ref_sana(sd, cfg, io_t["hidden_states"].to(DT), io_t["encoder_hidden_states"].to(DT), io_t["timestep"],
                     io_t.get("encoder_attention_mask"))
    report(name, "output", out, io_t["output"])
    for k, v in mids.items():
        report(name, k, v, io_t[k])


def cc_scheduler(d, name):
    io_t = load_file(str(d / "io.safetensors"))
    cj = json.loads((d / "case.json").read_text())
    if cj.get("sampler") == "flow_euler":
        # diffusers shifts twice: once for sigma_min/max at construction, again in set_timesteps.
        N, sh = cj["num_steps"], cj["flow_shift"]
        shift = lambda s: sh * s / (1 + (sh - 1) * s)  # noqa: E731
        smax, smin = shift(1.0), shift(1.0 / 1000)
        t = torch.linspace(smax * 1000, smin * 1000, N, dtype=torch.float64)
        sig = torch.cat([shift(t / 1000), torch.zeros(1, dtype=torch.float64)])
        report(name, "sigmas", sig, io_t["sigmas"], tol=1e-6)
        x = io_t["x_init"].to(DT)
        samples = []
        for i in range(N):
            x = x + (sig[i + 1] - sig[i]) * io_t["velocities"][i].to(DT)
            samples.append(x)
        report(name, "x_final", x, io_t["x_final"])
        report(name, "mid.samples", torch.stack(samples), io_t["mid.samples"])
        return
    sig, ts = ref_sigmas(cj["num_steps"], cj["flow_shift"])
    CC_RESULTS.append((name, "timesteps (exact)", 0.0, 0.0, bool(torch.equal(ts, io_t["timesteps"]))))
    report(name, "sigmas", sig, io_t["sigmas"], tol=1e-7)
    xf, samples = ref_dpm_solve(sig, io_t["x_init"].to(DT), lambda i, x: io_t["velocities"][i].to(DT))
    report(name, "x_final", xf, io_t["x_final"])
    report(name, "mid.samples", torch.stack(samples), io_t["mid.samples"])


def cc_vae(d, name):
    io_t = load_file(str(d / "io.safetensors"))
    cfg = json.loads((d / "model/config.json").read_text())
    sd = load_file(str(d / "model/diffusion_pytorch_model.safetensors"))
    out, mids = ref_dcae_decode(sd, cfg, io_t["latent"].to(DT))
    report(name, "sample", out, io_t["sample"])
    for k, v in mids.items():
        report(name, k, v, io_t[k])


def cc_pipeline(d, name):
    io_t = load_file(str(d / "io.safetensors"))
    cj = json.loads((d / "case.json").read_text())
    tk = Tokenizer.from_file(str(d / "model/llm/tokenizer.json"))
    cond, unc = chat_strings(cj["prompt"], cj["negative_prompt"])
    CC_RESULTS.append((name, "input_ids (exact)", 0.0, 0.0,
                       tk.encode(cond).ids == io_t["input_ids_cond"][0].tolist()
                       and tk.encode(unc).ids == io_t["input_ids_uncond"][0].tolist()))
    lcfg = json.loads((d / "model/llm/config.json").read_text())
    lsd = load_file(str(d / "model/llm/model.safetensors"))
    osd = load_file(str(d / "model/openuni.safetensors"))
    mq = W(osd, "meta_queries")
    Q = mq.shape[0]
    hid = {}
    for tag, ids in (("uncond", io_t["input_ids_uncond"]), ("cond", io_t["input_ids_cond"])):
        e = W(lsd, "model.embed_tokens.weight")[ids]
        hs, _ = ref_qwen2(lsd, lcfg, torch.cat([e, mq[None]], 1))
        hid[tag] = hs[:, -Q:]
        report(name, f"mid.llm.hidden_{tag}", hid[tag], io_t[f"mid.llm.hidden_{tag}"])
    cn, _ = ref_connector(osd, cj["connector"], torch.cat([hid["uncond"], hid["cond"]]), prefix="connector.")
    report(name, "mid.connector", cn, io_t["mid.connector"])
    pe = lin(cn, osd, "projector")
    report(name, "prompt_embeds", pe, io_t["prompt_embeds"])
    tcfg = json.loads((d / "model/transformer/config.json").read_text())
    tsd = load_file(str(d / "model/transformer/diffusion_pytorch_model.safetensors"))
    sig, ts = ref_sigmas(cj["num_steps"], cj["flow_shift"])
    CC_RESULTS.append((name, "mid.timesteps (exact)", 0.0, 0.0, bool(torch.equal(ts, io_t["mid.timesteps"]))))
    report(name, "mid.sigmas", sig, io_t["mid.sigmas"], tol=1e-7)
    g = cj["guidance_scale"]
    douts = []

    def vel(i, x):
        o, _ = ref_sana(tsd, tcfg, torch.cat([x, x]), pe, ts[i].to(DT).expand(2), None)
        douts.append(o)
        return o[0:1] + g * (o[1:2] - o[0:1])

    lat, steps = ref_dpm_solve(sig, io_t["noise"].to(DT), vel)
    report(name, "mid.dit_out", torch.stack(douts), io_t["mid.dit_out"])
    report(name, "mid.latents_steps", torch.stack(steps), io_t["mid.latents_steps"])
    report(name, "latents", lat, io_t["latents"])
    vcfg = json.loads((d / "model/vae/config.json").read_text())
    vsd = load_file(str(d / "model/vae/diffusion_pytorch_model.safetensors"))
    dec, _ = ref_dcae_decode(vsd, vcfg, lat / vcfg["scaling_factor"])
    report(name, "mid.decoded", dec, io_t["mid.decoded"])
    img = torch.clamp(127.5 * dec + 128, 0, 255).floor().permute(0, 2, 3, 1)
    diff = (img - io_t["image"].to(DT)).abs()
    n_diff = int((diff > 0).sum())
    CC_RESULTS.append((name, f"image (|diff| <= 1, {n_diff} px differ)", float(n_diff) / diff.numel(),
                       float(diff.max()), float(diff.max()) <= 1 and n_diff <= 0.01 * diff.numel()))


CROSSCHECKS = {"connector": cc_connector, "llm": cc_llm, "dit": cc_dit, "scheduler": cc_scheduler, "vae": cc_vae,
               "pipeline": cc_pipeline, "vit": cc_vit,
               "chat": cc_chat}


def crosscheck(case_dir):
    """Re-check one generated case with the float64 re-implementations. Returns (n_checked, failures)."""
    cj = json.loads((case_dir / "case.json").read_text())
    CC_RESULTS.clear()
    CROSSCHECKS[cj["component"]](case_dir, case_dir.name)
    bad = [r for r in CC_RESULTS if not r[4]]
    worst = max(CC_RESULTS, key=lambda r: r[2])
    print(f"  crosscheck (float64 re-implementation): {len(CC_RESULTS)} tensors, worst rel L2 {worst[2]:.1e} "
          f"({worst[1]})" + (f", {len(bad)} FAILED" if bad else ""))
    for r in bad:
        print(f"    FAILED {r[1]}: rel {r[2]:.2e} max abs {r[3]:.2e}")
    return len(CC_RESULTS), bad


# --------------------------------------------------------------------------------------------------------------
# preprocess: the InternVL3 model card's load_image (image file -> pixel_values), bit for bit
# --------------------------------------------------------------------------------------------------------------
# The transform is the model card's T.Compose([convert RGB, Resize((S,S), BICUBIC), ToTensor, Normalize]). With
# torchvision importable (e.g. PYTHONPATH=/path/to/torchvision) it is used as is; otherwise the same four steps
# are written out with Pillow + torch exactly as torchvision's PIL path computes them (Resize -> PIL
# img.resize((S,S), BICUBIC); ToTensor -> uint8 HWC -> CHW -> .to(float32).div(255); Normalize ->
# .sub(mean).div(std) with float32 mean/std). Both give identical bits (checked with torchvision 0.29.2).

PP_MEAN = (0.485, 0.456, 0.406)
PP_STD = (0.229, 0.224, 0.225)


def pp_transform(input_size):
    from PIL import Image
    try:
        import torchvision
        import torchvision.transforms as T
        from torchvision.transforms.functional import InterpolationMode
        tf = T.Compose([
            T.Lambda(lambda img: img.convert("RGB") if img.mode != "RGB" else img),
            T.Resize((input_size, input_size), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean=PP_MEAN, std=PP_STD),
        ])
        return tf, f"torchvision {torchvision.__version__}"
    except ImportError:
        pass
    import numpy as np

    def tf(img):
        img = img.convert("RGB") if img.mode != "RGB" else img
        img = img.resize((input_size, input_size), Image.BICUBIC)  # F_pil.resize: img.resize(size[::-1], interp)
        w, h = img.size
        t = torch.from_numpy(np.array(img, np.uint8, copy=True)).view(h, w, 3).permute(2, 0, 1).contiguous()
        t = t.to(dtype=torch.float32).div(255)
        mean = torch.as_tensor(PP_MEAN, dtype=torch.float32).view(-1, 1, 1)
        std = torch.as_tensor(PP_STD, dtype=torch.float32).view(-1, 1, 1)
        return t.sub(mean).div(std)
    return tf, "Pillow + torch (torchvision's PIL path written out)"


def pp_find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def pp_dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    """The model card's dynamic_preprocess, unchanged."""
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1) if
        i * j <= max_num and i * j >= min_num)
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    target_aspect_ratio = pp_find_closest_aspect_ratio(aspect_ratio, target_ratios, orig_width, orig_height, image_size)
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]
    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(blocks):
        box = ((i % (target_width // image_size)) * image_size, (i // (target_width // image_size)) * image_size,
               ((i % (target_width // image_size)) + 1) * image_size, ((i // (target_width // image_size)) + 1) * image_size)
        processed_images.append(resized_img.crop(box))
    assert len(processed_images) == blocks
    if use_thumbnail and len(processed_images) != 1:
        processed_images.append(image.resize((image_size, image_size)))
    return processed_images, target_aspect_ratio


def pp_load_image(image_file, input_size=448, max_num=12):
    """The model card's load_image, returning pixel_values in f32 (the card's bf16 cast comes later)."""
    from PIL import Image
    image = Image.open(image_file).convert("RGB")
    transform, how = pp_transform(input_size)
    images, grid = pp_dynamic_preprocess(image, image_size=input_size, use_thumbnail=True, max_num=max_num)
    pixel_values = torch.stack([transform(img) for img in images])
    return pixel_values, grid, how


def pp_source_image(seed, w, h, mode):
    """A small deterministic test picture: gradients, a disc, hard edges and noise (so resampling rounding
    is exercised everywhere), in the requested Pillow mode."""
    import numpy as np
    from PIL import Image
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255 * x / max(w - 1, 1)
    g = 255 * y / max(h - 1, 1)
    b = 255 * ((np.hypot(x - w / 2, y - h / 2) < min(w, h) / 3) * 0.8 + 0.1 * ((x // 5 + y // 7) % 2))
    rgb = np.stack([r, g, b], -1) + rng.normal(0, 24, (h, w, 3))
    rgb = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    im = Image.fromarray(rgb, "RGB")
    if mode == "RGB":
        return im
    if mode == "L":
        return im.convert("L")
    if mode == "RGBA":  # alpha varies: convert('RGB') must drop it, not composite
        a = np.clip(rng.randint(0, 256, (h, w)), 0, 255).astype(np.uint8)
        return Image.fromarray(np.dstack([rgb, a]), "RGBA")
    if mode == "LA":
        a = rng.randint(0, 256, (h, w)).astype(np.uint8)
        return Image.fromarray(np.dstack([np.array(im.convert("L")), a]), "LA")
    if mode == "P":
        p = im.quantize(colors=37, dither=Image.Dither.NONE)
        p.info["transparency"] = 3  # a transparent palette entry: still its RGB after convert('RGB')
        return p
    raise ValueError(mode)


def pp_write_png16(path, img):
    """A 16-bit-per-sample RGB PNG (Pillow cannot write one): samples v*257 + noise in the low byte, so a
    reader that rounds v16/257 instead of taking the high byte (Pillow's RGB;16B unpacker) is caught."""
    import zlib
    import numpy as np
    a = np.array(img.convert("RGB"), dtype=np.uint16)
    h, w, _ = a.shape
    lo = np.random.RandomState(5).randint(0, 256, a.shape).astype(np.uint16)
    v = (a << 8) | lo
    raw = b"".join(b"\x00" + v[yy].astype(">u2").tobytes() for yy in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9))
                           + chunk(b"IEND", b""))


# name -> (seed, width, height, mode, file, save options, input_size, max_num, what it covers)
PREPROCESS_SPECS = OrderedDict([
    ("preprocess_rgb_37x61_448", (11, 37, 61, "RGB", "image.png", {}, 448, 1,
                                  "model size: one 448 tile upsampled from 37x61")),
    ("preprocess_wide_250x60", (12, 250, 60, "RGB", "image.png", {}, 56, 6,
                                "wide: (4,1) grid + thumbnail, down- and upsampling")),
    ("preprocess_tall_gray", (13, 45, 160, "L", "image.png", {}, 48, 4, "grayscale PNG, (1,4) tall grid")),
    ("preprocess_square_tie", (14, 100, 100, "RGB", "image.png", {}, 64, 12,
                               "equal-diff tie rule: (2,2) taken (area > half of 4 tiles), (3,3) not")),
    ("preprocess_rgba_alpha", (15, 90, 70, "RGBA", "image.png", {}, 48, 4, "RGBA PNG: alpha dropped, not composited")),
    ("preprocess_la_alpha", (16, 70, 50, "LA", "image.png", {}, 40, 2, "gray+alpha PNG")),
    ("preprocess_palette_trns", (17, 64, 96, "P", "image.png", {}, 48, 3, "palette PNG with a transparent entry")),
    ("preprocess_rgb16", (18, 60, 44, "RGB16", "image.png", {}, 40, 2, "16-bit RGB PNG: high byte kept")),
    ("preprocess_downscale", (19, 240, 180, "RGB", "image.png", {}, 32, 1, "strong downscale (antialias, 25+ taps)")),
    ("preprocess_jpeg", (20, 96, 72, "RGB", "image.jpg", {"quality": 90}, 48, 4,
                         "baseline JPEG, 4:2:0 (decoded by libjpeg-turbo on both sides)")),
    ("preprocess_webp_lossless", (21, 80, 60, "RGB", "image.webp", {"lossless": True}, 40, 2, "lossless WebP")),
    ("preprocess_order_tie", (23, 60, 80, "RGB", "image.png", {}, 40, 1,
                              "pass order at the boundary: 80-40 == 2*(60-40), horizontal pass first")),
    ("preprocess_order_vfirst", (24, 59, 80, "RGB", "image.png", {}, 40, 1,
                                 "pass order just past the boundary: 80-40 > 2*(59-40), vertical pass first")),
    ("preprocess_webp_lossy_alpha", (22, 50, 110, "RGBA", "image.webp", {"quality": 80}, 40, 3,
                                     "lossy WebP with alpha (VP8 + ALPH), (1,2) grid, vertical pass first")),
])


def make_preprocess_case(out_dir, name):
    from PIL import Image
    import PIL
    seed, w, h, mode, fname, opts, input_size, max_num, what = PREPROCESS_SPECS[name]
    path = out_dir / fname
    if mode == "RGB16":
        pp_write_png16(path, pp_source_image(seed, w, h, "RGB"))
    else:
        pp_source_image(seed, w, h, mode).save(path, **opts)
    pv, grid, how = pp_load_image(path, input_size=input_size, max_num=max_num)
    again, _, _ = pp_load_image(path, input_size=input_size, max_num=max_num)
    assert torch.equal(pv, again), f"{name}: load_image is not deterministic"
    save_io(out_dir / "io.safetensors", {"pixel_values": pv})
    opened = Image.open(path)
    write_json(out_dir / "case.json", case_json(
        "preprocess", seed, image=fname, max_num=max_num, input_size=input_size, grid=list(grid),
        tiles=int(pv.shape[0]), source_mode=opened.mode, source_size=list(opened.size), covers=what,
        transform=how, pillow=PIL.__version__,
        notes="pixel_values = the model card's load_image(image, input_size, max_num) in f32, before the bf16 cast"))
    return {"bf16": {}, "extra": f"{fname} {opened.mode} {w}x{h} -> grid {grid}, {pv.shape[0]} tiles of {input_size} ({how})"}


def cc_preprocess(case_dir, case):
    """Independent check of the stored tensor: the normalisation re-done in float64 from the uint8 tiles of a
    fresh Pillow run must agree to f32 rounding (the bit-exact test is the Rust one)."""
    import numpy as np
    from PIL import Image
    cj = json.loads((case_dir / "case.json").read_text())
    io = load_file(str(case_dir / "io.safetensors"))
    image = Image.open(case_dir / cj["image"]).convert("RGB")
    tiles, _ = pp_dynamic_preprocess(image, image_size=cj["input_size"], use_thumbnail=True, max_num=cj["max_num"])
    u8 = np.stack([np.array(t, np.float64).transpose(2, 0, 1) for t in tiles])
    mean = np.array(PP_MEAN).reshape(1, 3, 1, 1)
    std = np.array(PP_STD).reshape(1, 3, 1, 1)
    report(case, "pixel_values", io["pixel_values"], torch.from_numpy((u8 / 255 - mean) / std), tol=1e-6)


def make_preprocess_bad_inputs(out_dir, args):
    """Files the loader must refuse with a clear error (tests/preprocess.rs): a CMYK JPEG (Pillow keeps it as
    "CMYK"; Adobe APP14 marker, inverted samples) and a 16-bit grayscale PNG (Pillow: mode "I;16", which
    convert('RGB') clips to white). No case.json: these are not verify cases."""
    import numpy as np
    from PIL import Image
    Image.new("CMYK", (16, 8), (10, 200, 30, 40)).save(out_dir / "cmyk.jpg", quality=90)
    g = (np.arange(12 * 10, dtype=np.uint16).reshape(10, 12) * 500).astype(np.uint16)
    Image.fromarray(g).save(out_dir / "gray16.png")
    assert Image.open(out_dir / "cmyk.jpg").mode == "CMYK" and Image.open(out_dir / "gray16.png").mode == "I;16"
    return {"bf16": {}, "extra": "cmyk.jpg (CMYK), gray16.png (I;16)"}


CROSSCHECKS["preprocess"] = cc_preprocess
PREPROCESS_CASES = OrderedDict(
    (name, (lambda n: lambda out_dir, args: make_preprocess_case(out_dir, n))(name)) for name in PREPROCESS_SPECS)
PREPROCESS_CASES["preprocess_bad_inputs"] = make_preprocess_bad_inputs


# --------------------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------------------

CASES = OrderedDict([
    ("connector_b2", case_connector_b2),
    ("llm_gqa_untied", case_llm_gqa_untied),
    ("dit_sana10_mask", case_dit_sana10_mask),
    ("dit_sana15_qknorm", case_dit_sana15_qknorm),
    ("scheduler_20_shift3", case_scheduler_20_shift3),
    ("scheduler_12_shift6", case_scheduler_12_shift6),
    ("scheduler_euler_10_shift3", case_scheduler_euler_10_shift3),
    ("vae_linear_nonsquare", case_vae_linear_nonsquare),
    ("vae_quadratic_small", case_vae_quadratic_small),
    ("pipeline_tiny", case_pipeline_tiny),
    ("pth", case_pth),
    ("vit_tiny", case_vit_tiny),
    ("vit_rmsnorm_qknorm", case_vit_rmsnorm_qknorm),
    ("chat_tiny", case_chat_tiny),
])


def dir_size(p):
    files = [f for f in Path(p).rglob("*") if f.is_file()]
    for f in files:
        f.chmod(0o644)  # safetensors writes 0600
    return len(files), sum(f.stat().st_size for f in files)


def main():
    CASES.update(PREPROCESS_CASES)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="output directory (default: tests/fixtures of this repository)")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="generate only this case (repeatable); names: " + ", ".join(CASES))
    ap.add_argument("--sensitivity", action="store_true",
                    help="also report how much a 1%% change of each weight / removing each bias moves the outputs")
    ap.add_argument("--no-crosscheck", action="store_true",
                    help="skip the float64 plain-PyTorch re-implementation check of each generated case")
    args = ap.parse_args()
    unknown = [n for n in args.only if n not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {list(CASES)}")
    names = args.only or list(CASES)
    out = Path(args.out) if args.out else Path(__file__).resolve().parent.parent / "tests" / "fixtures"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    failed = []
    for name in names:
        d = out / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        print(f"== {name}", flush=True)
        info = CASES[name](d, args)
        if not args.no_crosscheck and (d / "case.json").exists():
            _, bad = crosscheck(d)
            if bad:
                failed.append(name)
        n, size = dir_size(d)
        bf = ", ".join(f"{k} {v:.2e}" for k, v in info["bf16"].items()) or "-"
        if info.get("extra"):
            print(f"  {info['extra']}")
        rows.append((name, n, size, bf))
    print()
    print(f"{'case':24s} {'files':>5s} {'bytes':>10s}  bf16-vs-f32 relative L2")
    for name, n, size, bf in rows:
        print(f"{name:24s} {n:5d} {size:10d}  {bf}")
    total = sum(r[2] for r in rows)
    print(f"{'total':24s} {sum(r[1] for r in rows):5d} {total:10d}  ({total / 1e6:.2f} MB)")
    if failed:
        sys.exit(f"crosscheck failed for {failed}")


if __name__ == "__main__":
    main()
