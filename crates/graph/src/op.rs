use crate::ValueId;

/// Pointwise functions. Each has one CPU twin (`openuni_cpu::ops`) and one CUDA kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryFn {
    Silu,
    /// GELU with the tanh approximation (PyTorch `gelu(approximate="tanh")`, "gelu_pytorch_tanh").
    GeluTanh,
    /// Exact GELU, 0.5 x (1 + erf(x / sqrt 2)).
    GeluErf,
    Relu,
}

impl UnaryFn {
    /// The activation names used in upstream configs.
    pub fn from_config_name(name: &str) -> Option<UnaryFn> {
        Some(match name {
            "silu" | "swish" => UnaryFn::Silu,
            "gelu_pytorch_tanh" | "gelu_tanh" | "gelu_new" => UnaryFn::GeluTanh,
            "gelu" => UnaryFn::GeluErf,
            "relu" => UnaryFn::Relu,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            UnaryFn::Silu => "silu",
            UnaryFn::GeluTanh => "gelu_tanh",
            UnaryFn::GeluErf => "gelu_erf",
            UnaryFn::Relu => "relu",
        }
    }
}

/// adaLN modulation `x * (1 + scale) + shift`, with `scale` and `shift` of shape [B, C] broadcast
/// over the tokens of a [B, N, C] input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Modulation {
    pub scale: ValueId,
    pub shift: ValueId,
}

/// An RMSNorm across all heads applied to the keys of a packed linear attention before its ReLU
/// (SANA1.5's `norm_k`): each token's k row, `groups·head_dim` channels gathered from the groups,
/// becomes `k · (1 / sqrt(mean(k²) + eps)) · weight` (`weight` [groups·head_dim], channel g·hd + i).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KeyNorm {
    pub weight: ValueId,
    pub eps: f32,
}

