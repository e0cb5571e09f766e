//! diffusers `SanaTransformer2DModel` (Sana 600M/1600M 512px and SANA1.5 1.6B 1024px), op by op
//! as docs/models.md ("SANA transformer") describes it. Upstream key names are kept.
//!
//! The model is built in two parts so that what depends only on the prompt runs once per
//! generation: [`caption_path`] (caption projection + norm, then every block's cross-attention
//! K/V) and [`denoise`] (one transformer call per step).

use std::collections::HashMap;

use openuni_graph::{Graph, GraphBuilder, OutputName, UnaryFn, ValueId};
use openuni_tensor::{derived, Shape};
use serde::Deserialize;

use crate::config::{bounds, Bounds, ModelConfig};
use crate::nn::{glumb_conv, linear, linear_residual, rms_norm, Scope};
use crate::{ModelError, Result};

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct SanaConfig {
    pub in_channels: usize,
    pub out_channels: Option<usize>,
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub num_layers: usize,
    pub num_cross_attention_heads: usize,
    pub cross_attention_head_dim: usize,
    pub cross_attention_dim: usize,
    pub caption_channels: usize,
    pub mlp_ratio: f64,
    #[serde(default)]
    pub attention_bias: bool,
    pub patch_size: usize,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f32,
    #[serde(default)]
    pub norm_elementwise_affine: bool,
    #[serde(default)]
    pub interpolation_scale: Option<f64>,
    #[serde(default)]
    pub guidance_embeds: bool,
    #[serde(default)]
    pub qk_norm: Option<String>,
    #[serde(default)]
    pub sample_size: Option<usize>,
}

fn default_norm_eps() -> f32 {
    1e-6
}

/// RMSNorm eps of the caption norm and of the q/k norms (diffusers uses 1e-5 for both attentions).
const CAPTION_NORM_EPS: f32 = 1e-5;
const QK_NORM_EPS: f32 = 1e-5;
const TIMESTEP_CHANNELS: usize = 256;

impl SanaConfig {
    /// The inner width D.
    pub fn dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// The Mix-FFN hidden width, `int(mlp_ratio · D)`.
    pub fn ffn_hidden(&self) -> usize {
        (self.mlp_ratio * self.dim() as f64) as usize
    }

    pub fn qk_norm(&self) -> bool {
        self.qk_norm.is_some()
    }

    /// Refuses configs this port does not implement, naming the field.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let err = |msg: String| {
            Err(ModelError::Config {
                path: origin.into(),
                msg,
            })
        };
        let b = Bounds(origin);
        b.int("in_channels", self.in_channels, 1..=bounds::CHANNELS)?;
        if let Some(c) = self.out_channels {
            b.int("out_channels", c, 1..=bounds::CHANNELS)?;
        }
        b.int(
            "num_attention_heads",
            self.num_attention_heads,
            1..=bounds::HEADS,
        )?;
        b.int(
            "attention_head_dim",
            self.attention_head_dim,
            1..=bounds::HEAD_DIM,
        )?;
        b.int("num_layers", self.num_layers, 1..=bounds::LAYERS)?;
        b.int(
            "num_cross_attention_heads",
            self.num_cross_attention_heads,
            1..=bounds::HEADS,
        )?;
        b.int(
            "cross_attention_head_dim",
            self.cross_attention_head_dim,
            1..=bounds::HEAD_DIM,
        )?;
        b.int(
            "cross_attention_dim",
            self.cross_attention_dim,
            1..=bounds::WIDTH,
        )?;
        b.int("caption_channels", self.caption_channels, 1..=bounds::WIDTH)?;
        b.positive("mlp_ratio", self.mlp_ratio, 64.0)?;
        b.positive("norm_eps", self.norm_eps as f64, 1.0)?;
        if let Some(s) = self.sample_size {
            b.int("sample_size", s, 1..=bounds::WIDTH)?;
        }
        b.product(
            "num_attention_heads x attention_head_dim",
            self.num_attention_heads,
            self.attention_head_dim,
            1..=bounds::WIDTH,
        )?;
        b.product(
            "num_cross_attention_heads x cross_attention_head_dim",
            self.num_cross_attention_heads,
            self.cross_attention_head_dim,
            1..=bounds::WIDTH,
        )?;
        // mlp_ratio <= 64 and D <= WIDTH keep the Mix-FFN width finite; it must not round to 0.
        b.int(
            "int(mlp_ratio x inner width)",
            self.ffn_hidden(),
            1..=64 * bounds::WIDTH,
        )?;
        if self.patch_size != 1 {
            return err(format!(
                "patch_size {} is not supported (OpenUni's SANA models use 1)",
                self.patch_size
            ));
        }
        if self.interpolation_scale.is_some() {
            return err("interpolation_scale is set: sincos position embeddings (2K/4K models) are not supported".into());
        }
        if self.guidance_embeds {
            return err("guidance_embeds (Sana-Sprint) is not supported".into());
        }
        if self.norm_elementwise_affine {
            return err(
                "norm_elementwise_affine=true is not supported (SANA's block norms have no affine)"
                    .into(),
            );
        }
        match self.qk_norm.as_deref() {
            None | Some("rms_norm_across_heads") => {}
            Some(other) => {
                return err(format!(
                    "qk_norm `{other}` is not supported (expected null or rms_norm_across_heads)"
                ))
            }
        }
        if self.cross_attention_dim != self.dim() {
            return err(format!(
                "cross_attention_dim {} differs from the inner width {} (the caption projection outputs the inner width)",
                self.cross_attention_dim,
                self.dim()
            ));
        }
        Ok(())
    }
}

