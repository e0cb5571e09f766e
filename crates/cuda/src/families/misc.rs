//! Small ops (`kernels/misc.cu`): adaLN-single's modulation table and its chunks, the timestep
//! sinusoid, SwiGLU, token slices, gathers and concatenation, a ViT's class token + position
//! embedding (composed of the copy and modulation-table kernels), and the pipeline's ends: the
//! token-embedding gather, the initial noise drawn from seeds, the uint8 quantization of the image
//! and the non-finite flag.
//!
//! Chunk, GatherTokens and Concat are strided 2-D copies (Chunk: one launch; GatherTokens: one per
//! gathered range; Concat: one per input, into its column range of the output). The timestep
//! embedding reads a small frequency table computed here exactly as the CPU twin computes it
//! (`openuni_cpu::ops::timestep_embedding`) and uploaded once per executor ([`Ctx::constant`]).

use openuni_graph::{Node, Op, ValueId};
use openuni_tensor::DType;

use super::{i32_arg, stride_grid, vec_width, Ctx, Launch, STRIDE_THREADS};
use crate::device::KArg;
use crate::error::Result;

fn launch(ctx: &Ctx, kernel: String, items: usize, args: Vec<KArg>) -> Launch {
    Launch {
        kernel,
        grid: stride_grid(ctx.dev.sm_count(), items),
        block: (STRIDE_THREADS, 1, 1),
        smem: 0,
        args,
    }
}

/// `dst[r·dst_stride + i] = src[r·src_stride + i]` for r < rows, i < cols (in elements).
fn copy(
    ctx: &Ctx,
    s: &str,
    src: u64,
    dst: u64,
    rows: usize,
    cols: usize,
    src_stride: usize,
    dst_stride: usize,
) -> Launch {
    let v = vec_width(ctx.dtype);
    launch(
        ctx,
        format!("strided_copy_{s}"),
        rows * cols.div_ceil(v),
        vec![
            KArg::Ptr(src),
            KArg::Ptr(dst),
            KArg::I64(rows as i64),
            KArg::I64(cols as i64),
            KArg::I64(src_stride as i64),
            KArg::I64(dst_stride as i64),
        ],
    )
}