/// One node's computation. Every tensor is contiguous and row-major; "rows" are all leading
/// dimensions flattened, and norms/linears act on the last dimension.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// `y = x · wᵀ + bias`, with `w` [out, in] in PyTorch's nn.Linear layout.
    Linear {
        x: ValueId,
        w: ValueId,
        bias: Option<ValueId>,
    },
    /// `y = x / sqrt(mean(x²) + eps) · weight (+ bias)`; the bias form is DC-AE's channel RMSNorm.
    RmsNorm {
        x: ValueId,
        weight: ValueId,
        bias: Option<ValueId>,
        eps: f32,
    },
    /// `y = (x - mean) / sqrt(var + eps) (· weight + bias)`, then optionally modulated.
    LayerNorm {
        x: ValueId,
        weight: Option<ValueId>,
        bias: Option<ValueId>,
        eps: f32,
        modulation: Option<Modulation>,
    },
    Unary {
        x: ValueId,
        f: UnaryFn,
    },
    /// `a + b`, same shapes (residual add).
    Add {
        a: ValueId,
        b: ValueId,
    },
    /// `x + gate · y` with `gate` [B, C] broadcast over the tokens of [B, N, C] (adaLN gated residual),
    /// or `gate` [1, C] broadcast over every row (a ViT's per-channel layer scale).
    GatedAdd {
        x: ValueId,
        gate: ValueId,
        y: ValueId,
    },
    /// Softmax attention. `q` [B, N, heads·head_dim], `k`/`v` [B, M, kv_heads·head_dim] (GQA when
    /// kv_heads < heads), output [B, N, heads·head_dim]; softmax in f32 with `scale` on the logits.
    /// `key_mask` [B, M] (1 keep, 0 pad) adds −10000 to padded keys' logits, as diffusers does.
    /// `segments` (packed sequences; B = 1, N = M = Σ lengths): token t belongs to the segment
    /// that covers it, and a query sees only keys of its own segment (causally within it when
    /// `causal`), exactly as if each segment were its own batch row.
    /// `rope` = Some(theta): rotary position embedding ("rotate_half", whole head rotated,
    /// `inv_freq[i] = 1 / theta^(2i/head_dim)`, angles in f32 as transformers computes them)
    /// applied to q and k before the scores (N = M), at positions that restart from 0 at each
    /// segment start (no segments: position t for token t of every batch row).
    Attention {
        q: ValueId,
        k: ValueId,
        v: ValueId,
        key_mask: Option<ValueId>,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        causal: bool,
        scale: f32,
        segments: Option<Vec<usize>>,
        rope: Option<f32>,
    },
    /// SANA's ReLU linear attention over [B, N, heads·head_dim] q, k, v: per head,
    /// `out_n = Σ_m v_m (k_m·q_n) / (Σ_m k_m·q_n + 1e-15)` with ReLU on q and k, state in f32.
    LinearAttention {
        q: ValueId,
        k: ValueId,
        v: ValueId,
        heads: usize,
        head_dim: usize,
    },
    /// `out[b, j, :] = table[j, :] + t[b, j·C .. (j+1)·C]` for `t` [B, k·C], or `+ t[b, :]` for `t`
    /// [B, C] (broadcast over the k rows): adaLN-single's per-block (k = 6) and head (k = 2) tables.
    ModulationTable {
        t: ValueId,
        table: ValueId,
    },
    /// Row `index` of a [B, k, C] tensor: [B, C].
    Chunk {
        x: ValueId,
        index: usize,
    },
    /// The sinusoidal timestep embedding of diffusers' `Timesteps(dim, flip_sin_to_cos=True,
    /// downscale_freq_shift=0)`: `t` [B] -> [B, dim] = [cos(t·f_i), sin(t·f_i)], f_i = 10000^(−i/(dim/2)).
    TimestepEmbedding {
        t: ValueId,
        dim: usize,
    },
    /// [B, M, N] -> [B, N, M] (NCHW <-> token layouts; the output shape says how it is viewed).
    Transpose {
        x: ValueId,
        batch: usize,
        rows: usize,
        cols: usize,
    },
    /// Depthwise k×k convolution with zero padding k/2 and bias over tokens [B, h·w, C] laid out as
    /// an h×w grid (row-major); `weight` [C, 1, k, k].
    DepthwiseConv2d {
        x: ValueId,
        weight: ValueId,
        bias: Option<ValueId>,
        h: usize,
        w: usize,
        kernel: usize,
    },
    /// GLUMBConv's middle in one op: `DepthwiseConv2d` of the 2H-channel input, then the GLU with
    /// SiLU gate over the last dim, `[u | g]` (2H) -> `u · silu(g)` (H), so the 2H-wide conv output
    /// is never stored: [B, h·w, 2H] -> [B, h·w, H]. `silu_input`: the conv reads `silu(x)`
    /// (GLUMBConv's `conv_inverted` activation, applied as the kernel loads x, so the activated
    /// 2H-wide tensor is never stored either).
    DepthwiseConvGlu {
        x: ValueId,
        weight: ValueId,
        bias: Option<ValueId>,
        h: usize,
        w: usize,
        kernel: usize,
        silu_input: bool,
    },
    /// GLUMBConv from its input to the GLU in one op: `conv_inverted` (a 1×1 conv, i.e. `Linear`
    /// C -> 2H with `weight` [2H, C] and `bias`), then exactly `DepthwiseConvGlu` with
    /// `silu_input` and kernel 3 (`dw_weight` [2H, 1, 3, 3], `dw_bias`): [B, h·w, C] -> [B, h·w, H].
    /// The 2H-wide GEMM output is never stored (the CUDA kernel keeps its tile in shared memory).
    MixFfnInvertedGlu {
        x: ValueId,
        weight: ValueId,
        bias: Option<ValueId>,
        dw_weight: ValueId,
        dw_bias: Option<ValueId>,
        h: usize,
        w: usize,
    },
    /// DC-AE's multi-scale linear attention core: `qkv` [B, N, groups·3·head_dim] where group g is
    /// channels [3·hd·g, 3·hd·(g+1)) = (q | k | v) of that group; output [B, N, groups·head_dim]
    /// (channel g·hd + j). Same math as `LinearAttention` (diffusers' quadratic path for tiny
    /// inputs computes the same formula in another order). `key_norm`: the keys are RMS-normalised
    /// across all groups first (`RmsNorm` of the k columns, then this op), the norm applied by the
    /// attention as it reads k, so the normalised keys are never stored.
    PackedLinearAttention {
        qkv: ValueId,
        groups: usize,
        head_dim: usize,
        key_norm: Option<KeyNorm>,
    },
    /// k×k convolution, stride 1, zero padding k/2, over tokens [B, h·w, Cin] on an h×w grid:
    /// `weight` [Cout, Cin, k, k] -> [B, h·w, Cout], then SiLU when `silu` (fused into the
    /// CUDA kernels' epilogue, so the pre-activation tensor is never stored).
    Conv2d {
        x: ValueId,
        weight: ValueId,
        bias: Option<ValueId>,
        h: usize,
        w: usize,
        kernel: usize,
        silu: bool,
    },
    /// DC-AE's DCUpBlock2d (interpolate) as one op: `Conv2d` (3×3, `weight` [Cout, Cin, 3, 3],
    /// optional bias) over the nearest 2× upsampling of x on an h×w grid -> 2h×2w, plus DC-AE's
    /// upsample shortcut when `shortcut`: `pixel_shuffle(repeat_interleave(x, R, channel), 2)`
    /// with R = 4·Cout/Cin, `out[c, 2y+i, 2x+j] = x[(4c+2i+j)/R, y, x]` (the CPU twins
    /// `upsample2x` and `pixel_shuffle_shortcut`). Exactly that composition; a backend may
    /// compute the conv as four 2×2 convolutions on the low-resolution input, one per output
    /// pixel parity (2.25× fewer MACs, no upsampled tensor in memory).
    UpsampleConv2d {
        x: ValueId,
        weight: ValueId,
        bias: Option<ValueId>,
        h: usize,
        w: usize,
        shortcut: bool,
    },
    /// `repeat_interleave(x, repeats, channel)`: output channel c is input channel c / repeats.
    RepeatChannels {
        x: ValueId,
        repeats: usize,
    },
    /// A ViT's input tokens: the class token, then the patch tokens, plus the position table:
    /// `x` [B, N, C], `cls` [C], `pos` [N + 1, C] -> [B, N + 1, C] with row 0 = `cls + pos[0]` and
    /// row 1 + n = `x[n] + pos[1 + n]` (one rounding, as PyTorch's `cat` then `+`).
    ClassPosEmbed {
        x: ValueId,
        cls: ValueId,
        pos: ValueId,
    },
    /// Tokens [start, start + len) of every row of a [B, T, C] tensor.
    SliceTokens {
        x: ValueId,
        start: usize,
        len: usize,
    },
    /// Tokens [s, s + len) of a [1, T, C] tensor for each s in `starts`, stacked: [starts.len(), len, C]
    /// (the meta-query states of every sequence of a packed batch).
    GatherTokens {
        x: ValueId,
        starts: Vec<usize>,
        len: usize,
    },
    /// Concatenation along the last dim.
    Concat {
        xs: Vec<ValueId>,
    },
    /// Grouped 1×1 convolution (block-diagonal linear): `weight` [Cout, Cin/groups, 1, 1], no bias.
    GroupedLinear {
        x: ValueId,
        weight: ValueId,
        groups: usize,
    },
    /// SwiGLU of two same-shaped tensors: `silu(gate) · up` (Qwen2's MLP).
    SwiGlu {
        gate: ValueId,
        up: ValueId,
    },
    /// Decode-phase attention over a KV cache: one query row per sequence. `q` [B, heads·head_dim],
    /// `k_cache`/`v_cache` [B, kv_heads, max_len, head_dim], `positions` [B] (integer-valued f32:
    /// the position p_b of sequence b's new token, 0 <= p_b < max_len; values outside are clamped
    /// to that range, the caller checks them on the host). Query head h of sequence b attends keys
    /// [0, p_b] of KV head h / (heads / kv_heads) (GQA), softmax in f32 with `scale`; output
    /// [B, heads·head_dim]. `rope` = Some(theta): q is first rotated as `Attention`'s fused RoPE at
    /// position p_b (the keys were rotated when appended, [`Op::KvCacheAppend`]).
    /// Cache layout [B, kv_heads, max_len, head_dim]: the keys of one (sequence, KV head) are one
    /// contiguous run, so a chunk of keys is one contiguous block read once for all the query heads
    /// that share it.
    DecodeAttention {
        q: ValueId,
        k_cache: ValueId,
        v_cache: ValueId,
        positions: ValueId,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        scale: f32,
        rope: Option<f32>,
    },
    /// KV-cache append: the cache [B, kv_heads, max_len, head_dim] with row p_b of every (b, KV
    /// head) replaced by the new token's `x` [B, kv_heads·head_dim], rotated first when `rope` =
    /// Some(theta) (rotate_half at position p_b, as `Attention`'s fused RoPE: keys) or stored as
    /// is (values). `positions` as in [`Op::DecodeAttention`] (clamped to [0, max_len)). As a graph
    /// op the result is a new value (a backend copies the cache); a decoder that owns its cache
    /// buffers calls the backend's in-place launch (openuni_cuda::families::decode_attention).
    KvCacheAppend {
        cache: ValueId,
        x: ValueId,
        positions: ValueId,
        kv_heads: usize,
        head_dim: usize,
        rope: Option<f32>,
    },
    /// Rows of an embedding table by token id: `ids` [..] (integer-valued f32, exact below 2^24;
    /// a graph input, so a bf16 executor reads its f32 copy) -> [.., D] with the row of id i
    /// `table[i]` for i < V (`table` [V, D]) and `extra[i - V]` for V <= i < V + E (`extra`
    /// [E, D]: OpenUni's meta-queries, appended to every prompt as ids V..V+Q). The caller checks
    /// the ids on the host and names a bad one; an id outside [0, V + E) (or not an integer) gives
    /// a NaN row, never a read outside the tables.
    EmbeddingGather {
        ids: ValueId,
        table: ValueId,
        extra: Option<ValueId>,
    },
    /// A decoded image [B, 3, H, W] in nominal [-1, 1] -> uint8 pixel values [B, H, W, 3] (held
    /// as integer-valued numbers 0..=255, exact in bf16; a backend reads them back as bytes):
    /// `openuni_cpu::ops::quantize_u8`, the one definition of the rounding rule.
    QuantizeU8 {
        x: ValueId,
    },
    /// [1]: 1 if any value of `x` is NaN or ±Inf, else 0 (the pipeline's per-stage non-finite
    /// check, read back as one scalar instead of the tensor).
    AnyNonFinite {
        x: ValueId,
    },
    /// A prompt's keys or values laid out as KV-cache rows: `x` [B, T, kv_heads·head_dim] ->
    /// [B, kv_heads, T, head_dim], token t rotated at position t when `rope` = Some(theta) (keys,
    /// exactly as [`Op::KvCacheAppend`] rotates the token at p_b = t) or moved as is (values).
    /// Rows 0..T of one (sequence, KV head) are then one contiguous run, which a prefill copies
    /// on the device into rows 0..T of its slot of the decode step's cache state.
    KvCacheRows {
        x: ValueId,
        kv_heads: usize,
        head_dim: usize,
        rope: Option<f32>,
    },
    /// InternVL's pixel shuffle (v2, scale 0.5) read through its index map by the LayerNorm that
    /// follows it (mlp1's), so the shuffled tensor is never stored: `x` [B, skip + g·g, C], whose
    /// tokens after the first `skip` (the class token) lie on a g×g grid, g even ->
    /// [B, (g/2)², 4C]. Output row r·(g/2) + c gathers the 2×2 block's tokens
    /// `skip + (2r + dy)·g + 2c + dx` as channels `(2·dy + dx)·C + ch`, then LayerNorm over the
    /// 4C channels with `weight` and `bias` [4C].
    PixelShuffleLayerNorm {
        x: ValueId,
        weight: ValueId,
        bias: ValueId,
        eps: f32,
        grid: usize,
        skip: usize,
    },
    /// `residual + RmsNorm(x)` in one pass (DC-AE's `x + norm(block(x))`): the normalised tensor
    /// is never stored. Same math as `RmsNorm` then `Add { a: residual, b: norm }`.
    RmsNormResidual {
        x: ValueId,
        weight: ValueId,
        bias: Option<ValueId>,
        eps: f32,
        residual: ValueId,
    },
    /// DC-AE's output head in one op: `Conv2d(ReLU(RmsNorm(x, norm_weight, norm_bias, eps)))`
    /// (k×k, zero padding k/2, no SiLU) over tokens [B, h·w, Cin] -> [B, h·w, Cout], with the
    /// normalised, rectified tensor never stored. Meant for few output channels (conv_out: 3).
    RmsNormReluConv2d {
        x: ValueId,
        norm_weight: ValueId,
        norm_bias: Option<ValueId>,
        eps: f32,
        weight: ValueId,
        bias: Option<ValueId>,
        h: usize,
        w: usize,
        kernel: usize,
    },
    /// DC-AE's multi-scale linear attention core without the concat of its scales: exactly
    /// `PackedLinearAttention` of `Concat(scales)`, where each scale is a packed [B, N, gᵢ·3·hd]
    /// tensor (the projected qkv, then each aggregated branch) and the groups are numbered across
    /// the scales in order; output [B, N, (Σ gᵢ)·hd]. A backend reads each scale where it is and
    /// writes its groups into their column range of the output.
    MultiscaleLinearAttention {
        scales: Vec<ValueId>,
        head_dim: usize,
    },
    /// `residual + x · wᵀ + bias`: a `Linear` whose output is added to `residual` (same shape as
    /// the output) in the GEMM itself (cuBLASLt's C operand with beta = 1), so the residual add
    /// is not a pass of its own (SANA's cross-attention output projection).
    LinearResidual {
        x: ValueId,
        w: ValueId,
        bias: Option<ValueId>,
        residual: ValueId,
    },
    /// `LayerNorm` without affine of [B, N, C] `x`, modulated by adaLN-single's table read where it
    /// is made: `· (1 + m[scale]) + m[shift]` with `m[j] = table[j, :] + t[b, j·C..(j+1)·C]` (`t`
    /// [B, k·C], `table` [k, C]) or `table[j, :] + t[b, :]` (`t` [B, C]): row j of
    /// `ModulationTable { t, table }`, without storing that table or copying its rows out.
    AdaLayerNorm {
        x: ValueId,
        t: ValueId,
        table: ValueId,
        scale: usize,
        shift: usize,
        eps: f32,
    },
    /// `GatedAdd` with the gate read from the modulation table as [`Op::AdaLayerNorm`] reads it:
    /// `x + m[gate] · y`, `m[gate]` [B, C] broadcast over the tokens of [B, N, C].
    AdaGatedAdd {
        x: ValueId,
        t: ValueId,
        table: ValueId,
        gate: usize,
        y: ValueId,
    },
    /// Classifier-free guidance and the flow model's clean estimate in one pass, f32 arithmetic in
    /// this order (no fused multiply-add): `v = u + g·(c − u)`, `out = x − σ·v`, where `u` and `c`
    /// are the first and second halves of `velocity` (the transformer's [uncond; cond] rows, 2N
    /// rows) and `x` = `sample` (N rows). `coeffs` [SAMPLER_COEFFS] is a graph input (read as f32
    /// even with bf16 storage), indices [`coeff`]: g = GUIDANCE, σ = SIGMA. With σ = −Δt this is
    /// the Euler step `x + Δt·v` exactly (negation is exact).
    GuidedX0 {
        velocity: ValueId,
        sample: ValueId,
        coeffs: ValueId,
    },
    /// DPM-Solver++ (2M, midpoint) update of `sample` x with the clean estimate `x0` (d0) and the
    /// previous step's `prev_x0` (p), f32 arithmetic in this order (no fused multiply-add), by
    /// `coeffs[ORDER]`: 0, `out = d0` (Euler, whose step is `GuidedX0` already); 1, `out = ratio·x
    /// − c·d0`; 2, `out = (ratio·x − c·d0) − half_c·(inv_r0·(d0 − p))`. Coefficients computed on the
    /// host (`openuni_models::scheduler::Sampler::coefficients`), indices [`coeff`].
    DpmSolverUpdate {
        sample: ValueId,
        x0: ValueId,
        prev_x0: ValueId,
        coeffs: ValueId,
    },
    /// `x / divisor`, one IEEE f32 division (correctly rounded) per element, never a multiply by
    /// the reciprocal: the decoder's input `latents / scaling_factor` made on the device bit for
    /// bit as the host divides (`openuni_cpu::ops::div_scalar`, the one definition).
    DivScalar {
        x: ValueId,
        divisor: f32,
    },
    /// Standard-normal noise drawn where the graph runs: `per_seed` values for each row of
    /// `seeds` [N, seed::LIMBS] (a u64 seed as 16-bit limbs, [`seed`]), output [1, N·per_seed],
    /// row i's values first. Value j of a seed is Box–Muller of Philox4x32-10 (key = the seed,
    /// counter = j / 4) with our own f32 log and sin/cos written as explicit multiplies, adds
    /// and fused multiply-adds, so every device draws the same bits as the one definition
    /// (`openuni_cpu::ops::gaussian_noise`). `seeds` is a graph input (read as f32).
    GaussianNoise {
        seeds: ValueId,
        per_seed: usize,
    },
}