impl ModelConfig for SanaConfig {
    fn validate(&self, origin: &str) -> Result<()> {
        SanaConfig::validate(self, origin)
    }
}

/// The transformer was trained on timesteps in [0, 1000] (σ·1000); anything else is a caller
/// error that would silently give a meaningless velocity.
pub fn check_timesteps(t: &[f32]) -> Result<()> {
    match t.iter().find(|&&v| !(0.0..=1000.0).contains(&v)) {
        Some(v) => Err(ModelError::Config {
            path: "timestep".into(),
            msg: format!("timestep {v} is outside [0, 1000]"),
        }),
        None => Ok(()),
    }
}

/// Per-block cross-attention keys and values, computed once per prompt.
pub struct CrossKv {
    pub k: ValueId,
    pub v: ValueId,
}

/// `caption_projection` (Linear → tanh-GELU → Linear) and `caption_norm` (RMSNorm eps 1e-5) of
/// `encoder_hidden_states` [B, L, caption_channels]; then each block's `attn2` K (with its norm
/// for SANA1.5) and V. Returns (caption states, per-block K/V).
pub fn caption_path(
    b: &mut GraphBuilder,
    cfg: &SanaConfig,
    enc: ValueId,
) -> Result<(ValueId, Vec<CrossKv>)> {
    let (d, top) = (cfg.dim(), Scope::default());
    let cp = top.pp("caption_projection");
    let h = linear(b, &cp.pp("linear_1"), enc, cfg.caption_channels, d, true)?;
    let h = b.unary(&cp.name("act_1"), h, UnaryFn::GeluTanh)?;
    let h = linear(b, &cp.pp("linear_2"), h, d, d, true)?;
    let c = rms_norm(b, &top.pp("caption_norm"), h, d, CAPTION_NORM_EPS)?;
    let inner = cfg.num_cross_attention_heads * cfg.cross_attention_head_dim;
    let mut kv = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let a = top.pp("transformer_blocks").pp(i).pp("attn2");
        let mut k = linear(b, &a.pp("to_k"), c, d, inner, true)?;
        if cfg.qk_norm() {
            k = rms_norm(b, &a.pp("norm_k"), k, inner, QK_NORM_EPS)?;
        }
        let v = linear(b, &a.pp("to_v"), c, d, inner, true)?;
        kv.push(CrossKv { k, v });
    }
    Ok((c, kv))
}

/// Values of one transformer call that the caller may want to compare (`mid.*` of the cases).
pub struct DenoiseOutputs {
    pub output: ValueId,
    pub patch_embed: ValueId,
    pub t6: ValueId,
    pub embedded_timestep: ValueId,
    pub blocks: Vec<ValueId>,
    pub norm_out: ValueId,
}

