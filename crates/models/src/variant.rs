//! The one table of OpenUni variants: what `b-512`, `l-512`, `l-1024` and the built-in `tiny`
//! model are. `generate` and `serve` find a published variant's weights from its repositories,
//! `bench` builds any variant with random weights from its configs, and the tiny model is written
//! to disk from its configs. Facts and sources: docs/models.md.

use serde_json::{json, Value};

use crate::connector::ConnectorConfig;

/// The repository of the OpenUni checkpoints (meta-queries, connector, projector, and for
/// stage-2 files the fine-tuned transformer).
pub const CHECKPOINT_REPO: &str = "wusize/openuni";

/// Denoising steps when none are asked for: OpenUni's inference scripts use 20 for every
/// variant, so this is one constant rather than a column of the table.
pub const DEFAULT_STEPS: usize = 20;

/// Where a published variant's weights come from (Hugging Face repositories).
pub struct Published {
    /// The InternVL3 folder whose language model is the LLM.
    pub mllm_repo: &'static str,
    /// The SANA diffusers pipeline (its `transformer/`, and `vae/` when the VAE repo is absent).
    pub transformer_repo: &'static str,
    pub vae_repo: &'static str,
    /// The checkpoint file name in `CHECKPOINT_REPO` without the `_<dataset>.pth` suffix.
    pub checkpoint_stem: &'static str,
}

/// One variant. The configs are the published models' (for the real variants) as JSON in the
/// upstream layouts, so that they parse through the same readers as a downloaded folder.
pub struct Variant {
    pub name: &'static str,
    /// None for the built-in tiny model, which the program writes itself.
    pub published: Option<Published>,
    /// The Qwen2 language model's `config.json`.
    pub llm: fn() -> Value,
    pub connector: fn() -> ConnectorConfig,
    /// Learned meta-query tokens appended to the prompt.
    pub num_queries: usize,
    /// The SANA transformer's `config.json`.
    pub transformer: fn() -> Value,
    /// The DC-AE's `config.json`.
    pub vae: fn() -> Value,
    /// Default image side in pixels.
    pub size: usize,
}

pub const B_512: Variant = Variant {
    name: "b-512",
    published: Some(Published {
        mllm_repo: "OpenGVLab/InternVL3-1B",
        transformer_repo: "Efficient-Large-Model/Sana_600M_512px_diffusers",
        vae_repo: "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers",
        checkpoint_stem: "openuni_b_internvl3_1b_sana_0_6b_512_hf",
    }),
    llm: || qwen2(896, 4864, 24, 14),
    connector: || connector(896, 3072, 14, 6),
    num_queries: 256,
    transformer: || sana(36, 28, 16, 72, 16, None),
    vae: dcae_f32c32,
    size: 512,
};

pub const L_512: Variant = Variant {
    name: "l-512",
    published: Some(Published {
        mllm_repo: "OpenGVLab/InternVL3-2B",
        transformer_repo: "Efficient-Large-Model/Sana_1600M_512px_diffusers",
        vae_repo: "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers",
        checkpoint_stem: "openuni_l_internvl3_2b_sana_1_6b_512_hf",
    }),
    llm: || qwen2(1536, 8960, 28, 12),
    connector: || connector(1536, 8960, 24, 6),
    num_queries: 256,
    transformer: || sana(70, 20, 20, 112, 16, None),
    vae: dcae_f32c32,
    size: 512,
};

pub const L_1024: Variant = Variant {
    name: "l-1024",
    published: Some(Published {
        mllm_repo: "OpenGVLab/InternVL3-2B",
        transformer_repo: "Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers",
        vae_repo: "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers",
        checkpoint_stem: "openuni_l_internvl3_2b_sana_1_6b_1024_hf",
    }),
    llm: || qwen2(1536, 8960, 28, 12),
    connector: || connector(1536, 8960, 24, 6),
    num_queries: 256,
    transformer: || sana(70, 20, 20, 112, 32, Some("rms_norm_across_heads")),
    vae: dcae_f32c32,
    size: 1024,
};

/// The built-in tiny model: the real structure at toy widths (see the program's `tiny_model`).
pub const TINY: Variant = Variant {
    name: "tiny",
    published: None,
    llm: || {
        json!({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 328,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
            "tie_word_embeddings": false
        })
    },
    connector: || connector(64, 128, 4, 2),
    num_queries: 16,
    transformer: || {
        json!({
            "_class_name": "SanaTransformer2DModel", "in_channels": 32, "out_channels": 32,
            "num_attention_heads": 2, "attention_head_dim": 32, "num_layers": 2,
            "num_cross_attention_heads": 2, "cross_attention_head_dim": 32, "cross_attention_dim": 64,
            "caption_channels": 48, "mlp_ratio": 2.5, "attention_bias": false, "sample_size": 8,
            "patch_size": 1, "norm_elementwise_affine": false, "norm_eps": 1e-6,
            "interpolation_scale": null, "qk_norm": null
        })
    },
    vae: || {
        json!({
            "_class_name": "AutoencoderDC", "latent_channels": 32, "attention_head_dim": 8,
            "decoder_block_out_channels": [8, 8, 16, 16, 32, 64],
            "decoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock", "EfficientViTBlock"],
            "decoder_layers_per_block": [1, 1, 1, 1, 1, 1],
            "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
            "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu", "decoder_in_shortcut": true,
            "decoder_conv_act_fn": "relu", "upsample_block_type": "interpolate", "scaling_factor": 0.41407
        })
    },
    size: 256,
};

