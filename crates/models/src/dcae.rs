//! The decoder of diffusers `AutoencoderDC` (DC-AE f32c32, SANA 1.0/1.1 structure), op by op as
//! docs/models.md ("DC-AE decoder") describes it. Activations are tokens [B, h·w, C] (NHWC); convolutions
//! act on the h×w grid. Upstream key names are kept ("decoder.…").

use openuni_graph::{Graph, GraphBuilder, OutputName, UnaryFn, ValueId};
use openuni_tensor::{derived, Shape};
use serde::Deserialize;

use crate::config::{bounds, Bounds, ModelConfig};
use crate::nn::{glumb_conv, linear, rms_norm_biased, rms_norm_biased_residual, Scope};
use crate::{ModelError, Result};

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct DcaeConfig {
    pub latent_channels: usize,
    pub attention_head_dim: usize,
    pub decoder_block_out_channels: Vec<usize>,
    pub decoder_block_types: Vec<String>,
    pub decoder_layers_per_block: Vec<usize>,
    pub decoder_qkv_multiscales: Vec<Vec<usize>>,
    #[serde(default = "default_norm")]
    pub decoder_norm_types: serde_json::Value,
    #[serde(default = "default_act")]
    pub decoder_act_fns: serde_json::Value,
    #[serde(default = "default_true")]
    pub decoder_in_shortcut: bool,
    #[serde(default = "default_conv_act")]
    pub decoder_conv_act_fn: String,
    #[serde(default = "default_upsample")]
    pub upsample_block_type: String,
    pub scaling_factor: f32,
}

fn default_norm() -> serde_json::Value {
    "rms_norm".into()
}
fn default_act() -> serde_json::Value {
    "silu".into()
}
fn default_true() -> bool {
    true
}
fn default_conv_act() -> String {
    "relu".into()
}
fn default_upsample() -> String {
    "pixel_shuffle".into()
}

/// Decoder stages (each but the last doubles the resolution: f32 models have 6).
const MAX_STAGES: usize = 10;

impl ModelConfig for DcaeConfig {
    fn validate(&self, origin: &str) -> Result<()> {
        DcaeConfig::validate(self, origin)
    }
}

/// RMSNorm eps of every decoder norm.
const NORM_EPS: f32 = 1e-5;
/// GLUMBConv expansion of EfficientViT blocks.
const EXPAND: usize = 4;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum BlockType {
    Res,
    EfficientVit,
}