/// One transformer call: `hidden_states` [B, in, h, w] (NCHW), `timestep` [B] (f32 with integer
/// values), the caption path's K/V, and an optional `encoder_attention_mask` [B, L] (1 keep, 0 pad).
/// The output is the velocity [B, out, h, w].
#[allow(clippy::too_many_arguments)]
pub fn denoise(
    b: &mut GraphBuilder,
    cfg: &SanaConfig,
    hidden_states: ValueId,
    timestep: ValueId,
    cross_kv: &[CrossKv],
    mask: Option<ValueId>,
    h: usize,
    wd: usize,
) -> Result<DenoiseOutputs> {
    let (d, top) = (cfg.dim(), Scope::default());
    let hs = b.shape(hidden_states).clone();
    let batch = hs.dims()[0];
    let n = h * wd;
    if hs.dims() != [batch, cfg.in_channels, h, wd] {
        return Err(ModelError::Config {
            path: "transformer".into(),
            msg: format!(
                "hidden_states has shape {hs}, expected [B, {}, {h}, {wd}]",
                cfg.in_channels
            ),
        });
    }
    // Patch embed: 1×1 conv = a linear over channels of the token layout.
    let pe = top.pp("patch_embed");
    let tokens = b.transpose(
        &pe.name("to_tokens"),
        hidden_states,
        batch,
        cfg.in_channels,
        n,
        [batch, n, cfg.in_channels],
    )?;
    let x0 = linear(b, &pe.pp("proj"), tokens, cfg.in_channels, d, true)?;

    // AdaLayerNormSingle: sinusoid (cos first) -> linear_1 -> SiLU -> linear_2 = embedded_timestep;
    // t6 = linear(SiLU(embedded_timestep)).
    let te = top.pp("time_embed");
    let sin = b.timestep_embedding(&te.pp("emb").name("time_proj"), timestep, TIMESTEP_CHANNELS)?;
    let p = te.pp("emb").pp("timestep_embedder");
    let e = linear(b, &p.pp("linear_1"), sin, TIMESTEP_CHANNELS, d, true)?;
    let e = b.unary(&p.name("act"), e, UnaryFn::Silu)?;
    let embedded = linear(b, &p.pp("linear_2"), e, d, d, true)?;
    let e = b.unary(&te.name("silu"), embedded, UnaryFn::Silu)?;
    let t6 = linear(b, &te.pp("linear"), e, d, 6 * d, true)?;

    let mut x = x0;
    let mut blocks = Vec::with_capacity(cfg.num_layers);
    for (i, kv) in cross_kv.iter().enumerate() {
        x = block(
            b,
            cfg,
            &top.pp("transformer_blocks").pp(i),
            x,
            t6,
            kv,
            mask,
            h,
            wd,
        )?;
        blocks.push(x);
    }

    // Output head: shift (row 0), scale (row 1) of scale_shift_table[2, D] + embedded_timestep
    // (no SiLU), read by the norm itself.
    let table = b.weight(&top.name("scale_shift_table"), [2, d])?;
    let no = top.pp("norm_out");
    let norm_out = b.ada_layernorm(no.path(), x, embedded, table, 1, 0, cfg.norm_eps)?;
    let out = linear(
        b,
        &top.pp("proj_out"),
        norm_out,
        d,
        cfg.out_channels(),
        true,
    )?;
    let output = b.transpose(
        &top.name("unpatchify"),
        out,
        batch,
        n,
        cfg.out_channels(),
        [batch, cfg.out_channels(), h, wd],
    )?;
    Ok(DenoiseOutputs {
        output,
        patch_embed: x0,
        t6,
        embedded_timestep: embedded,
        blocks,
        norm_out,
    })
}

/// The caption graph's input: the prompt embeddings [B, L, caption_channels].
pub const ENCODER_HIDDEN_STATES: &str = "encoder_hidden_states";
/// The step graph's inputs: the latents [B, in, h, w] and the timesteps [B].
pub const HIDDEN_STATES: &str = "hidden_states";
pub const TIMESTEP: &str = "timestep";
/// The step graph's output: the velocity [B, out, h, w].
pub const VELOCITY: OutputName = OutputName("velocity");