/// Every variant, the published ones first.
pub const VARIANTS: [&Variant; 4] = [&B_512, &L_512, &L_1024, &TINY];

/// A published variant by name (`generate`, `serve`: the tiny model is their fallback, not a
/// choice), or an error listing the names.
pub fn published(name: &str) -> Result<&'static Variant, String> {
    find(name, |v| v.published.is_some())
}

/// Any variant by name, the tiny one included (`bench`), or an error listing the names.
pub fn any(name: &str) -> Result<&'static Variant, String> {
    find(name, |_| true)
}

fn find(name: &str, keep: fn(&Variant) -> bool) -> Result<&'static Variant, String> {
    let mut names = VARIANTS.iter().copied().filter(|v| keep(v));
    names.clone().find(|v| v.name == name).ok_or_else(|| {
        format!(
            "--variant `{name}` is not one of {}",
            names
                .by_ref()
                .map(|v| v.name)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// The vision side of InternVL3-1B and -2B (InternViT-300M-448px-V2.5, the same for both, spec
/// internvl3.md §2.4) as an original-layout InternVL config.json around an LLM of width
/// `llm_hidden`: what `bench --chat --vit-tiles` builds with random weights, and what
/// `bench --write-configs` hands tools/bench_torch_chat.py as vit.json.
pub fn internvl3_vision(llm_hidden: usize) -> Value {
    json!({
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": "internvl2_5",
        "downsample_ratio": 0.5, "ps_version": "v2", "select_layer": -1, "force_image_size": 448,
        "vision_config": {
            "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
            "image_size": 448, "patch_size": 14, "num_channels": 3, "norm_type": "layer_norm",
            "layer_norm_eps": 1e-6, "qkv_bias": true, "qk_normalization": false, "hidden_act": "gelu"
        },
        "llm_config": {"hidden_size": llm_hidden},
    })
}

/// A published Qwen2 LLM's config (InternVL3-1B: Qwen2.5-0.5B width; InternVL3-2B: Qwen2.5-1.5B).
fn qwen2(hidden: usize, inter: usize, layers: usize, heads: usize) -> Value {
    json!({
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": 2, "vocab_size": 151674,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "rope_scaling": {"type": "dynamic", "factor": 2.0}, "tie_word_embeddings": false
    })
}

/// OpenUni's connector: the LLM's width, six SigLIP-style encoder layers.
fn connector(hidden: usize, inter: usize, heads: usize, layers: usize) -> ConnectorConfig {
    ConnectorConfig {
        hidden_size: hidden,
        intermediate_size: inter,
        num_attention_heads: heads,
        num_hidden_layers: layers,
        layer_norm_eps: 1e-6,
        hidden_act: "gelu_pytorch_tanh".into(),
    }
}

/// A published SANA transformer's config (32-channel latents, head dim 32, Gemma-2's 2304-wide captions).
fn sana(
    heads: usize,
    layers: usize,
    cross_heads: usize,
    cross_hd: usize,
    sample: usize,
    qk_norm: Option<&str>,
) -> Value {
    json!({
        "in_channels": 32, "out_channels": 32, "num_attention_heads": heads, "attention_head_dim": 32,
        "num_layers": layers, "num_cross_attention_heads": cross_heads, "cross_attention_head_dim": cross_hd,
        "cross_attention_dim": heads * 32, "caption_channels": 2304, "mlp_ratio": 2.5, "attention_bias": false,
        "patch_size": 1, "norm_elementwise_affine": false, "norm_eps": 1e-6, "sample_size": sample, "qk_norm": qk_norm
    })
}

/// DC-AE f32c32 (SANA 1.1), the VAE of every published variant.
fn dcae_f32c32() -> Value {
    json!({
        "latent_channels": 32, "attention_head_dim": 32,
        "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
        "decoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock", "EfficientViTBlock"],
        "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
        "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
        "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu", "upsample_block_type": "interpolate",
        "scaling_factor": 0.41407
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_errors_list_them() {
        for (i, a) in VARIANTS.iter().enumerate() {
            assert!(
                VARIANTS[i + 1..].iter().all(|b| b.name != a.name),
                "{} twice",
                a.name
            );
        }
        assert_eq!(published("l-1024").unwrap().name, "l-1024");
        assert_eq!(
            published("tiny").err().unwrap(),
            "--variant `tiny` is not one of b-512, l-512, l-1024"
        );
        assert_eq!(
            any("xl").err().unwrap(),
            "--variant `xl` is not one of b-512, l-512, l-1024, tiny"
        );
    }

    #[test]
    fn connector_width_is_the_llm_width() {
        for v in VARIANTS {
            assert_eq!(
                (v.connector)().hidden_size,
                (v.llm)()["hidden_size"].as_u64().unwrap() as usize,
                "{}",
                v.name
            );
        }
    }
}