impl DcaeConfig {
    /// Refuses what this port does not implement, naming the config field.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let err = |msg: String| {
            Err(ModelError::Config {
                path: origin.into(),
                msg,
            })
        };
        let b = Bounds(origin);
        b.int(
            "latent_channels",
            self.latent_channels,
            1..=bounds::CHANNELS,
        )?;
        b.int(
            "attention_head_dim",
            self.attention_head_dim,
            1..=bounds::HEAD_DIM,
        )?;
        b.ints(
            "decoder_block_out_channels",
            &self.decoder_block_out_channels,
            1..=MAX_STAGES,
            1..=bounds::WIDTH,
        )?;
        b.ints(
            "decoder_layers_per_block",
            &self.decoder_layers_per_block,
            1..=MAX_STAGES,
            0..=bounds::LAYERS,
        )?;
        // diffusers takes the factor from the config as is; 0, a negative, NaN or Inf would
        // silently give a flat or non-finite image.
        b.positive("scaling_factor", self.scaling_factor as f64, 1e6)?;
        let n = self.decoder_block_out_channels.len();
        if self.decoder_block_types.len() != n
            || self.decoder_layers_per_block.len() != n
            || self.decoder_qkv_multiscales.len() != n
        {
            return err("decoder_block_out_channels, decoder_block_types, decoder_layers_per_block and decoder_qkv_multiscales must have one entry per stage".into());
        }
        let all = |v: &serde_json::Value, want: &str| match v {
            serde_json::Value::String(s) => s == want,
            serde_json::Value::Array(a) => a.iter().all(|x| x == want),
            _ => false,
        };
        if !all(&self.decoder_norm_types, "rms_norm") {
            return err(format!(
                "decoder_norm_types {} is not supported (rms_norm is)",
                self.decoder_norm_types
            ));
        }
        if !all(&self.decoder_act_fns, "silu") {
            return err(format!(
                "decoder_act_fns {} is not supported (silu is)",
                self.decoder_act_fns
            ));
        }
        if self.upsample_block_type != "interpolate" {
            return err(format!(
                "upsample_block_type `{}` is not supported (interpolate is, as in every SANA VAE)",
                self.upsample_block_type
            ));
        }
        if self.decoder_conv_act_fn != "relu" {
            return err(format!(
                "decoder_conv_act_fn `{}` is not supported (relu is)",
                self.decoder_conv_act_fn
            ));
        }
        for (i, t) in self.decoder_block_types.iter().enumerate() {
            match (
                self.block_type(i),
                self.decoder_qkv_multiscales[i].as_slice(),
            ) {
                (Some(BlockType::Res), _) => {}
                (Some(BlockType::EfficientVit), [5]) => {
                    if self.decoder_block_out_channels[i] % self.attention_head_dim != 0 {
                        return err(format!(
                            "stage {i}: {} channels are not a multiple of attention_head_dim",
                            self.decoder_block_out_channels[i]
                        ));
                    }
                }
                (Some(BlockType::EfficientVit), s) => {
                    return err(format!(
                        "stage {i}: qkv multiscales {s:?} are not supported ([5] is)"
                    ))
                }
                (None, _) => {
                    return err(format!(
                    "stage {i}: block type `{t}` is not supported (ResBlock, EfficientViTBlock)"
                ))
                }
            }
        }
        if self.decoder_in_shortcut
            && self.decoder_block_out_channels[n - 1] % self.latent_channels != 0
        {
            return err("the in-shortcut needs the last stage's channels to be a multiple of latent_channels".into());
        }
        Ok(())
    }

    fn block_type(&self, stage: usize) -> Option<BlockType> {
        match self.decoder_block_types[stage].as_str() {
            "ResBlock" => Some(BlockType::Res),
            "EfficientViTBlock" => Some(BlockType::EfficientVit),
            _ => None,
        }
    }

    /// Spatial upscaling from latent to image (32 for the f32c32 models).
    pub fn upscale(&self) -> usize {
        1 << (self.decoder_block_out_channels.len() - 1)
    }
}

/// Values callers may compare (`mid.*`), all in token layout.
pub struct DecoderOutputs {
    /// The image [B, 3, H, W] (NCHW), values nominally in [-1, 1].
    pub sample: ValueId,
    /// conv_in + in-shortcut, the input of the last stage (tokens).
    pub stem: ValueId,
    /// Output of each stage `up_blocks.i`, indexed by i (tokens), with its grid size. The head
    /// (norm_out, ReLU, conv_out) is one fused node on `stages[0]`; [`conv_out_input`] builds
    /// its inner value for comparisons.
    pub stages: Vec<(ValueId, usize, usize)>,
}

/// The decoder's weights: `decoder.…` in an `AutoencoderDC` folder.
fn top() -> Scope {
    Scope::new("decoder")
}

/// A k×k conv, then SiLU when `silu` (one node: the CUDA kernels fuse it into the epilogue).
#[allow(clippy::too_many_arguments)]
fn conv(
    b: &mut GraphBuilder,
    s: &Scope,
    x: ValueId,
    cin: usize,
    cout: usize,
    k: usize,
    bias: bool,
    silu: bool,
    h: usize,
    wd: usize,
) -> Result<ValueId> {
    let wt = b.weight(&s.name("weight"), [cout, cin, k, k])?;
    let bs = if bias {
        Some(b.weight(&s.name("bias"), [cout])?)
    } else {
        None
    };
    Ok(b.conv2d(s.path(), x, wt, bs, h, wd, k, silu)?)
}

// 1×1 convs are `nn::linear` over the token layout: the weight readers serve a stored
// [out, in, 1, 1] conv weight as [out, in] (size-1 axes aside, the same tensor).

/// The decoder on `latent` [B, latent_channels, h, w] (NCHW, already divided by the scaling
/// factor by the caller): [`decoder_global`] then [`decoder_local`].
pub fn decoder(
    b: &mut GraphBuilder,
    cfg: &DcaeConfig,
    latent: ValueId,
    origin: &str,
) -> Result<DecoderOutputs> {
    let g = decoder_global(b, cfg, latent, origin)?;
    let l = decoder_local(b, cfg, g.features, g.batch, g.h, g.w)?;
    let mut stages = g.stages;
    for (i, s) in l.stages.into_iter().enumerate() {
        stages[i] = s;
    }
    Ok(DecoderOutputs {
        sample: l.sample,
        stem: g.stem,
        stages,
    })
}