/// The names under which the caption graph outputs block `i`'s cross-attention K and V, and the
/// step graph reads them as inputs.
pub fn cross_kv_names(i: usize) -> (String, String) {
    (format!("cross_kv.{i}.k"), format!("cross_kv.{i}.v"))
}

/// The caption path graph on prompt embeddings of `shape`: every block's K/V as the outputs
/// named by [`cross_kv_names`].
pub fn caption_graph(cfg: &SanaConfig, shape: &Shape) -> Result<Graph> {
    let mut b = GraphBuilder::new();
    b.batch_invariant();
    let enc = b.input(ENCODER_HIDDEN_STATES, shape.clone())?;
    let (_, kv) = caption_path(&mut b, cfg, enc)?;
    for (i, p) in kv.iter().enumerate() {
        let (k, v) = cross_kv_names(i);
        b.output(&k, p.k)?;
        b.output(&v, p.v)?;
    }
    Ok(b.finish())
}

/// One transformer call on [batch, in, h, w] reading the caption path's K/V as inputs of the
/// shapes in `kv` (the caption graph's outputs): inputs [`HIDDEN_STATES`], [`TIMESTEP`] and the
/// K/V, output [`VELOCITY`]. OpenUni's prompt mask is all ones, the same as no mask.
pub fn step_graph(
    cfg: &SanaConfig,
    kv: &HashMap<String, Shape>,
    batch: usize,
    h: usize,
    w: usize,
) -> Result<Graph> {
    let mut b = GraphBuilder::new();
    b.batch_invariant();
    let x = b.input(HIDDEN_STATES, [batch, cfg.in_channels, h, w])?;
    let t = b.input(TIMESTEP, [batch])?;
    let mut kv_inputs = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let mut input = |name: String| -> Result<ValueId> {
            let shape = kv.get(&name).ok_or_else(|| {
                ModelError::Invalid(format!(
                    "the step graph needs the caption path's `{name}`, which is missing"
                ))
            })?;
            Ok(b.input(&name, shape.clone())?)
        };
        let (kn, vn) = cross_kv_names(i);
        kv_inputs.push(CrossKv {
            k: input(kn)?,
            v: input(vn)?,
        });
    }
    let o = denoise(&mut b, cfg, x, t, &kv_inputs, None, h, w)?;
    b.mark(VELOCITY, o.output)?;
    Ok(b.finish())
}

#[allow(clippy::too_many_arguments)]
fn block(
    b: &mut GraphBuilder,
    cfg: &SanaConfig,
    s: &Scope,
    x: ValueId,
    t6: ValueId,
    kv: &CrossKv,
    mask: Option<ValueId>,
    h: usize,
    wd: usize,
) -> Result<ValueId> {
    let d = cfg.dim();
    // The modulation rows of table + t6 (adaLN-single), read by the norms and gated residuals
    // themselves (the [B, 6, D] table is never stored).
    let table = b.weight(&s.name("scale_shift_table"), [6, d])?;
    let (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) = (0, 1, 2, 3, 4, 5);

    // 1. Linear self-attention on the modulated norm, gated residual.
    let a = b.ada_layernorm(
        &s.name("norm1"),
        x,
        t6,
        table,
        scale_msa,
        shift_msa,
        cfg.norm_eps,
    )?;
    let a1 = s.pp("attn1");
    let a = linear_self_attention(b, cfg, &a1, a)?;
    let x = b.ada_gated_add(&a1.name("residual"), x, t6, table, gate_msa, a)?;

    // 2. Cross-attention from the un-normalised x, plain residual.
    let inner = cfg.num_cross_attention_heads * cfg.cross_attention_head_dim;
    let a2 = s.pp("attn2");
    let mut q = linear(b, &a2.pp("to_q"), x, d, inner, true)?;
    if cfg.qk_norm() {
        q = rms_norm(b, &a2.pp("norm_q"), q, inner, QK_NORM_EPS)?;
    }
    let hd = cfg.cross_attention_head_dim;
    let heads = cfg.num_cross_attention_heads;
    let o = b.attention(
        &a2.name("attn"),
        q,
        kv.k,
        kv.v,
        mask,
        heads,
        heads,
        hd,
        false,
        (hd as f32).powf(-0.5),
    )?;
    // The output projection adds the residual x in the GEMM (C input, beta = 1).
    let x = linear_residual(b, &a2.pp("to_out").pp(0), o, inner, d, true, x)?;

    // 3. Mix-FFN (GLUMBConv) on the modulated norm, gated residual.
    let a = b.ada_layernorm(
        &s.name("norm2"),
        x,
        t6,
        table,
        scale_mlp,
        shift_mlp,
        cfg.norm_eps,
    )?;
    let ff = s.pp("ff");
    let f = glumb_conv(b, &ff, a, d, cfg.ffn_hidden(), d, h, wd)?;
    Ok(b.ada_gated_add(&ff.name("residual"), x, t6, table, gate_mlp, f)?)
}

