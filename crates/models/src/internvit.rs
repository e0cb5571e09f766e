//! InternVL's vision side: InternViT (the `vision_model` of InternVL3, InternViT-300M-448px-V2.5),
//! pixel shuffle v2 and the `mlp1` projector, op by op as docs/internvl3-vision.md and
//! docs/internvl3-vision.md describe them. Pixel values [T, 3, S, S] (every tile of every image as
//! one batch) -> image embeddings [T, (S/p · r)², D] for the LLM's `<IMG_CONTEXT>` slots.
//!
//! Graph weight names are the original InternVL checkpoint's keys (`vision_model.*`, `mlp1.*`);
//! [`VitWeights`] serves them from either that layout or transformers' native InternVL layout
//! (`model.vision_tower.*`, `model.multi_modal_projector.*`), so one graph serves both.

use openuni_graph::{GraphBuilder, OutputName, UnaryFn, ValueId};
use openuni_tensor::{HostTensor, Shape, TensorSource};
use serde_json::Value;

use crate::nn::{layer_norm, linear, rms_norm, Scope};
use crate::{ModelError, Result};

/// `mlp1.0` is a default `nn.LayerNorm(4·C)`: eps 1e-5 (not the ViT's 1e-6).
const MLP1_NORM_EPS: f32 = 1e-5;

/// The ViT's norm layers: LayerNorm with bias (InternViT-300M) or RMSNorm (InternViT-6B).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormType {
    LayerNorm,
    RmsNorm,
}

/// The vision tower and projector settings of an InternVL config.json, from either layout.
#[derive(Clone, Debug, PartialEq)]
pub struct InternVlVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    /// Tile side in pixels (448).
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f32,
    pub norm_type: NormType,
    pub qkv_bias: bool,
    /// RMSNorm over all heads' q and k (InternViT-6B; false for 300M).
    pub qk_normalization: bool,
    /// Which layer's output feeds the projector, Python-style (-1 = the last).
    pub select_layer: i64,
    /// The LLM width D (the projector's output).
    pub llm_hidden_size: usize,
}