/// The decoder graphs' input: latents already divided by the scaling factor [B, C, h, w].
pub const LATENT: &str = "latent";
/// The decoded image [B, 3, H, W] (the whole decoder's and a tile's output).
pub const SAMPLE: OutputName = OutputName("sample");
/// The global part's output and the tile graph's input: features [B, h·w, C] (tokens).
pub const FEATURES: OutputName = OutputName("features");

/// The decoder graph for latents of `shape`: input [`LATENT`], output [`SAMPLE`].
pub fn decoder_graph(cfg: &DcaeConfig, shape: &Shape) -> Result<Graph> {
    on_latent(shape, SAMPLE, |b, z| Ok(decoder(b, cfg, z, "vae")?.sample))
}

/// The decoder's global part (conv_in and the attention stages) on latents of `shape`: input
/// [`LATENT`], output [`FEATURES`].
pub fn decoder_global_graph(cfg: &DcaeConfig, shape: &Shape) -> Result<Graph> {
    on_latent(shape, FEATURES, |b, z| {
        Ok(decoder_global(b, cfg, z, "vae")?.features)
    })
}

/// A graph from the input [`LATENT`] of `shape` to the output `out` that `part` computes.
fn on_latent(
    shape: &Shape,
    out: OutputName,
    part: impl FnOnce(&mut GraphBuilder, ValueId) -> Result<ValueId>,
) -> Result<Graph> {
    let mut b = GraphBuilder::new();
    let z = b.input(LATENT, shape.clone())?;
    let y = part(&mut b, z)?;
    b.mark(out, y)?;
    Ok(b.finish())
}

/// The decoder's local part on a tile of `batch` × `h`×`w` global features: input
/// [`FEATURES`], output [`SAMPLE`].
pub fn decoder_tile_graph(cfg: &DcaeConfig, batch: usize, h: usize, w: usize) -> Result<Graph> {
    let mut b = GraphBuilder::new();
    let x = b.input(FEATURES.0, [batch, h * w, cfg.local_split().channels])?;
    let o = decoder_local(&mut b, cfg, x, batch, h, w)?;
    b.mark(SAMPLE, o.sample)?;
    Ok(b.finish())
}

/// How the decoder splits for exact tiling (docs/models.md, "DC-AE decoder"): the stages from
/// `split` up hold the global linear attention and run on the whole latent; the stages below
/// it are ResBlocks and upsamplers only, so each output pixel of that local part depends on its
/// input within `context` pixels and nothing else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalSplit {
    /// The lowest stage index of the global part.
    pub split: usize,
    /// Channels of the local part's input (`up_blocks.{split}`'s output).
    pub channels: usize,
    /// Output pixels per local-input pixel (2^split).
    pub upscale: usize,
    /// Local-input pixels per latent pixel (2^(stages - 1 - split)).
    pub grid: usize,
    /// Receptive-field radius of the local part, in its input's pixels.
    pub context: usize,
}

impl DcaeConfig {
    /// Where the global part ends and how far the local part reaches (see [`LocalSplit`]).
    pub fn local_split(&self) -> LocalSplit {
        let n = self.decoder_block_out_channels.len();
        // The lowest stage with attention; with none, only the last stage (it has no upsampler).
        let split = (0..n)
            .find(|&i| self.block_type(i) == Some(BlockType::EfficientVit))
            .unwrap_or(n - 1);
        // Walk back from the output: conv_out reaches 1 pixel; each ResBlock's two 3×3 convs 2,
        // an upsampler's 3×3 conv 1 more at the high resolution; the nearest upsample halves the
        // reach (rounding up) on the way to the lower resolution.
        let mut r = 1;
        for i in 0..split {
            r += 2 * self.decoder_layers_per_block[i] + 1;
            r = r.div_ceil(2);
        }
        LocalSplit {
            split,
            channels: self.decoder_block_out_channels[split],
            upscale: 1 << split,
            grid: 1 << (n - 1 - split),
            context: r,
        }
    }
}