fn linear_self_attention(
    b: &mut GraphBuilder,
    cfg: &SanaConfig,
    s: &Scope,
    x: ValueId,
) -> Result<ValueId> {
    let d = cfg.dim();
    let bias = cfg.attention_bias;
    // q, k, v as one GEMM: the three weights' rows interleaved per head at load time
    // (openuni_tensor::derived), so the output is per head (q_h | k_h | v_h), the layout the
    // packed linear attention reads: x is read once, and one launch instead of three.
    //
    // SANA1.5 (qk_norm): diffusers applies RMSNorm across all heads to q and k, before the head
    // split and the ReLU: q̂_n = (q_n ⊙ w) / r_n with r_n = sqrt(mean(q_n²) + eps) > 0 per token.
    // What cancels, and what does not (docs/models.md, "SANA1.5's q norm"):
    // - w does NOT cancel: relu(q ⊙ w) weights each channel of the dot products with the keys
    //   (and for w_i < 0 it is not relu(q)·w_i at all). It is folded into to_q instead: row i of
    //   the weight (and bias) times w_i, once at load (derived `scale_rows`, nested in the
    //   interleave), so the GEMM computes q ⊙ w exactly as the norm's product does.
    // - 1/r_n does cancel: r_n > 0, so relu(q̂_n) = relu(q_n ⊙ w) / r_n, and per head the output
    //   num / (den + 1e-15) becomes (num / r_n) / (den / r_n + 1e-15) = num / (den + r_n·1e-15):
    //   the same up to where the 1e-15 sits. den = Σ_m relu(k_m)·relu(q̂_n) is either 0 (then num
    //   is 0 too and both give 0) or a sum of positive products, against which r_n·1e-15 is below
    //   f32 resolution unless den < ~1e-8·r_n. So the q norm node is dropped.
    // - The k norm's 1/s_m is per key token: it weights the keys' contributions to the state
    //   and does not cancel. The attention applies it (and its weight) as it reads the raw k
    //   (`Op::PackedLinearAttention`'s `key_norm`), so the normalised keys are never stored.
    let hd = cfg.attention_head_dim;
    let qk_norm = cfg.qk_norm();
    let part = |leaf: &str| -> Vec<String> {
        let q = s.pp("to_q").name(leaf);
        let q = if qk_norm {
            derived::scaled_rows_name(&q, &s.pp("norm_q").name("weight"))
        } else {
            q
        };
        vec![q, s.pp("to_k").name(leaf), s.pp("to_v").name(leaf)]
    };
    let w = b.weight(
        &derived::interleaved_rows_name(&part("weight"), hd),
        [3 * d, d],
    )?;
    let bs = if bias {
        Some(b.weight(&derived::interleaved_rows_name(&part("bias"), hd), [3 * d])?)
    } else {
        None
    };
    let qkv = b.linear(&s.name("to_qkv"), x, w, bs)?;
    let o = if qk_norm {
        let wk = b.weight(&s.pp("norm_k").name("weight"), [d])?;
        b.packed_linear_attention_key_norm(
            &s.name("linear_attention"),
            qkv,
            cfg.num_attention_heads,
            hd,
            wk,
            QK_NORM_EPS,
        )?
    } else {
        b.packed_linear_attention(
            &s.name("linear_attention"),
            qkv,
            cfg.num_attention_heads,
            hd,
        )?
    };
    // The fp16 ±65504 clip diffusers applies here only matters for fp16 storage, which this
    // engine does not use (f32 reference, bf16 CUDA).
    linear(b, &s.pp("to_out").pp(0), o, d, d, true)
}
