//! ReLU linear attention (`kernels/linear_attention.cu`): SANA's `Op::LinearAttention` and DC-AE's
//! `Op::PackedLinearAttention`, two launches per node; `Op::MultiscaleLinearAttention`, two per
//! scale (each scale's groups read in place and written into their columns of the output).
//!
//! 1. `linear_attention_state_<dtype>_hd<HD>`, grid (chunks, heads, B): each CTA reduces one chunk
//!    of tokens of one head to its f32 state (KV, HD×HD, and the key sum). With one chunk per head
//!    it writes the head's state directly; with several, each CTA writes a partial state and the
//!    last CTA of the head (an atomic counter per head) sums the partials in chunk order, so the
//!    result is deterministic and no third launch or memset is needed.
//! 2. `linear_attention_apply_<dtype>_hd<HD>`, grid (⌈N/128⌉, heads, B): applies the state to q.
//!
//! k and v are read once by (1), q once by (2), the output written once; the only other traffic
//! is the states themselves (S = HD² + HD floats per head and chunk), which stay in L2.
//!
//! With a key norm (`PackedLinearAttention { key_norm }`, SANA1.5) a third launch comes first:
//! `linear_attention_key_rms_<dtype>`, one f32 1/rms per token over all heads' keys (a head's CTA
//! never sees the other heads' channels), which the state kernel applies with the norm weight as
//! it loads k. k is read twice (pre-pass, state) instead of read, written normalised and read
//! again by a separate RMSNorm.
//!
//! Scratch: the states and partial states live in one workspace and the per-head counters in
//! another ([`Ctx::workspace`], keys `linear_attention.states` / `.counters`), each shared by
//! every linear-attention node of an executor: nodes run one after another on one stream, and
//! the counters are back at zero when a node's launches end.

use openuni_graph::{Node, Op};
use openuni_tensor::DType;

use super::{i32_arg, suffix, Ctx, Launch};
use crate::device::KArg;
use crate::error::{CudaError, Result};

/// Head dims with compiled kernels (template specializations in kernels/linear_attention.cu).
pub const HEAD_DIMS: [usize; 4] = [2, 8, 16, 32];

/// Threads per CTA of both kernels (`LA_THREADS`).
const THREADS: u32 = 128;
/// Tokens per shared-memory tile of the state kernels (`LA_STATE_TILE`): chunk lengths are
/// multiples of it.
const STATE_TILE: usize = 64;
/// Tokens per CTA of the apply kernels (`LA_APPLY_TILE`).
const APPLY_TILE: usize = 128;
/// Fewest tokens per state CTA when a head is split into chunks: at head dim 32 in bf16 a chunk
/// of 256 tokens reads 32 KiB of k and v and writes a 4.1 KiB partial state.
const MIN_CHUNK: usize = 256;
/// State CTAs per SM that the chunking aims for.
const CTAS_PER_SM: usize = 4;

/// The shape of one linear attention and where its heads sit in memory: element (b, n, head h,
/// channel i) of q, k and v is at `(b·tokens + n)·row_stride + h·head_stride + i`; the output is
/// [batch, tokens, heads·head_dim] in rows of `out_row_stride` values (head h at column h·head_dim
/// of the row: a multi-scale attention writes each scale's heads into a column range of a wider
/// output, [`Dims::in_columns`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub batch: usize,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub row_stride: usize,
    pub head_stride: usize,
    pub out_row_stride: usize,
}

impl Dims {
    /// SANA's layout: q, k, v are three [B, N, heads·head_dim] tensors.
    pub fn separate(batch: usize, tokens: usize, heads: usize, head_dim: usize) -> Dims {
        Dims {
            batch,
            tokens,
            heads,
            head_dim,
            row_stride: heads * head_dim,
            head_stride: head_dim,
            out_row_stride: heads * head_dim,
        }
    }

    /// DC-AE's layout: one [B, N, groups·3·head_dim] tensor, group g = (q | k | v).
    pub fn packed(batch: usize, tokens: usize, groups: usize, head_dim: usize) -> Dims {
        Dims {
            batch,
            tokens,
            heads: groups,
            head_dim,
            row_stride: groups * 3 * head_dim,
            head_stride: 3 * head_dim,
            out_row_stride: groups * head_dim,
        }
    }

    /// The same attention writing into output rows of `out_row_stride` values (the caller
    /// offsets the output pointer to the first column of its range).
    pub fn in_columns(self, out_row_stride: usize) -> Dims {
        Dims {
            out_row_stride,
            ..self
        }
    }

    /// f32 values of one head's state: KV (head_dim²) and the key sum (head_dim).
    pub fn state_floats(&self) -> usize {
        self.head_dim * self.head_dim + self.head_dim
    }
}

/// Device addresses of one call (q, k, v may point into the same tensor).
#[derive(Clone, Copy, Debug)]
pub struct Pointers {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub out: u64,
    /// The keys' RMSNorm across all heads, applied as the state kernel loads k.
    pub key_norm: Option<KeyNormPointers>,
}