/// diffusers' `Timesteps` frequencies `exp(-ln(10000)·i/half)`, rounded to f32 at each step as the
/// CPU twin (and PyTorch) computes them.
pub fn timestep_frequencies(half: usize) -> Vec<f32> {
    let ln = -(10000f64.ln() as f32);
    (0..half)
        .map(|i| (ln * i as f32 / half as f32).exp())
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn resolve(ctx: &Ctx, node: &Node) -> Result<Vec<Launch>> {
    let p = ctx.ptr;
    let g = ctx.graph;
    let s = ctx.suffix()?;
    let es = ctx.dtype.size_in_bytes();
    let y = p(node.output);
    let out = g.shape(node.output);
    let n = out.numel();
    if n == 0 {
        return Ok(vec![]);
    }
    let dims = |id: ValueId| g.shape(id).dims().to_vec();
    Ok(match &node.op {
        Op::ModulationTable { t, table } => {
            let d = out.dims();
            let (k, c) = (d[1], d[2]);
            let per_row = g.shape(*t).last() == k * c;
            vec![launch(
                ctx,
                format!("modulation_table_{s}"),
                n,
                vec![
                    KArg::Ptr(p(*t)),
                    KArg::Ptr(p(*table)),
                    KArg::Ptr(y),
                    KArg::I64(n as i64),
                    i32_arg("modulation_table k·C", k * c)?,
                    i32_arg("modulation_table C", c)?,
                    KArg::I32(per_row as i32),
                ],
            )]
        }
        Op::Chunk { x, index } => {
            let d = dims(*x);
            let (b, k, c) = (d[0], d[1], d[2]);
            vec![copy(
                ctx,
                s,
                p(*x) + (index * c * es) as u64,
                y,
                b,
                c,
                k * c,
                c,
            )]
        }
        Op::SliceTokens { x, start, len } => {
            let d = dims(*x);
            let (b, t, c) = (d[0], d[1], d[2]);
            vec![copy(
                ctx,
                s,
                p(*x) + (start * c * es) as u64,
                y,
                b,
                len * c,
                t * c,
                len * c,
            )]
        }
        Op::GatherTokens { x, starts, len } => {
            let c = g.shape(*x).last();
            starts
                .iter()
                .enumerate()
                .map(|(i, &st)| {
                    copy(
                        ctx,
                        s,
                        p(*x) + (st * c * es) as u64,
                        y + (i * len * c * es) as u64,
                        1,
                        len * c,
                        len * c,
                        len * c,
                    )
                })
                .collect()
        }
        Op::Concat { xs } => {
            let (rows, total) = (out.rows(), out.last());
            let mut at = 0;
            let mut v = vec![];
            for &x in xs {
                let w = g.shape(x).last();
                if w > 0 {
                    v.push(copy(ctx, s, p(x), y + (at * es) as u64, rows, w, w, total));
                }
                at += w;
            }
            v
        }
        Op::ClassPosEmbed { x, cls, pos } => {
            // Three launches of existing kernels: the class token into row 0 of every sample (a
            // copy with source stride 0), the patch tokens into rows 1.., then the position table
            // added in place (modulation_table: out[b, j, i] = table[j, i] + out[b, j, i]), so
            // each value is rounded once, as PyTorch's `cat` then `+`.
            let d = out.dims();
            let (b, rows, c) = (d[0], d[1], d[2]);
            vec![
                copy(ctx, s, p(*cls), y, b, c, 0, rows * c),
                copy(
                    ctx,
                    s,
                    p(*x),
                    y + (c * es) as u64,
                    b,
                    (rows - 1) * c,
                    (rows - 1) * c,
                    rows * c,
                ),
                launch(
                    ctx,
                    format!("modulation_table_{s}"),
                    n,
                    vec![
                        KArg::Ptr(y),
                        KArg::Ptr(p(*pos)),
                        KArg::Ptr(y),
                        KArg::I64(n as i64),
                        i32_arg("class_pos_embed tokens·C", rows * c)?,
                        i32_arg("class_pos_embed C", c)?,
                        KArg::I32(1),
                    ],
                ),
            ]
        }
        Op::TimestepEmbedding { t, dim } => {
            let (batch, half) = (g.shape(*t).dims()[0], dim / 2);
            let freq = ctx.constant(
                &format!("timestep_embedding.freq.{half}"),
                &f32_bytes(&timestep_frequencies(half)),
            )?;
            // bf16 cannot hold most timesteps above 256 (999 -> 1000): read the input's f32 copy
            // when there is one (graph inputs), else the bf16 value a node computed.
            let (kernel, tp) = match (ctx.f32_ptr)(*t) {
                Some(t32) => (format!("timestep_embedding_{s}"), t32),
                None if ctx.dtype == DType::BF16 => {
                    ("timestep_embedding_bf16_tbf16".to_string(), p(*t))
                }
                None => unreachable!("f32 storage always has an f32 copy"),
            };
            vec![launch(
                ctx,
                kernel,
                batch * half,
                vec![
                    KArg::Ptr(tp),
                    KArg::Ptr(freq),
                    KArg::Ptr(y),
                    i32_arg("timestep batch", batch)?,
                    i32_arg("timestep half dim", half)?,
                ],
            )]
        }
        Op::SwiGlu { gate, up } => {
            let v = vec_width(ctx.dtype);
            vec![launch(
                ctx,
                format!("swiglu_{s}"),
                n.div_ceil(v),
                vec![
                    KArg::Ptr(p(*gate)),
                    KArg::Ptr(p(*up)),
                    KArg::Ptr(y),
                    KArg::I64(n as i64),
                ],
            )]
        }
        Op::EmbeddingGather { ids, table, extra } => {
            let d = out.last();
            let tokens = g.shape(*ids).numel();
            // Token ids above 256 do not survive bf16: read the input's f32 copy.
            let ids32 = (ctx.f32_ptr)(*ids).ok_or_else(|| crate::error::CudaError::Invalid {
                what: "embedding_gather".into(),
                msg: format!(
                    "its ids must be a graph input (an f32 copy exists only for those), got {}",
                    node.name
                ),
            })?;
            let (v, e) = (
                g.shape(*table).dims()[0],
                extra.map_or(0, |x| g.shape(x).dims()[0]),
            );
            vec![launch(
                ctx,
                format!("embedding_gather_{s}"),
                n,
                vec![
                    KArg::Ptr(ids32),
                    KArg::Ptr(p(*table)),
                    KArg::Ptr(extra.map_or(0, p)),
                    KArg::Ptr(y),
                    KArg::I64(tokens as i64),
                    i32_arg("embedding_gather D", d)?,
                    KArg::I64(v as i64),
                    KArg::I64(e as i64),
                ],
            )]
        }
        // The coefficients are read in f32 (the input's staging copy under bf16): a graph input.
        Op::GuidedX0 {
            velocity,
            sample,
            coeffs,
        } => {
            let k = (ctx.f32_ptr)(*coeffs).ok_or_else(|| crate::error::CudaError::Invalid {
                what: "guided_x0".into(),
                msg: "its coeffs must be a graph input (read in f32)".into(),
            })?;
            vec![launch(
                ctx,
                format!("guided_x0_{s}"),
                n,
                vec![
                    KArg::Ptr(p(*velocity)),
                    KArg::Ptr(p(*sample)),
                    KArg::Ptr(k),
                    KArg::Ptr(y),
                    KArg::I64(n as i64),
                ],
            )]
        }
        Op::DpmSolverUpdate {
            sample,
            x0,
            prev_x0,
            coeffs,
        } => {
            let k = (ctx.f32_ptr)(*coeffs).ok_or_else(|| crate::error::CudaError::Invalid {
                what: "dpm_solver_update".into(),
                msg: "its coeffs must be a graph input (read in f32)".into(),
            })?;
            vec![launch(
                ctx,
                format!("dpm_solver_update_{s}"),
                n,
                vec![
                    KArg::Ptr(p(*sample)),
                    KArg::Ptr(p(*x0)),
                    KArg::Ptr(p(*prev_x0)),
                    KArg::Ptr(k),
                    KArg::Ptr(y),
                    KArg::I64(n as i64),
                ],
            )]
        }
        // The seeds are read in f32 (a limb above 256 does not survive bf16): a graph input.
        Op::GaussianNoise { seeds, per_seed } => {
            let sp = (ctx.f32_ptr)(*seeds).ok_or_else(|| crate::error::CudaError::Invalid {
                what: "gaussian_noise".into(),
                msg: format!(
                    "its seeds must be a graph input (read in f32), got {}",
                    node.name
                ),
            })?;
            let n_seeds = g.shape(*seeds).dims()[0];
            if n == 0 {
                vec![]
            } else {
                vec![launch(
                    ctx,
                    format!("gaussian_noise_{s}"),
                    n_seeds * per_seed.div_ceil(4),
                    vec![
                        KArg::Ptr(sp),
                        KArg::Ptr(y),
                        KArg::I64(n_seeds as i64),
                        KArg::I64(*per_seed as i64),
                    ],
                )]
            }
        }
        Op::DivScalar { x, divisor } => vec![launch(
            ctx,
            format!("div_scalar_{s}"),
            n,
            vec![
                KArg::Ptr(p(*x)),
                KArg::Ptr(y),
                KArg::F32(*divisor),
                KArg::I64(n as i64),
            ],
        )],
        Op::QuantizeU8 { x } => {
            let d = dims(*x);
            vec![launch(
                ctx,
                format!("quantize_u8_{s}"),
                n,
                vec![
                    KArg::Ptr(p(*x)),
                    KArg::Ptr(y),
                    i32_arg("quantize_u8 batch", d[0])?,
                    KArg::I64((d[2] * d[3]) as i64),
                ],
            )]
        }
        Op::AnyNonFinite { x } => {
            // A zeroed flag shared by every such node (the finish launch sets it back to zero).
            let flag = ctx.workspace("any_nonfinite.flag", 4)?;
            let xn = g.shape(*x).numel();
            let mut v = vec![];
            if xn > 0 {
                v.push(launch(
                    ctx,
                    format!("any_nonfinite_{s}"),
                    xn,
                    vec![KArg::Ptr(p(*x)), KArg::I64(xn as i64), KArg::Ptr(flag)],
                ));
            }
            v.push(Launch {
                kernel: format!("any_nonfinite_finish_{s}"),
                grid: (1, 1, 1),
                block: (32, 1, 1),
                smem: 0,
                args: vec![KArg::Ptr(flag), KArg::Ptr(y)],
            });
            v
        }
        _ => unreachable!("misc::resolve called for {}", node.op.name()),
    })
}