impl InternVlVisionConfig {
    /// Reads the vision part of a whole InternVL config.json: the original layout
    /// (`vision_config` + `llm_config`, `downsample_ratio`, `ps_version`, `select_layer`,
    /// `force_image_size`) or transformers' (`vision_config` + `text_config`,
    /// `vision_feature_layer`, ...). Settings this port does not implement are refused by name.
    pub fn from_json(cfg: &Value, origin: &str) -> Result<InternVlVisionConfig> {
        let err = |msg: String| ModelError::Config {
            path: origin.into(),
            msg,
        };
        let vc = cfg.get("vision_config").filter(|v| v.is_object()).ok_or_else(|| {
            err("no `vision_config`: this model has no vision tower (an InternVL config.json is needed for images)".into())
        })?;
        let native = cfg.get("text_config").is_some() && cfg.get("llm_config").is_none();
        let llm = cfg
            .get(if native { "text_config" } else { "llm_config" })
            .ok_or_else(|| {
                err(
                    "no `llm_config` (or `text_config`): the projector's output width is unknown"
                        .into(),
                )
            })?;
        let uint = |v: &Value, section: &str, key: &str| -> Result<usize> {
            // transformers writes image_size / patch_size as [h, w]: square only.
            let one = |x: &Value| x.as_u64().map(|u| u as usize);
            match v.get(key) {
                Some(Value::Array(a)) if a.len() == 2 && one(&a[0]).is_some() && a[0] == a[1] => {
                    Ok(one(&a[0]).unwrap())
                }
                Some(x) if one(x).is_some() => Ok(one(x).unwrap()),
                Some(x) => Err(err(format!(
                    "{section}.{key} is {x}, expected a positive integer (or a square [n, n])"
                ))),
                None => Err(err(format!("{section}.{key} is missing"))),
            }
        };
        let get_str = |v: &Value, key: &str, default: &str| {
            v.get(key)
                .and_then(|x| x.as_str())
                .unwrap_or(default)
                .to_string()
        };
        let get_bool = |v: &Value, key: &str, default: bool| {
            v.get(key).and_then(|x| x.as_bool()).unwrap_or(default)
        };

        let hidden_size = uint(vc, "vision_config", "hidden_size")?;
        let num_attention_heads = uint(vc, "vision_config", "num_attention_heads")?;
        let patch_size = uint(vc, "vision_config", "patch_size")?;
        let mut image_size = uint(vc, "vision_config", "image_size")?;
        if !native {
            // Upstream: `image_size = config.force_image_size or vision_config.image_size`.
            if let Some(f) = cfg.get("force_image_size").and_then(|f| f.as_u64()) {
                image_size = f as usize;
            }
        }
        let norm_type = match get_str(vc, "norm_type", "layer_norm").as_str() {
            "layer_norm" => NormType::LayerNorm,
            "rms_norm" => NormType::RmsNorm,
            other => {
                return Err(err(format!(
                    "vision_config.norm_type `{other}` is not supported (layer_norm or rms_norm)"
                )))
            }
        };
        let act = get_str(vc, "hidden_act", "gelu");
        if act != "gelu" {
            return Err(err(format!("vision_config.hidden_act `{act}` is not supported (InternViT uses gelu, exact erf)")));
        }
        let ratio = cfg
            .get("downsample_ratio")
            .and_then(|r| r.as_f64())
            .unwrap_or(0.5);
        if ratio != 0.5 {
            return Err(err(format!(
                "downsample_ratio {ratio} is not supported (pixel shuffle with scale 0.5 is)"
            )));
        }
        let (select_layer, qkv_bias, qk_normalization) = if native {
            if !get_bool(vc, "use_mean_pooling", true) {
                return Err(err(
                    "vision_config.use_mean_pooling=false (a final ViT LayerNorm) is not supported"
                        .into(),
                ));
            }
            if !get_bool(vc, "use_absolute_position_embeddings", true) {
                return Err(err(
                    "vision_config.use_absolute_position_embeddings=false is not supported".into(),
                ));
            }
            let strategy = get_str(cfg, "vision_feature_select_strategy", "default");
            if strategy != "default" {
                return Err(err(format!("vision_feature_select_strategy `{strategy}` is not supported (default drops the class token)")));
            }
            let pact = get_str(cfg, "projector_hidden_act", "gelu");
            if pact != "gelu" {
                return Err(err(format!(
                    "projector_hidden_act `{pact}` is not supported (gelu)"
                )));
            }
            let layer = cfg
                .get("vision_feature_layer")
                .cloned()
                .unwrap_or(Value::from(-1));
            let layer = layer.as_i64().ok_or_else(|| {
                err(format!(
                    "vision_feature_layer {layer} is not supported (one layer index)"
                ))
            })?;
            (
                layer,
                get_bool(vc, "attention_bias", false),
                get_bool(vc, "use_qk_norm", false),
            )
        } else {
            let ps = get_str(cfg, "ps_version", "v1");
            if ps != "v2" {
                return Err(err(format!("ps_version `{ps}` is not supported (InternVL3 uses v2; v1 transposes the token grid)")));
            }
            (
                cfg.get("select_layer")
                    .and_then(|s| s.as_i64())
                    .unwrap_or(-1),
                get_bool(vc, "qkv_bias", true),
                get_bool(vc, "qk_normalization", false),
            )
        };
        let c = InternVlVisionConfig {
            hidden_size,
            intermediate_size: uint(vc, "vision_config", "intermediate_size")?,
            num_hidden_layers: uint(vc, "vision_config", "num_hidden_layers")?,
            num_attention_heads,
            num_channels: vc.get("num_channels").and_then(|n| n.as_u64()).unwrap_or(3) as usize,
            image_size,
            patch_size,
            layer_norm_eps: vc
                .get("layer_norm_eps")
                .and_then(|e| e.as_f64())
                .unwrap_or(1e-6) as f32,
            norm_type,
            qkv_bias,
            qk_normalization,
            select_layer,
            llm_hidden_size: uint(
                llm,
                if native { "text_config" } else { "llm_config" },
                "hidden_size",
            )?,
        };
        c.validate(origin)?;
        Ok(c)
    }