/// The key norm's weight (heads·head_dim, storage dtype), its epsilon, and a workspace of one f32
/// per token (`batch·tokens·4` bytes) for the pre-pass's 1/rms.
#[derive(Clone, Copy, Debug)]
pub struct KeyNormPointers {
    pub weight: u64,
    pub rstd: u64,
    pub eps: f32,
}

/// Token rows per CTA of the key-norm pre-pass (one warp each).
const KEY_RMS_ROWS: usize = THREADS as usize / 32;

/// The state kernel's split of each head's tokens: `(chunks, chunk_len)`, chunk_len a multiple of
/// 64 and chunks·chunk_len ≥ tokens with no empty chunk. Enough CTAs to give every SM a few
/// (`CTAS_PER_SM`), but no chunk shorter than `MIN_CHUNK` tokens, so that partial states stay a
/// small share of the traffic; with many heads (large batches) each head is one chunk.
pub fn chunking(sm_count: u32, d: &Dims) -> (usize, usize) {
    let heads = (d.batch * d.heads).max(1);
    let most = d.tokens.div_ceil(MIN_CHUNK).max(1);
    let want = (CTAS_PER_SM * sm_count.max(1) as usize).div_ceil(heads);
    let chunks = want.clamp(1, most);
    let len = (d.tokens.div_ceil(chunks).div_ceil(STATE_TILE) * STATE_TILE).max(STATE_TILE);
    (d.tokens.div_ceil(len).max(1), len)
}

/// Bytes of the two workspaces: `(states, counters)`. The states workspace holds the f32 states
/// [B·heads][S], then (only with several chunks, 256-byte aligned) the f32 partial states
/// [B·heads][chunks][S]; the counters workspace holds a u32 per head (only used with several
/// chunks) and must be zero before the launches, which leave it at zero. The two are separate so
/// that nodes of other shapes sharing them never find state data where they expect a counter.
pub fn workspace_bytes(d: &Dims, chunks: usize) -> (usize, usize) {
    let heads = d.batch * d.heads;
    let states = partial_offset(d)
        + if chunks > 1 {
            heads * chunks * d.state_floats() * 4
        } else {
            0
        };
    (states.max(256), (heads * 4).max(256))
}

/// Byte offset of the partial states in the states workspace.
fn partial_offset(d: &Dims) -> usize {
    (d.batch * d.heads * d.state_floats() * 4).div_ceil(256) * 256
}

fn check_grid(what: &str, v: usize) -> Result<u32> {
    if v > 65535 {
        return Err(CudaError::Invalid {
            what: "linear attention".into(),
            msg: format!("{what} {v} exceeds the grid's 65535"),
        });
    }
    Ok(v as u32)
}

/// The two launches of one linear attention. `states` and `counters` are workspaces of the sizes
/// [`workspace_bytes`] gives for `chunking(sm_count, d).0` chunks, the counters zero-filled. No
/// launches when there are no tokens.
pub fn launches(
    dtype: DType,
    sm_count: u32,
    d: &Dims,
    p: Pointers,
    states: u64,
    counters: u64,
) -> Result<Vec<Launch>> {
    let hd = d.head_dim;
    if !HEAD_DIMS.contains(&hd) {
        return Err(CudaError::Invalid {
            what: "linear attention".into(),
            msg: format!(
                "head_dim {hd} has no kernel: kernels/linear_attention.cu is compiled for head dims {HEAD_DIMS:?} \
                 (add a template specialization and its entry points there)"
            ),
        });
    }
    let s = suffix(dtype)?;
    if d.tokens == 0 || d.batch == 0 || d.heads == 0 {
        return Ok(vec![]);
    }
    let (chunks, chunk_len) = chunking(sm_count, d);
    let (state, partial) = (states, states + partial_offset(d) as u64);
    let heads = check_grid("heads", d.heads)?;
    let batch = check_grid("batch", d.batch)?;
    let n = i32_arg("linear attention tokens", d.tokens)?;
    let rs = i32_arg("linear attention row stride", d.row_stride)?;
    let hs = i32_arg("linear attention head stride", d.head_stride)?;
    if d.out_row_stride < d.heads * hd {
        return Err(CudaError::Invalid {
            what: "linear attention".into(),
            msg: format!(
                "output row stride {} is less than heads·head_dim = {}",
                d.out_row_stride,
                d.heads * hd
            ),
        });
    }
    let ors = i32_arg("linear attention output row stride", d.out_row_stride)?;
    // Row offsets inside the kernels are 64-bit; the products below only need to fit i64.
    let chunk_arg = i32_arg("linear attention chunk length", chunk_len)?;
    let mut all = vec![];
    if let Some(kn) = p.key_norm {
        let rows = d.batch * d.tokens;
        all.push(Launch {
            kernel: format!("linear_attention_key_rms_{s}"),
            grid: (
                check_grid_x("key norm rows", rows.div_ceil(KEY_RMS_ROWS))?,
                1,
                1,
            ),
            block: (THREADS, 1, 1),
            smem: 0,
            args: vec![
                KArg::Ptr(p.k),
                KArg::Ptr(kn.rstd),
                KArg::I64(rows as i64),
                i32_arg("linear attention heads", d.heads)?,
                i32_arg("linear attention head dim", hd)?,
                rs,
                hs,
                KArg::F32(kn.eps),
            ],
        });
    }
    let (key_w, key_rstd) = p.key_norm.map_or((0, 0), |kn| (kn.weight, kn.rstd));
    all.extend([
        Launch {
            kernel: format!("linear_attention_state_{s}_hd{hd}"),
            grid: (chunks as u32, heads, batch),
            block: (THREADS, 1, 1),
            smem: 0,
            args: vec![
                KArg::Ptr(p.k),
                KArg::Ptr(p.v),
                KArg::Ptr(partial),
                KArg::Ptr(state),
                KArg::Ptr(counters),
                n,
                rs,
                hs,
                chunk_arg,
                KArg::I32(chunks as i32),
                KArg::Ptr(key_w),
                KArg::Ptr(key_rstd),
            ],
        },
        Launch {
            kernel: format!("linear_attention_apply_{s}_hd{hd}"),
            grid: (d.tokens.div_ceil(APPLY_TILE) as u32, heads, batch),
            block: (THREADS, 1, 1),
            smem: 0,
            args: vec![
                KArg::Ptr(p.q),
                KArg::Ptr(state),
                KArg::Ptr(p.out),
                n,
                rs,
                hs,
                ors,
            ],
        },
    ]);
    Ok(all)
}