/// A tiled decode's geometry on the grid of the decoder's local part (`dcae::LocalSplit`):
/// tiles of `tile` pixels a side, each decoding `context` pixels beyond the region it keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    pub tile: usize,
    pub context: usize,
}

impl Tiling {
    /// Tiles of `tile_px` output pixels with the decoder's whole receptive field as context.
    pub fn new(vae: &DcaeConfig, tile_px: usize) -> Result<Tiling> {
        let bail = |msg: String| Err(ModelError::Invalid(msg));
        let (up, s) = (vae.upscale(), vae.local_split());
        if tile_px == 0 || tile_px % up != 0 {
            return bail(format!("--decode-tile {tile_px} is not a positive multiple of {up} (one latent pixel is {up}x{up} pixels)"));
        }
        let t = Tiling {
            tile: tile_px / s.upscale,
            context: s.context,
        };
        if t.tile <= 2 * t.context {
            let ctx = t.context * s.upscale;
            return bail(format!(
                "--decode-tile {tile_px} keeps no pixels of its own: each tile decodes {ctx} px of context on each side \
                 (the decoder's receptive field beyond its attention stages), so a tile must be larger than {} px",
                2 * ctx
            ));
        }
        Ok(t)
    }
}

/// Start offsets of tiles of `tile` covering `n` with stride `tile - overlap`, the last one
/// clamped so that it ends at `n`; one tile at 0 when `n <= tile`.
pub fn tile_starts(n: usize, tile: usize, overlap: usize) -> Vec<usize> {
    if n <= tile {
        return vec![0];
    }
    let stride = tile - overlap;
    let mut v = vec![];
    let mut s = 0;
    while s + tile < n {
        v.push(s);
        s += stride;
    }
    v.push(n - tile);
    v
}

/// The span of `[0, n)` each tile starting at `starts` keeps: from `context` past its start (0 for
/// the first) to where the next one's begins (`n` for the last). With stride <= tile - 2·context
/// every kept pixel is at least `context` from its tile's inner edges.
pub fn owned_spans(starts: &[usize], n: usize, context: usize) -> Vec<(usize, usize)> {
    let lo = |i: usize| if i == 0 { 0 } else { starts[i] + context };
    (0..starts.len())
        .map(|i| (lo(i), if i + 1 < starts.len() { lo(i + 1) } else { n }))
        .collect()
}

/// The global part's result: the features the local part reads, tokens [batch, h·w, channels].
pub struct GlobalOutputs {
    pub features: ValueId,
    pub batch: usize,
    pub h: usize,
    pub w: usize,
    /// conv_in + in-shortcut (tokens).
    pub stem: ValueId,
    /// Output of each stage `up_blocks.i` this part ran (i >= split), with its grid size;
    /// the other entries are the stem.
    pub stages: Vec<(ValueId, usize, usize)>,
}

/// The local part's results.
pub struct LocalOutputs {
    /// The image [B, 3, H, W] (NCHW).
    pub sample: ValueId,
    /// Output of each stage `up_blocks.i`, i < split (tokens), with its grid size.
    pub stages: Vec<(ValueId, usize, usize)>,
}

/// conv_in with the in-shortcut, then the stages from the last down to `local_split().split`.
pub fn decoder_global(
    b: &mut GraphBuilder,
    cfg: &DcaeConfig,
    latent: ValueId,
    origin: &str,
) -> Result<GlobalOutputs> {
    cfg.validate(origin)?;
    let ls = b.shape(latent).clone();
    let d = ls.dims();
    if d.len() != 4 || d[1] != cfg.latent_channels {
        return Err(ModelError::Config {
            path: origin.into(),
            msg: format!(
                "latent has shape {ls}, expected [B, {}, h, w]",
                cfg.latent_channels
            ),
        });
    }
    let (batch, h, wd) = (d[0], d[2], d[3]);
    let chans = &cfg.decoder_block_out_channels;
    let n = chans.len();
    let top = top();
    let z = b.transpose(
        &top.name("to_tokens"),
        latent,
        batch,
        cfg.latent_channels,
        h * wd,
        [batch, h * wd, cfg.latent_channels],
    )?;
    let mut x = conv(
        b,
        &top.pp("conv_in"),
        z,
        cfg.latent_channels,
        chans[n - 1],
        3,
        true,
        false,
        h,
        wd,
    )?;
    if cfg.decoder_in_shortcut {
        let r = b.repeat_channels(
            &top.name("in_shortcut"),
            z,
            chans[n - 1] / cfg.latent_channels,
        )?;
        x = b.add(&top.name("stem"), x, r)?;
    }
    let stem = x;
    let mut stages = vec![(x, h, wd); n];
    let (x, h, wd) = run_stages(b, cfg, x, h, wd, cfg.local_split().split..n, &mut stages)?;
    Ok(GlobalOutputs {
        features: x,
        batch,
        h,
        w: wd,
        stem,
        stages,
    })
}