/// The layout of the `coeffs` input of [`Op::GuidedX0`] and [`Op::DpmSolverUpdate`]: one step's
/// sampler scalars, computed on the host in f32.
pub mod coeff {
    pub const GUIDANCE: usize = 0;
    pub const SIGMA: usize = 1;
    pub const RATIO: usize = 2;
    pub const C: usize = 3;
    pub const HALF_C: usize = 4;
    pub const INV_R0: usize = 5;
    /// 0: Euler (the update is the estimate), 1: first order, 2: second order.
    pub const ORDER: usize = 6;
}
/// Elements of the sampler's `coeffs` input ([`coeff`]).
pub const SAMPLER_COEFFS: usize = 7;

/// The `seeds` input of [`Op::GaussianNoise`]: a u64 seed as [`LIMBS`](seed::LIMBS) 16-bit
/// limbs, lowest first, each an integer-valued f32 (exact: graph inputs are f32 numbers).
pub mod seed {
    pub const LIMBS: usize = 4;

    /// `seed` as its limbs.
    pub fn limbs(seed: u64) -> [f32; LIMBS] {
        std::array::from_fn(|i| ((seed >> (16 * i)) & 0xFFFF) as f32)
    }

    /// The seed of `limbs` (at least [`LIMBS`] values): a limb is truncated to an integer and
    /// clamped to 0..=65535 (NaN reads as 0), the rule the kernel follows too.
    // max/min, not clamp: clamp keeps a NaN, max(NaN, 0) is 0 (as the kernel's fmaxf).
    #[allow(clippy::manual_clamp)]
    pub fn from_limbs(limbs: &[f32]) -> u64 {
        limbs[..LIMBS].iter().enumerate().fold(0, |s, (i, &v)| {
            s | (v.max(0.0).min(65535.0) as u64) << (16 * i)
        })
    }
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Linear { .. } => "linear",
            Op::RmsNorm { .. } => "rmsnorm",
            Op::LayerNorm { .. } => "layernorm",
            Op::Unary { f, .. } => f.name(),
            Op::Add { .. } => "add",
            Op::GatedAdd { .. } => "gated_add",
            Op::Attention { .. } => "attention",
            Op::LinearAttention { .. } => "linear_attention",
            Op::ModulationTable { .. } => "modulation_table",
            Op::Chunk { .. } => "chunk",
            Op::TimestepEmbedding { .. } => "timestep_embedding",
            Op::Transpose { .. } => "transpose",
            Op::DepthwiseConv2d { .. } => "depthwise_conv2d",
            Op::DepthwiseConvGlu { .. } => "depthwise_conv_glu",
            Op::MixFfnInvertedGlu { .. } => "mixffn_inverted_glu",
            Op::SwiGlu { .. } => "swiglu",
            Op::PackedLinearAttention { .. } => "packed_linear_attention",
            Op::Conv2d { .. } => "conv2d",
            Op::UpsampleConv2d { .. } => "upsample_conv2d",
            Op::RepeatChannels { .. } => "repeat_channels",
            Op::Concat { .. } => "concat",
            Op::ClassPosEmbed { .. } => "class_pos_embed",
            Op::SliceTokens { .. } => "slice_tokens",
            Op::GatherTokens { .. } => "gather_tokens",
            Op::GroupedLinear { .. } => "grouped_linear",
            Op::DecodeAttention { .. } => "decode_attention",
            Op::KvCacheAppend { .. } => "kv_cache_append",
            Op::EmbeddingGather { .. } => "embedding_gather",
            Op::QuantizeU8 { .. } => "quantize_u8",
            Op::AnyNonFinite { .. } => "any_nonfinite",
            Op::KvCacheRows { .. } => "kv_cache_rows",
            Op::PixelShuffleLayerNorm { .. } => "pixel_shuffle_layernorm",
            Op::RmsNormResidual { .. } => "rmsnorm_residual",
            Op::RmsNormReluConv2d { .. } => "rmsnorm_relu_conv2d",
            Op::MultiscaleLinearAttention { .. } => "multiscale_linear_attention",
            Op::LinearResidual { .. } => "linear_residual",
            Op::AdaLayerNorm { .. } => "ada_layernorm",
            Op::AdaGatedAdd { .. } => "ada_gated_add",
            Op::GuidedX0 { .. } => "guided_x0",
            Op::DpmSolverUpdate { .. } => "dpm_solver_update",
            Op::DivScalar { .. } => "div_scalar",
            Op::GaussianNoise { .. } => "gaussian_noise",
        }
    }

    /// The values this op reads, in a fixed order.
    pub fn inputs(&self) -> Vec<ValueId> {
        let mut v = vec![];
        match self {
            Op::Linear { x, w, bias } => {
                v.extend([*x, *w]);
                v.extend(bias);
            }
            Op::RmsNorm {
                x, weight, bias, ..
            } => {
                v.extend([*x, *weight]);
                v.extend(bias);
            }
            Op::LayerNorm {
                x,
                weight,
                bias,
                modulation,
                ..
            } => {
                v.push(*x);
                v.extend(weight);
                v.extend(bias);
                if let Some(m) = modulation {
                    v.extend([m.scale, m.shift]);
                }
            }
            Op::Unary { x, .. } => v.push(*x),
            Op::Add { a, b } => v.extend([*a, *b]),
            Op::GatedAdd { x, gate, y } => v.extend([*x, *gate, *y]),
            Op::Attention {
                q,
                k,
                v: vv,
                key_mask,
                ..
            } => {
                v.extend([*q, *k, *vv]);
                v.extend(key_mask);
            }
            Op::LinearAttention { q, k, v: vv, .. } => v.extend([*q, *k, *vv]),
            Op::PackedLinearAttention { qkv, key_norm, .. } => {
                v.push(*qkv);
                v.extend(key_norm.map(|n| n.weight));
            }
            Op::ModulationTable { t, table } => v.extend([*t, *table]),
            Op::Chunk { x, .. }
            | Op::TimestepEmbedding { t: x, .. }
            | Op::Transpose { x, .. }
            | Op::RepeatChannels { x, .. }
            | Op::SliceTokens { x, .. }
            | Op::GatherTokens { x, .. }
            | Op::QuantizeU8 { x }
            | Op::AnyNonFinite { x }
            | Op::DivScalar { x, .. }
            | Op::GaussianNoise { seeds: x, .. }
            | Op::KvCacheRows { x, .. } => v.push(*x),
            Op::EmbeddingGather { ids, table, extra } => {
                v.extend([*ids, *table]);
                v.extend(extra);
            }
            Op::GuidedX0 {
                velocity,
                sample,
                coeffs,
            } => v.extend([*velocity, *sample, *coeffs]),
            Op::DpmSolverUpdate {
                sample,
                x0,
                prev_x0,
                coeffs,
            } => v.extend([*sample, *x0, *prev_x0, *coeffs]),
            Op::Conv2d {
                x, weight, bias, ..
            }
            | Op::UpsampleConv2d {
                x, weight, bias, ..
            } => {
                v.extend([*x, *weight]);
                v.extend(bias);
            }
            Op::Concat { xs } => v.extend(xs),
            Op::ClassPosEmbed { x, cls, pos } => v.extend([*x, *cls, *pos]),
            Op::GroupedLinear { x, weight, .. } => v.extend([*x, *weight]),
            Op::SwiGlu { gate, up } => v.extend([*gate, *up]),
            Op::DecodeAttention {
                q,
                k_cache,
                v_cache,
                positions,
                ..
            } => v.extend([*q, *k_cache, *v_cache, *positions]),
            Op::KvCacheAppend {
                cache,
                x,
                positions,
                ..
            } => v.extend([*cache, *x, *positions]),
            Op::PixelShuffleLayerNorm {
                x, weight, bias, ..
            } => v.extend([*x, *weight, *bias]),
            Op::DepthwiseConv2d {
                x, weight, bias, ..
            }
            | Op::DepthwiseConvGlu {
                x, weight, bias, ..
            } => {
                v.extend([*x, *weight]);
                v.extend(bias);
            }
            Op::MixFfnInvertedGlu {
                x,
                weight,
                bias,
                dw_weight,
                dw_bias,
                ..
            } => {
                v.extend([*x, *weight]);
                v.extend(bias);
                v.push(*dw_weight);
                v.extend(dw_bias);
            }
            Op::RmsNormResidual {
                x,
                weight,
                bias,
                residual,
                ..
            } => {
                v.extend([*x, *weight]);
                v.extend(bias);
                v.push(*residual);
            }
            Op::RmsNormReluConv2d {
                x,
                norm_weight,
                norm_bias,
                weight,
                bias,
                ..
            } => {
                v.extend([*x, *norm_weight]);
                v.extend(norm_bias);
                v.push(*weight);
                v.extend(bias);
            }
            Op::MultiscaleLinearAttention { scales, .. } => v.extend(scales),
            Op::LinearResidual {
                x,
                w,
                bias,
                residual,
            } => {
                v.extend([*x, *w]);
                v.extend(bias);
                v.push(*residual);
            }
            Op::AdaLayerNorm { x, t, table, .. } => v.extend([*x, *t, *table]),
            Op::AdaGatedAdd { x, t, table, y, .. } => v.extend([*x, *t, *table, *y]),
        }
        v
    }
}