fn check_grid_x(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v)
        .ok()
        .filter(|&v| v <= i32::MAX as u32)
        .ok_or_else(|| CudaError::Invalid {
            what: "linear attention".into(),
            msg: format!("{what}: {v} CTAs exceed the grid's x limit"),
        })
}

pub fn resolve(ctx: &Ctx, node: &Node) -> Result<Vec<Launch>> {
    let p = ctx.ptr;
    let out = ctx.graph.shape(node.output).dims();
    let (batch, tokens) = (out[0], out[1]);
    let es = ctx.dtype.size_in_bytes() as u64;
    let packed = |x: u64, hd: usize| Pointers {
        q: x,
        k: x + (hd as u64) * es,
        v: x + 2 * (hd as u64) * es,
        out: 0,
        key_norm: None,
    };
    let calls: Vec<(Dims, Pointers)> = match &node.op {
        Op::LinearAttention {
            q,
            k,
            v,
            heads,
            head_dim,
        } => {
            vec![(
                Dims::separate(batch, tokens, *heads, *head_dim),
                Pointers {
                    q: p(*q),
                    k: p(*k),
                    v: p(*v),
                    out: p(node.output),
                    key_norm: None,
                },
            )]
        }
        Op::PackedLinearAttention {
            qkv,
            groups,
            head_dim,
            key_norm,
        } => {
            let key_norm = match key_norm {
                None => None,
                Some(n) => Some(KeyNormPointers {
                    weight: p(n.weight),
                    rstd: ctx
                        .workspace("linear_attention.key_rstd", (batch * tokens * 4).max(256))?,
                    eps: n.eps,
                }),
            };
            vec![(
                Dims::packed(batch, tokens, *groups, *head_dim),
                Pointers {
                    out: p(node.output),
                    key_norm,
                    ..packed(p(*qkv), *head_dim)
                },
            )]
        }
        // One packed attention per scale, each writing its groups' columns of the output.
        Op::MultiscaleLinearAttention { scales, head_dim } => {
            let (hd, ors) = (*head_dim, ctx.graph.shape(node.output).last());
            let mut col = 0;
            let mut calls = vec![];
            for &x in scales {
                let groups = ctx.graph.shape(x).last() / (3 * hd);
                let out = p(node.output) + (col * hd) as u64 * es;
                calls.push((
                    Dims::packed(batch, tokens, groups, hd).in_columns(ors),
                    Pointers {
                        out,
                        ..packed(p(x), hd)
                    },
                ));
                col += groups;
            }
            calls
        }
        _ => unreachable!("linear_attention::resolve called for {}", node.op.name()),
    };
    let mut all = vec![];
    for (d, ptrs) in calls {
        all.extend(resolve_one(ctx, &d, ptrs)?);
    }
    Ok(all)
}

/// The launches of one attention, with its workspaces.
fn resolve_one(ctx: &Ctx, d: &Dims, ptrs: Pointers) -> Result<Vec<Launch>> {
    let d = *d;
    if !HEAD_DIMS.contains(&d.head_dim) {
        // The same message as `launches`, before any workspace is allocated.
        return launches(ctx.dtype, ctx.dev.sm_count(), &d, ptrs, 0, 0);
    }
    let (chunks, _) = chunking(ctx.dev.sm_count(), &d);
    let (state_bytes, counter_bytes) = workspace_bytes(&d, chunks);
    let states = ctx.workspace("linear_attention.states", state_bytes)?;
    let counters = ctx.workspace("linear_attention.counters", counter_bytes)?;
    launches(ctx.dtype, ctx.dev.sm_count(), &d, ptrs, states, counters)
}
