#!/usr/bin/env python3
"""The PyTorch baseline of `openuni bench --chat`: transformers' Qwen2ForCausalLM (sdpa attention, a KV cache)
built from the variant's llm.json (`openuni bench --variant V --write-configs DIR`), random weights, timed the
same way: the prefill of one prompt of P tokens (logits of its last position), and one decode step of B
sequences that each hold a P-token prompt in the cache (median of --iters steps after one untimed step).
GPU: synchronised perf_counter around each call; CPU: perf_counter with --threads torch threads.

    ./target/release/openuni bench --variant b-512 --write-configs /tmp/cfg-b512
    python3 tools/bench_torch_chat.py --configs /tmp/cfg-b512 --device cpu --dtype f32 --batch 1,8 --prompt 128 --threads 2
    ./target/release/openuni bench --chat --variant b-512 --device cpu --batch 1,8 --chat-prompt 128
    # the vision tower too (issue 17's "ViT of 13 tiles" target), on both sides:
    python3 tools/bench_torch_chat.py --configs /tmp/cfg-b512 --device cuda --batch 1 --vit-tiles 13
    ./target/release/openuni bench --chat --variant b-512 --device cuda --dtype bf16 --batch 1 --vit-tiles 13
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", required=True, help="folder written by `openuni bench --variant V --write-configs DIR`")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--batch", default="1,8", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--prompt", default=128, type=int, help="prompt tokens per sequence")
    ap.add_argument("--iters", default=10, type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--vit-tiles", type=int, default=0,
                    help="also time InternVL3's vision tower (vit.json: InternViT + pixel shuffle + mlp1, sdpa) on this many "
                         "448px tiles as one batch, as `openuni bench --chat --vit-tiles N` does")
    ap.add_argument("--json")
    a = ap.parse_args()

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if a.threads:
        torch.set_num_threads(a.threads)
    with open(os.path.join(a.configs, "llm.json")) as f:
        cfg = json.load(f)
    cfg = cfg.get("llm_config", cfg.get("text_config", cfg))
    qc = Qwen2Config(**{k: v for k, v in cfg.items() if k != "rope_scaling"})
    qc._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = Qwen2ForCausalLM(qc).to(device=a.device, dtype=dtype).eval()

    def sync():
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    def ms(fn):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        return (time.perf_counter() - t) * 1e3, out

    gen = torch.Generator().manual_seed(1)
    rows = []
    with torch.no_grad():
        for b in a.batch:
            ids = torch.randint(0, qc.vocab_size, (b, a.prompt), generator=gen).to(a.device)
            prefill = lambda: model(input_ids=ids[:1], use_cache=True, logits_to_keep=1).logits
            ms(prefill)  # warm-up
            prefill_ms = statistics.median(ms(prefill)[0] for _ in range(max(1, min(a.iters, 5))))
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            steps = []
            for i in range(a.iters + 1):
                t, out = ms(lambda: model(input_ids=nxt, past_key_values=cache, use_cache=True))
                cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                if i > 0:
                    steps.append(t)
            step = statistics.median(steps)
            rows.append(dict(batch=b, prefill_ms=prefill_ms, decode_step_ms=step, tokens_per_s=b * 1e3 / step))
    vit = None
    if a.vit_tiles:
        vit = dict(tiles=a.vit_tiles, ms=time_vit(a, qc, dtype, ms))
    report = dict(device=a.device, dtype=a.dtype, threads=torch.get_num_threads(), prompt_tokens=a.prompt,
                  iters=a.iters, torch=torch.__version__, rows=rows, vit=vit)
    print("batch  prefill_ms  decode_step_ms  tokens/s")
    for r in rows:
        print(f"{r['batch']:>5}  {r['prefill_ms']:>10.2f}  {r['decode_step_ms']:>14.3f}  {r['tokens_per_s']:>8.1f}")
    if vit:
        print(f"vision tower (InternViT + mlp1, sdpa), {vit['tiles']} tiles: {vit['ms']:.2f} ms")
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, a.json)


def time_vit(a, qc, dtype, ms):
    """Median time of transformers' InternVL `get_image_features` (vision tower with sdpa attention, pixel
    shuffle, projector) on a.vit_tiles random tiles, built from vit.json (an original-layout InternVL config).
    The language model it carries is cut to one layer and 16 tokens: only its width matters here."""
    import torch
    from transformers import InternVLConfig, Qwen2Config

    with open(os.path.join(a.configs, "vit.json")) as f:
        vj = json.load(f)
    vc = vj["vision_config"]
    vision = dict(hidden_size=vc["hidden_size"], num_attention_heads=vc["num_attention_heads"],
                  intermediate_size=vc["intermediate_size"], num_hidden_layers=vc["num_hidden_layers"],
                  image_size=[vc["image_size"]] * 2, patch_size=[vc["patch_size"]] * 2, num_channels=vc["num_channels"],
                  attention_bias=vc["qkv_bias"], use_qk_norm=vc["qk_normalization"], norm_type=vc["norm_type"],
                  layer_norm_eps=vc["layer_norm_eps"], hidden_act=vc["hidden_act"], use_mean_pooling=True,
                  use_absolute_position_embeddings=True)
    text = Qwen2Config(hidden_size=qc.hidden_size, intermediate_size=qc.intermediate_size, num_hidden_layers=1,
                       num_attention_heads=qc.num_attention_heads, num_key_value_heads=qc.num_key_value_heads,
                       vocab_size=16)
    cfg = InternVLConfig(vision_config=vision, text_config=text.to_dict(), downsample_ratio=vj["downsample_ratio"],
                         projector_hidden_act="gelu", vision_feature_layer=vj["select_layer"],
                         vision_feature_select_strategy="default", image_token_id=15)
    for c in (cfg, cfg.vision_config, cfg.text_config):
        c._attn_implementation = "sdpa"
    from transformers import InternVLModel
    model = InternVLModel(cfg).to(device=a.device, dtype=dtype).eval()
    s = vc["image_size"]
    px = torch.randn(a.vit_tiles, 3, s, s, generator=torch.Generator().manual_seed(2)).to(device=a.device, dtype=dtype)
    run = lambda: model.get_image_features(pixel_values=px, vision_feature_layer=cfg.vision_feature_layer,
                                           vision_feature_select_strategy="default")
    with torch.no_grad():
        ms(run)  # warm-up
        return statistics.median(ms(run)[0] for _ in range(max(1, a.iters)))


if __name__ == "__main__":
    main()