/// The stages below `local_split().split`, then norm_out, ReLU and conv_out, on `features`
/// tokens [batch, h·w, channels] (the global part's output, or a tile of it).
pub fn decoder_local(
    b: &mut GraphBuilder,
    cfg: &DcaeConfig,
    features: ValueId,
    batch: usize,
    h: usize,
    wd: usize,
) -> Result<LocalOutputs> {
    let split = cfg.local_split().split;
    let mut stages = vec![(features, h, wd); split];
    let (x, h, wd) = run_stages(b, cfg, features, h, wd, 0..split, &mut stages)?;
    let (c, top) = (cfg.decoder_block_out_channels[0], top());
    // norm_out -> ReLU -> conv_out (3×3, 3 channels) as one node: the 128-channel full-resolution
    // normalised and rectified tensors are never stored.
    let (norm, out) = (top.pp("norm_out"), top.pp("conv_out"));
    let nw = b.weight(&norm.name("weight"), [c])?;
    let nb = b.weight(&norm.name("bias"), [c])?;
    let wt = b.weight(&out.name("weight"), [3, c, 3, 3])?;
    let bs = b.weight(&out.name("bias"), [3])?;
    let y = b.rmsnorm_relu_conv2d(
        out.path(),
        x,
        nw,
        Some(nb),
        NORM_EPS,
        wt,
        Some(bs),
        h,
        wd,
        3,
    )?;
    let sample = b.transpose(&top.name("to_nchw"), y, batch, h * wd, 3, [batch, 3, h, wd])?;
    Ok(LocalOutputs { sample, stages })
}

/// ReLU(norm_out(x)), the input of conv_out, built unfused on `x` (the last stage's output) for
/// comparisons with a reference's intermediate: the decoder itself never stores it.
pub fn conv_out_input(b: &mut GraphBuilder, cfg: &DcaeConfig, x: ValueId) -> Result<ValueId> {
    let top = top();
    let x = rms_norm_biased(
        b,
        &top.pp("norm_out"),
        x,
        cfg.decoder_block_out_channels[0],
        NORM_EPS,
    )?;
    Ok(b.unary(&top.name("conv_act"), x, UnaryFn::Relu)?)
}

/// `up_blocks.i` for i in `range`, from the highest down (each but the last starting with its
/// upsampler), recording each stage's output in `stages[i]`; returns the result and its grid.
fn run_stages(
    b: &mut GraphBuilder,
    cfg: &DcaeConfig,
    mut x: ValueId,
    mut h: usize,
    mut wd: usize,
    range: std::ops::Range<usize>,
    stages: &mut [(ValueId, usize, usize)],
) -> Result<(ValueId, usize, usize)> {
    let chans = &cfg.decoder_block_out_channels;
    let n = chans.len();
    for i in range.rev() {
        let stage = top().pp("up_blocks").pp(i);
        let c = chans[i];
        let mut first = 0;
        if i < n - 1 {
            x = up_block(b, &stage.pp(0), x, chans[i + 1], c, h, wd)?;
            (h, wd) = (2 * h, 2 * wd);
            first = 1;
        }
        for j in 0..cfg.decoder_layers_per_block[i] {
            let bp = stage.pp(first + j);
            x = match cfg.block_type(i).expect("validated") {
                BlockType::Res => res_block(b, &bp, x, c, h, wd)?,
                BlockType::EfficientVit => {
                    efficient_vit_block(b, &bp, x, c, cfg.attention_head_dim, h, wd)?
                }
            };
        }
        stages[i] = (x, h, wd);
    }
    Ok((x, h, wd))
}