    fn validate(&self, origin: &str) -> Result<()> {
        let err = |msg: String| {
            Err(ModelError::Config {
                path: origin.into(),
                msg,
            })
        };
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return err(format!(
                "vision_config: hidden_size {} is not a multiple of {} heads",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.patch_size == 0
            || !self.image_size.is_multiple_of(self.patch_size)
            || !self.grid().is_multiple_of(2)
        {
            return err(format!(
                "image size {} with patch size {} does not give an even patch grid (pixel shuffle merges 2×2 patches)",
                self.image_size, self.patch_size
            ));
        }
        let layers = self.num_hidden_layers as i64;
        if self.select_layer >= 0 || self.select_layer < -layers {
            return err(format!(
                "select_layer {} is not supported (-1 .. -{layers}: a layer counted from the last)",
                self.select_layer
            ));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Patches per side (32 at 448/14).
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Image tokens per tile after pixel shuffle (256 at 448/14).
    pub fn tokens_per_tile(&self) -> usize {
        (self.grid() / 2) * (self.grid() / 2)
    }

    /// How many encoder layers run: the selected layer's output feeds the projector.
    pub fn layers_used(&self) -> usize {
        (self.num_hidden_layers as i64 + 1 + self.select_layer) as usize
    }
}

/// The name under which a graph outputs [`VitOutputs::vit_embeds`].
pub const VIT_EMBEDS: OutputName = OutputName("vit_embeds");

/// Outputs of [`build`].
pub struct VitOutputs {
    /// mlp1's output [T, tokens_per_tile, D].
    pub vit_embeds: ValueId,
    /// Each encoder layer's output [T, grid² + 1, C] (`vision_model.encoder.layers.{i}`).
    pub layers: Vec<ValueId>,
}

fn norm(
    b: &mut GraphBuilder,
    s: &Scope,
    x: ValueId,
    c: usize,
    kind: NormType,
    eps: f32,
) -> Result<ValueId> {
    match kind {
        NormType::LayerNorm => layer_norm(b, s, x, c, eps),
        NormType::RmsNorm => rms_norm(b, s, x, c, eps),
    }
}

/// The graph from `pixel_values` [T, channels, S, S] to the projector output, all tiles as one batch.
pub fn build(
    b: &mut GraphBuilder,
    cfg: &InternVlVisionConfig,
    pixel_values: ValueId,
) -> Result<VitOutputs> {
    let (s, g, c, ch) = (
        cfg.image_size,
        cfg.grid(),
        cfg.hidden_size,
        cfg.num_channels,
    );
    let ps = b.shape(pixel_values).clone();
    if ps.rank() != 4 || ps.dims()[1..] != [ch, s, s] {
        return Err(ModelError::Config {
            path: "pixel_values".into(),
            msg: format!("shape {ps}, expected [tiles, {ch}, {s}, {s}]"),
        });
    }
    let t = ps.dims()[0];
    let mut x = embeddings(b, cfg, pixel_values, t)?;
    let mut layers = vec![];
    for i in 0..cfg.layers_used() {
        x = encoder_layer(
            b,
            cfg,
            &Scope::new("vision_model").pp("encoder").pp("layers").pp(i),
            x,
        )?;
        layers.push(x);
    }
    // Drop the class token, pixel shuffle v2 (scale 0.5) and mlp1's LayerNorm(4C) as one op that
    // reads the ViT's output through the shuffle's index map (Op::PixelShuffleLayerNorm): token
    // (2·r + dy)·g + 2·q + dx becomes channels (2·dy + dx)·C of token r·g/2 + q, never stored.
    let d = cfg.llm_hidden_size;
    let mlp1 = Scope::new("mlp1");
    let ln = mlp1.pp(0);
    let (w, bias) = (
        b.weight(&ln.name("weight"), [4 * c])?,
        b.weight(&ln.name("bias"), [4 * c])?,
    );
    let x = b.pixel_shuffle_layernorm(&mlp1.name("0"), x, w, bias, MLP1_NORM_EPS, g, 1)?;
    // mlp1: (LayerNorm above) -> Linear -> GELU (erf) -> Linear.
    let x = linear(b, &mlp1.pp(1), x, 4 * c, d, true)?;
    let x = b.unary(&mlp1.name("2"), x, UnaryFn::GeluErf)?;
    let vit_embeds = linear(b, &mlp1.pp(3), x, d, d, true)?;
    Ok(VitOutputs { vit_embeds, layers })
}

/// Patch embedding (Conv2d k = stride = p as patchify + GEMM), class token, position embedding.
fn embeddings(
    b: &mut GraphBuilder,
    cfg: &InternVlVisionConfig,
    pixel_values: ValueId,
    t: usize,
) -> Result<ValueId> {
    let (s, p, g, c, ch) = (
        cfg.image_size,
        cfg.patch_size,
        cfg.grid(),
        cfg.hidden_size,
        cfg.num_channels,
    );
    // Patchify: (ch, py, ky, px, kx) -> (py, px, ch, ky, kx), the conv weight's (ch, ky, kx) order,
    // in three transposes: move ch last, then ky last, then kx last.
    let x = b.transpose(
        "patchify.channels",
        pixel_values,
        t,
        ch,
        s * s,
        [t, s * s, ch],
    )?;
    let x = b.transpose(
        "patchify.rows",
        x,
        t * g,
        p,
        g * p * ch,
        [t * g, g * p * ch, p],
    )?;
    let x = b.transpose(
        "patchify.cols",
        x,
        t * g * g,
        p,
        ch * p,
        [t, g * g, ch * p * p],
    )?;
    let e = Scope::new("vision_model").pp("embeddings");
    let x = linear(b, &e.pp("patch_embedding"), x, ch * p * p, c, true)?;
    let cls = b.weight(&e.name("class_embedding"), [c])?;
    let pos = b.weight(&e.name("position_embedding"), [g * g + 1, c])?;
    Ok(b.class_pos_embed(&e.name("add"), x, cls, pos)?)
}

/// One pre-norm block: `x + ls1 · attn(norm1(x))`, then `x + ls2 · mlp(norm2(x))`.
fn encoder_layer(
    b: &mut GraphBuilder,
    cfg: &InternVlVisionConfig,
    s: &Scope,
    x: ValueId,
) -> Result<ValueId> {
    let (c, heads, hd) = (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim());
    let h = norm(b, &s.pp("norm1"), x, c, cfg.norm_type, cfg.layer_norm_eps)?;
    // qkv as three GEMMs over row slices of the stored [3C, C] weight (see VitWeights).
    let (attn, mut qkv) = (s.pp("attn"), vec![]);
    for part in ["q", "k", "v"] {
        let fused = attn.pp("qkv");
        let w = b.weight(&fused.name(&format!("weight[{part}]")), [c, c])?;
        let bias = if cfg.qkv_bias {
            Some(b.weight(&fused.name(&format!("bias[{part}]")), [c])?)
        } else {
            None
        };
        qkv.push(b.linear(&attn.name(part), h, w, bias)?);
    }
    let (mut q, mut k, v) = (qkv[0], qkv[1], qkv[2]);
    if cfg.qk_normalization {
        // RMSNorm over all heads' channels together (upstream flattens the heads first).
        q = rms_norm(b, &attn.pp("q_norm"), q, c, cfg.layer_norm_eps)?;
        k = rms_norm(b, &attn.pp("k_norm"), k, c, cfg.layer_norm_eps)?;
    }
    let o = b.attention(
        &attn.name("core"),
        q,
        k,
        v,
        None,
        heads,
        heads,
        hd,
        false,
        (hd as f32).powf(-0.5),
    )?;
    let o = linear(b, &attn.pp("proj"), o, c, c, true)?;
    let ls1 = b.weight(&s.name("ls1"), [1, c])?;
    let x = b.gated_add(&s.name("residual1"), x, ls1, o)?;
    let h = norm(b, &s.pp("norm2"), x, c, cfg.norm_type, cfg.layer_norm_eps)?;
    let mlp = s.pp("mlp");
    let h = linear(b, &mlp.pp("fc1"), h, c, cfg.intermediate_size, true)?;
    let h = b.unary(&mlp.name("act"), h, UnaryFn::GeluErf)?;
    let h = linear(b, &mlp.pp("fc2"), h, cfg.intermediate_size, c, true)?;
    let ls2 = b.weight(&s.name("ls2"), [1, c])?;
    Ok(b.gated_add(&s.name("residual2"), x, ls2, h)?)
}

/// Where a checkpoint keeps the vision tower.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VitLayout {
    /// InternVL's own (remote-code) checkpoint: `vision_model.*`, `mlp1.*`.
    Original,
    /// transformers' InternVL: `{prefix}vision_tower.*`, `{prefix}multi_modal_projector.*`;
    /// prefix "model." (transformers 5) or "" (4.x saves).
    Native { prefix: &'static str },
}

impl VitLayout {
    /// Detects the layout from the checkpoint's keys; `None` when there is no vision tower.
    pub fn detect(source: &dyn TensorSource) -> Option<VitLayout> {
        if source.contains("vision_model.embeddings.patch_embedding.weight") {
            return Some(VitLayout::Original);
        }
        ["model.", ""]
            .into_iter()
            .find(|pre| {
                source.contains(
                    &Scope::new(pre)
                        .name("vision_tower.embeddings.patch_embeddings.projection.weight"),
                )
            })
            .map(|prefix| VitLayout::Native { prefix })
    }
}

/// Serves the graph's weight names (original keys; `…attn.qkv.{weight,bias}[q|k|v]` for the q, k
/// and v thirds) from a checkpoint in either layout: row slices of the fused qkv, the separate
/// q/k/v projections of transformers' layout, renamed keys, and the patch conv weight
/// [C, ch, p, p] viewed as the GEMM's [C, ch·p·p].
pub struct VitWeights<S: TensorSource> {
    pub inner: S,
    pub layout: VitLayout,
}

/// How a graph name maps onto a stored tensor.
struct Stored {
    key: String,
    /// Rows [i·n, (i+1)·n) of the stored tensor's first dim, for a third `i` of a fused qkv.
    third: Option<usize>,
}

impl<S: TensorSource> VitWeights<S> {
    fn stored(&self, name: &str) -> Stored {
        let (base, third) = match name.strip_suffix(']').and_then(|n| n.rsplit_once('[')) {
            Some((base, part)) => (base, ["q", "k", "v"].iter().position(|p| *p == part)),
            None => (name, None),
        };
        let VitLayout::Native { prefix } = &self.layout else {
            return Stored {
                key: base.to_string(),
                third,
            };
        };
        // transformers' conversion (convert_internvl_weights_to_hf.py), applied in reverse.
        let mut key = base
            .replace(
                "vision_model.embeddings.class_embedding",
                "vision_tower.embeddings.cls_token",
            )
            .replace(
                "vision_model.embeddings.position_embedding",
                "vision_tower.embeddings.position_embeddings",
            )
            .replace(
                "vision_model.embeddings.patch_embedding",
                "vision_tower.embeddings.patch_embeddings.projection",
            )
            .replace(
                "vision_model.encoder.layers.",
                "vision_tower.encoder.layer.",
            )
            .replace(".norm1.", ".layernorm_before.")
            .replace(".norm2.", ".layernorm_after.")
            .replace(".attn.proj.", ".attention.projection_layer.")
            .replace(".attn.q_norm.", ".attention.q_norm.")
            .replace(".attn.k_norm.", ".attention.k_norm.")
            .replace("mlp1.0.", "multi_modal_projector.layer_norm.")
            .replace("mlp1.1.", "multi_modal_projector.linear_1.")
            .replace("mlp1.3.", "multi_modal_projector.linear_2.");
        for (from, to) in [(".ls1", ".lambda_1"), (".ls2", ".lambda_2")] {
            if let Some(stem) = key.strip_suffix(from) {
                key = format!("{stem}{to}");
            }
        }
        if let Some(i) = third {
            let part = ["q", "k", "v"][i];
            key = key.replace(".attn.qkv.", &format!(".attention.{part}_proj."));
        }
        Stored {
            key: Scope::new(prefix).name(&key),
            third: None,
        }
    }
}

impl<S: TensorSource> TensorSource for VitWeights<S> {
    fn origin(&self) -> String {
        self.inner.origin()
    }

    fn shape_of(&self, name: &str) -> openuni_tensor::Result<Shape> {
        let st = self.stored(name);
        let s = self.inner.shape_of(&st.key)?;
        Ok(match st.third {
            Some(_) => {
                let mut d = s.dims().to_vec();
                d[0] /= 3;
                Shape::new(d)
            }
            None => s,
        })
    }

    fn tensor_f32(&self, name: &str, shape: &Shape) -> openuni_tensor::Result<HostTensor> {
        let st = self.stored(name);
        let found = self.inner.shape_of(&st.key)?;
        let mismatch = || openuni_tensor::Error::ShapeMismatch {
            path: self.inner.origin().into(),
            key: st.key.clone(),
            expected: match st.third {
                Some(_) => {
                    let mut d = shape.dims().to_vec();
                    d[0] *= 3;
                    Shape::new(d)
                }
                None => shape.clone(),
            },
            found: found.clone(),
        };
        if let Some(i) = st.third {
            // A third of the fused qkv: rows [i·n, (i+1)·n).
            if found.rank() == 0
                || found.dims()[0] != 3 * shape.dims()[0]
                || found.numel() != 3 * shape.numel()
            {
                return Err(mismatch());
            }
            let all = self.inner.tensor_f32(&st.key, &found)?.to_f32_vec();
            let n = shape.numel();
            return HostTensor::from_f32(shape.clone(), all[i * n..(i + 1) * n].to_vec());
        }
        if name.ends_with("patch_embedding.weight") {
            // The conv weight [C, ch, p, p] is the patch GEMM's [C, ch·p·p] (same memory order).
            if found.rank() != 4
                || shape.rank() != 2
                || found.dims()[0] != shape.dims()[0]
                || found.numel() != shape.numel()
            {
                return Err(mismatch());
            }
            let mut t = self.inner.tensor_f32(&st.key, &found)?;
            t.shape = shape.clone();
            return Ok(t);
        }
        self.inner.tensor_f32(&st.key, shape)
    }
}

/// Refuses a checkpoint whose position table is for another grid than the config's image size
/// (upstream would interpolate it bicubically; every InternVL3 tile is 448, where it is exact).
pub fn check_position_table(source: &dyn TensorSource, cfg: &InternVlVisionConfig) -> Result<()> {
    let w = VitWeights {
        inner: source,
        layout: VitLayout::detect(source).unwrap_or(VitLayout::Original),
    };
    let name = "vision_model.embeddings.position_embedding";
    let found = w.shape_of(name).map_err(|e| ModelError::Config {
        path: source.origin(),
        msg: e.to_string(),
    })?;
    let want = cfg.grid() * cfg.grid() + 1;
    let rows = if found.rank() >= 2 {
        found.dims()[found.rank() - 2]
    } else {
        0
    };
    if rows != want || found.last() != cfg.hidden_size {
        return Err(ModelError::Config {
            path: source.origin(),
            msg: format!(
                "position embedding has shape {found}, expected [1, {want}, {}] ({}×{} patches + class token at image size {}); \
                 other grids would need upstream's bicubic interpolation, which is not implemented",
                cfg.hidden_size,
                cfg.grid(),
                cfg.grid(),
                cfg.image_size
            ),
        });
    }
    Ok(())
}
