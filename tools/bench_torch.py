#!/usr/bin/env python3
"""The PyTorch reference pipeline, timed like `openuni bench`, for ratios measured in the same run.

Builds the models of a variant from the configs `openuni bench --variant V --write-configs DIR` writes (so both
sides run exactly the same shapes), with random weights (speed does not depend on their values):
transformers' Qwen2Model (sdpa attention) over [prompt ++ 256 meta-queries], the connector (a SigLIP encoder
stack, as OpenUni builds it) and projector, diffusers' SanaTransformer2DModel and AutoencoderDC. It times, per
batch size N: conditioning (2N rows padded to the longest prompt, attention mask; the way a batched
transformers call runs), one transformer call on 2N rows, one decode of N latents, and a whole batch (20 steps of
DPM-Solver++ with CFG through diffusers' scheduler, then decode). GPU: CUDA events, warm-up, median; CPU:
perf_counter, same discipline. `--compile` adds torch.compile'd transformer/decoder timings; `--compiled-only`
times only the compiled transformer step (the eager columns come from another call, and the decoder's compile is
left out: a device lease is short, and the targets compare the step with torch.compile).

    ./target/release/openuni bench --variant b-512 --write-configs /tmp/cfg-b512
    python3 tools/bench_torch.py --configs /tmp/cfg-b512 --device cuda --dtype bf16 --batch 1,8,32 --json torch.json
    ./target/release/openuni bench --variant b-512 --batch 1,8,32 --json ours.json
    python3 tools/bench_torch.py --compare ours.json torch.json        # the ratio table

The prompt lengths match `openuni bench` (30 cond tokens, 16 uncond tokens).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

COND_TOKENS, UNCOND_TOKENS = 30, 16


def load(dir_, name):
    with open(os.path.join(dir_, name)) as f:
        return json.load(f)


def build(cfg_dir, device, dtype):
    import torch
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import Qwen2Config, Qwen2Model, SiglipVisionConfig
    from transformers.models.siglip.modeling_siglip import SiglipEncoder

    llm_cfg = load(cfg_dir, "llm.json")
    conn = load(cfg_dir, "connector.json")
    tr_cfg = load(cfg_dir, "transformer.json")
    vae_cfg = load(cfg_dir, "vae.json")
    meta = load(cfg_dir, "openuni.json")
    torch.manual_seed(0)
    qc = Qwen2Config(**{k: v for k, v in llm_cfg.items() if k != "rope_scaling"})
    qc._attn_implementation = "sdpa"
    llm = Qwen2Model(qc)
    vc = SiglipVisionConfig(**conn, attention_dropout=0.0)
    vc._attn_implementation = "sdpa"
    connector = SiglipEncoder(vc)
    projector = torch.nn.Linear(conn["hidden_size"], tr_cfg["caption_channels"])
    queries = torch.randn(meta["num_queries"], conn["hidden_size"]) * conn["hidden_size"] ** -0.5
    transformer = SanaTransformer2DModel(**tr_cfg)
    vae = AutoencoderDC(**{k: v for k, v in vae_cfg.items() if k not in ("decoder_norm_types", "decoder_act_fns")},
                        decoder_norm_types=vae_cfg.get("decoder_norm_types", "rms_norm"),
                        decoder_act_fns=vae_cfg.get("decoder_act_fns", "silu"))
    vae.encoder = None  # decode only: the encoder's weights would only take memory
    mods = dict(llm=llm, connector=connector, projector=projector, transformer=transformer, vae=vae)
    for m in mods.values():
        m.to(device=device, dtype=dtype).eval()
    mods["queries"] = queries.to(device=device, dtype=dtype)
    mods["meta"] = meta
    mods["vae_cfg"] = vae_cfg
    return mods


class Timer:
    def __init__(self, device):
        import torch
        self.torch, self.cuda = torch, device.startswith("cuda")

    def ms(self, fn):
        if self.cuda:
            s, e = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            self.torch.cuda.synchronize()
            return s.elapsed_time(e)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    def median(self, fn, iters, warmup=1):
        for _ in range(warmup):
            fn()
        return statistics.median(self.ms(fn) for _ in range(iters))


def run(args):
    import torch
    from diffusers import DPMSolverMultistepScheduler

    device = args.device
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[args.dtype]
    if device == "cpu":
        torch.set_num_threads(args.threads or os.cpu_count())
    m = build(args.configs, device, dtype)
    meta = m["meta"]
    size = args.size or meta["size"]
    lat = size // 32
    Q = meta["num_queries"]
    vocab = m["llm"].config.vocab_size
    sched_cfg = dict(num_train_timesteps=1000, beta_schedule="linear", prediction_type="flow_prediction",
                     use_flow_sigmas=True, flow_shift=3.0, solver_order=2, algorithm_type="dpmsolver++")
    timer = Timer(device)
    results = []
    tr, vae = m["transformer"], m["vae"]
    if args.compiled_only:
        args.compile = True
    if args.compile:
        tr_c = torch.compile(tr)
        dec_c = None if args.compiled_only else torch.compile(vae.decoder)
    for n in args.batch:
        g = torch.Generator().manual_seed(0)
        lens = [UNCOND_TOKENS] * n + [COND_TOKENS] * n
        T = max(lens)
        ids = torch.randint(0, vocab, (2 * n, T), generator=g).to(device)
        mask = torch.zeros(2 * n, T + Q, dtype=torch.long)
        for i, l in enumerate(lens):
            mask[i, T - l:] = 1  # left padding, so the queries sit at the same positions in every row
        mask = mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        noise = torch.randn(n, 32, lat, lat, generator=g).to(device)

        @torch.no_grad()
        def condition():
            emb = m["llm"].embed_tokens(ids)
            x = torch.cat([emb, m["queries"][None].expand(2 * n, -1, -1)], dim=1)
            h = m["llm"](inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state[:, -Q:]
            return m["projector"](m["connector"](inputs_embeds=h).last_hidden_state)

        pe = condition()
        x2 = torch.cat([noise, noise]).to(dtype)
        t2 = torch.full((2 * n,), 999.0, device=device)
        ones = torch.ones(2 * n, Q, device=device)

        @torch.no_grad()
        def step(model=tr):
            return model(x2, encoder_hidden_states=pe, timestep=t2, encoder_attention_mask=ones, return_dict=False)[0]

        sf = m["vae_cfg"]["scaling_factor"]

        @torch.no_grad()
        def decode(dec=None):
            z = noise.to(dtype) / sf
            return (dec or vae.decoder)(z)

        @torch.no_grad()
        def whole():
            pe_ = condition()
            sched = DPMSolverMultistepScheduler(**sched_cfg)
            sched.set_timesteps(args.steps, device=device)
            latents = noise.clone()
            for t in sched.timesteps:
                xin = torch.cat([latents, latents]).to(dtype)
                v = tr(xin, encoder_hidden_states=pe_, timestep=t.expand(2 * n).float(), encoder_attention_mask=ones,
                       return_dict=False)[0].float()
                vu, vc = v.chunk(2)
                latents = sched.step(vu + args.guidance * (vc - vu), t, latents, return_dict=False)[0]
            return vae.decoder(latents.to(dtype) / sf)

        r = dict(batch=n)
        if not args.compiled_only:
            r["conditioning_ms"] = timer.median(condition, args.iters)
            r["step_ms"] = timer.median(step, args.iters)
            r["decode_ms"] = timer.median(decode, args.iters)
            r["batch_ms"] = timer.median(whole, min(args.iters, 3))
            r["images_per_s"] = n / (r["batch_ms"] * 1e-3)
        if args.compile:
            r["compiled_step_ms"] = timer.median(lambda: step(tr_c), args.iters, warmup=3)
            if dec_c is not None:
                r["compiled_decode_ms"] = timer.median(lambda: decode(dec_c), args.iters, warmup=3)
        if device.startswith("cuda") and not args.compiled_only:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            decode()
            torch.cuda.synchronize()
            r["decode_peak_activation_bytes"] = torch.cuda.max_memory_allocated() - base
        print(json.dumps(r), flush=True)
        results.append(r)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = dict(engine="pytorch", torch=torch.__version__, variant=meta["variant"], device=device if device == "cpu"
                  else f"{device} ({torch.cuda.get_device_name()})", dtype=args.dtype, steps=args.steps, iters=args.iters,
                  height=size, width=size, commit=commit or "unknown",
                  date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), command=" ".join(sys.argv), results=results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


def compare(ours_path, torch_path):
    ours, ref = json.load(open(ours_path)), json.load(open(torch_path))
    print(f"openuni ({ours['device']}, {ours['dtype']}) vs PyTorch ({ref['device']}, {ref['dtype']}), {ours['variant']}, "
          f"{ours['width']}x{ours['height']}: ratio = PyTorch time / openuni time (> 1: openuni faster)")
    keys = ["conditioning_ms", "step_ms", "decode_ms", "batch_ms"]
    print(f"{'batch':>5} " + " ".join(f"{k:>16}" for k in keys) + f" {'images/s':>16}")
    by_n = {r["batch"]: r for r in ref["results"]}
    for r in ours["results"]:
        t = by_n.get(r["batch"])
        if t is None:
            continue
        cells = [f"{t[k] / r[k]:>15.2f}x" if k in t and k in r else f"{'-':>16}" for k in keys]
        ips = f" {r['images_per_s']:>7.2f} vs {t['images_per_s']:<6.2f}" if "images_per_s" in t else ""
        print(f"{r['batch']:>5} " + " ".join(cells) + ips)
        for k, ok in (("compiled_step_ms", "step_ms"), ("compiled_decode_ms", "decode_ms")):
            if k in t and ok in r:
                print(f"{'':>5} {ok} vs torch.compile: {t[k]:.2f} / {r[ok]:.2f} ms = {t[k] / r[ok]:.2f}x")


def sgemm_server(threads):
    """benches/gemm.rs's PyTorch side: reads "M K N" lines, answers each with the ms of one
    `F.linear(x[M,K], w[N,K])` call (the CPU backend's layout; tensors made and warmed once per shape)."""
    import torch
    torch.set_num_threads(threads or os.cpu_count())
    shapes = {}
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        m, k, n = map(int, line.split())
        if (m, k, n) not in shapes:
            shapes[(m, k, n)] = (torch.randn(m, k), torch.randn(n, k))
            torch.nn.functional.linear(*shapes[(m, k, n)])
        x, w = shapes[(m, k, n)]
        t = time.perf_counter()
        torch.nn.functional.linear(x, w)
        print((time.perf_counter() - t) * 1e3, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", help="folder written by `openuni bench --variant V --write-configs DIR`")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--batch", default="1,8,32", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--steps", default=20, type=int)
    ap.add_argument("--guidance", default=4.5, type=float)
    ap.add_argument("--iters", default=10, type=int)
    ap.add_argument("--size", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--compiled-only", action="store_true", help="time only the torch.compile'd step")
    ap.add_argument("--json")
    ap.add_argument("--compare", nargs=2, metavar=("OURS_JSON", "TORCH_JSON"))
    ap.add_argument("--sgemm-server", action="store_true", help="time F.linear calls for benches/gemm.rs (stdin/stdout)")
    args = ap.parse_args()
    if args.sgemm_server:
        sgemm_server(args.threads)
    elif args.compare:
        compare(*args.compare)
    elif args.configs:
        run(args)
    else:
        ap.error("give --configs DIR or --compare OURS TORCH")


if __name__ == "__main__":
    main()