/// DCUpBlock2d (interpolate): `conv3x3(nearest2x(x)) + pixel_shuffle(repeat_interleave(x))`, as
/// one fused node (`Op::UpsampleConv2d`, the same math as upsample2x -> conv -> + shortcut): the
/// CUDA backend computes it as four 2×2 phase convolutions on `x` and never materializes the
/// upsampled tensor.
fn up_block(
    b: &mut GraphBuilder,
    s: &Scope,
    x: ValueId,
    cin: usize,
    cout: usize,
    h: usize,
    wd: usize,
) -> Result<ValueId> {
    let cs = s.pp("conv");
    let wt = b.weight(&cs.name("weight"), [cout, cin, 3, 3])?;
    let bs = b.weight(&cs.name("bias"), [cout])?;
    Ok(b.upsample_conv2d(cs.path(), x, wt, Some(bs), h, wd, true)?)
}

/// `x + norm(conv2(silu(conv1(x))))` (the norm and the residual one node).
fn res_block(
    b: &mut GraphBuilder,
    s: &Scope,
    x: ValueId,
    c: usize,
    h: usize,
    wd: usize,
) -> Result<ValueId> {
    let y = conv(b, &s.pp("conv1"), x, c, c, 3, true, true, h, wd)?;
    let y = conv(b, &s.pp("conv2"), y, c, c, 3, false, false, h, wd)?;
    rms_norm_biased_residual(b, &s.pp("norm"), y, c, NORM_EPS, x)
}

/// `conv_out(attn(x))`, both residual.
fn efficient_vit_block(
    b: &mut GraphBuilder,
    s: &Scope,
    x: ValueId,
    c: usize,
    hd: usize,
    h: usize,
    wd: usize,
) -> Result<ValueId> {
    let x = multiscale_attention(b, &s.pp("attn"), x, c, hd, h, wd)?;
    glumb_conv_residual(b, &s.pp("conv_out"), x, c, h, wd)
}

/// SanaMultiscaleLinearAttention: [to_q|to_k|to_v] (one GEMM), the 5×5 depthwise +
/// grouped 1×1 multi-scale branch, ReLU linear attention over groups of (q|k|v) of `hd` channels
/// each, to_out, channel RMSNorm, residual.
fn multiscale_attention(
    b: &mut GraphBuilder,
    s: &Scope,
    x: ValueId,
    c: usize,
    hd: usize,
    h: usize,
    wd: usize,
) -> Result<ValueId> {
    let heads = c / hd;
    // [to_q; to_k; to_v] as one GEMM on the three weights concatenated once at load (interleaving
    // blocks of c rows is a plain row concat): x is read once and the concat is never stored.
    let parts = ["to_q", "to_k", "to_v"]
        .map(|p| s.pp(p).name("weight"))
        .to_vec();
    let w = b.weight(&derived::interleaved_rows_name(&parts, c), [3 * c, c])?;
    let qkv = b.linear(&s.name("qkv"), x, w, None)?;
    let m = s.pp("to_qkv_multiscale").pp(0);
    let (pin, pout) = (m.pp("proj_in"), m.pp("proj_out"));
    let dw = b.weight(&pin.name("weight"), [3 * c, 1, 5, 5])?;
    let agg = b.depthwise_conv2d(pin.path(), qkv, dw, None, h, wd, 5)?;
    let gw = b.weight(&pout.name("weight"), [3 * c, hd, 1, 1])?;
    let agg = b.grouped_linear(pout.path(), agg, gw, 3 * heads)?;
    // The concat of [qkv | agg] upstream makes is never stored: the attention reads both scales.
    let o = b.multiscale_linear_attention(&s.name("linear_attention"), &[qkv, agg], hd)?;
    let o = linear(b, &s.pp("to_out"), o, 2 * c, c, false)?;
    rms_norm_biased_residual(b, &s.pp("norm_out"), o, c, NORM_EPS, x)
}

/// GLUMBConv with residual: `x + norm(point(u · silu(g)))`, `[u|g] = dw3x3(silu(inverted(x)))`.
fn glumb_conv_residual(
    b: &mut GraphBuilder,
    s: &Scope,
    x: ValueId,
    c: usize,
    h: usize,
    wd: usize,
) -> Result<ValueId> {
    let y = glumb_conv(b, s, x, c, EXPAND * c, c, h, wd)?;
    rms_norm_biased_residual(b, &s.pp("norm"), y, c, NORM_EPS, x)
}
