//! Weights the graphs read in a layout made once at load time from stored tensors, named so that
//! any [`TensorSource`] serves them: the executors' weight caches load every weight through
//! [`tensor_f32`], which builds a derived weight from its stored parts (read with their own
//! names, so a missing or misshapen part is reported by its checkpoint key) and passes every
//! other name to the source unchanged.
//!
//! Two derivations exist:
//! - `interleave_rows[B](p0,p1,..)`: the rows of the parts taken in blocks of B rows, block i of
//!   every part in turn: out = [p0 rows 0..B | p1 rows 0..B | .. | p0 rows B..2B | ..]. SANA's q,
//!   k, v projections become one GEMM whose output is per head (q_h | k_h | v_h), the layout
//!   `Op::PackedLinearAttention` reads (B = head_dim).
//! - `scale_rows(a,s)`: row i of `a` (a matrix [R, ..] or a vector [R]) times `s[i]` (`s` [R]):
//!   a per-output-channel scale folded into a linear layer's weight and bias (SANA1.5's q-norm
//!   weight, docs/models.md).
//!
//! A part may itself be derived (SANA1.5's q, k, v GEMM interleaves the scaled `to_q` with
//! `to_k` and `to_v`): names nest, and parts are built recursively.

use crate::{Error, F32Data, HostTensor, Result, Shape, TensorSource};

const INTERLEAVE: &str = "interleave_rows[";
const SCALE_ROWS: &str = "scale_rows(";

/// The name of `a` with row i multiplied by `s[i]`.
pub fn scaled_rows_name(a: &str, s: &str) -> String {
    format!("{SCALE_ROWS}{a},{s})")
}

/// The name of the weight whose rows are `parts`' rows interleaved in blocks of `block` rows.
pub fn interleaved_rows_name(parts: &[String], block: usize) -> String {
    format!("{INTERLEAVE}{block}]({})", parts.join(","))
}

/// The stored parts of a derived weight of `shape` (nested derivations flattened), with the shape
/// each part must have; `None` for a stored (not derived) name.
pub fn parts(name: &str, shape: &Shape) -> Option<Vec<(String, Shape)>> {
    let direct = direct_parts(name, shape)?;
    Some(
        direct
            .into_iter()
            .flat_map(|(p, s)| parts(&p, &s).unwrap_or_else(|| vec![(p, s)]))
            .collect(),
    )
}

/// The parts a derived name is built from directly (each may be derived itself).
fn direct_parts(name: &str, shape: &Shape) -> Option<Vec<(String, Shape)>> {
    if let Some((a, s)) = parse_scale(name) {
        let rows = *shape.dims().first()?;
        return Some(vec![
            (a.to_string(), shape.clone()),
            (s.to_string(), Shape::new([rows])),
        ]);
    }
    let (block, list) = parse(name)?;
    let n = list.len();
    let d = shape.dims();
    if n == 0 || block == 0 || d.is_empty() || d[0] % (n * block) != 0 {
        return None;
    }
    let mut pd = d.to_vec();
    pd[0] /= n;
    Some(
        list.into_iter()
            .map(|p| (p.to_string(), Shape::new(pd.clone())))
            .collect(),
    )
}

fn parse_scale(name: &str) -> Option<(&str, &str)> {
    match split_top(name.strip_prefix(SCALE_ROWS)?.strip_suffix(')')?)[..] {
        [a, s] => Some((a, s)),
        _ => None,
    }
}

fn parse(name: &str) -> Option<(usize, Vec<&str>)> {
    let rest = name.strip_prefix(INTERLEAVE)?;
    let (block, rest) = rest.split_once("](")?;
    let list = rest.strip_suffix(')')?;
    Some((block.parse().ok()?, split_top(list)))
}

/// `list` split at the commas outside any brackets (a nested derived name stays one item).
fn split_top(list: &str) -> Vec<&str> {
    let (mut items, mut depth, mut start) = (vec![], 0i32, 0);
    for (i, ch) in list.char_indices() {
        match ch {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&list[start..]);
    items
}

/// Whether `name` names a derived weight (built from stored parts).
pub fn is_derived(name: &str) -> bool {
    parse_scale(name).is_some() || parse(name).is_some()
}

/// As [`tensor_f32`], held once: a stored weight comes from `source.weight_f32` (in place from
/// a mapped f32 file where it can), a derived one is built into an owned vector.
pub fn weight_f32(source: &dyn TensorSource, name: &str, shape: &Shape) -> Result<F32Data> {
    if is_derived(name) {
        Ok(F32Data::owned(
            tensor_f32(source, name, shape)?.to_f32_vec(),
        ))
    } else {
        source.weight_f32(name, shape)
    }
}

/// Weight `name` with `shape` from `source`: built from its parts when `name` is derived, else
/// `source.tensor_f32(name, shape)`.
pub fn tensor_f32(source: &dyn TensorSource, name: &str, shape: &Shape) -> Result<HostTensor> {
    if parse_scale(name).is_some() {
        let Some(parts) = direct_parts(name, shape) else {
            return Err(Error::Derived {
                path: source.origin().into(),
                name: name.into(),
                msg: format!("shape {shape} has no rows to scale"),
            });
        };
        let mut a = tensor_f32(source, &parts[0].0, &parts[0].1)?.to_f32_vec();
        let s = tensor_f32(source, &parts[1].0, &parts[1].1)?.to_f32_vec();
        let row = a.len() / s.len().max(1);
        for (r, &f) in a.chunks_mut(row.max(1)).zip(&s) {
            r.iter_mut().for_each(|v| *v *= f);
        }
        return HostTensor::from_f32(shape.clone(), a);
    }
    let Some((block, _)) = parse(name) else {
        return source.tensor_f32(name, shape);
    };
    let Some(parts) = direct_parts(name, shape) else {
        return Err(Error::Derived {
            path: source.origin().into(),
            name: name.into(),
            msg: format!("shape {shape} does not split into its parts in blocks of {block} rows"),
        });
    };
    let row = shape.numel() / shape.dims()[0];
    let loaded = parts
        .iter()
        .map(|(p, s)| tensor_f32(source, p, s).map(|t| t.to_f32_vec()))
        .collect::<Result<Vec<_>>>()?;
    let part_rows = shape.dims()[0] / parts.len();
    let mut out = Vec::with_capacity(shape.numel());
    for b in 0..part_rows / block {
        for p in &loaded {
            out.extend_from_slice(&p[b * block * row..(b + 1) * block * row]);
        }
    }
    HostTensor::from_f32(shape.clone(), out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn interleaves_blocks_of_rows_and_names_missing_parts() {
        let mut m: HashMap<String, HostTensor> = HashMap::new();
        // Three [4, 2] parts; value = 100·part + row·10 + col.
        for (p, name) in ["q", "k", "v"].iter().enumerate() {
            let v = (0..4)
                .flat_map(|r| (0..2).map(move |c| (100 * p + 10 * r + c) as f32))
                .collect();
            m.insert(name.to_string(), HostTensor::from_f32([4, 2], v).unwrap());
        }
        let name = interleaved_rows_name(&["q".into(), "k".into(), "v".into()], 2);
        assert_eq!(name, "interleave_rows[2](q,k,v)");
        let t = tensor_f32(&m, &name, &Shape::new([12, 2]))
            .unwrap()
            .to_f32_vec();
        let rows: Vec<f32> = t.chunks(2).map(|r| r[0]).collect();
        assert_eq!(
            rows,
            [0., 10., 100., 110., 200., 210., 20., 30., 120., 130., 220., 230.]
        );
        // A stored name passes through.
        assert_eq!(
            tensor_f32(&m, "k", &Shape::new([4, 2]))
                .unwrap()
                .to_f32_vec()[0],
            100.0
        );
        // A missing part is reported by its own key.
        let bad = interleaved_rows_name(&["q".into(), "nope".into(), "v".into()], 2);
        let e = tensor_f32(&m, &bad, &Shape::new([12, 2]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
        // A shape that does not split is refused, naming the weight.
        let e = tensor_f32(&m, &name, &Shape::new([10, 2]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("interleave_rows[2]") && e.contains("[10, 2]"),
            "{e}"
        );
        assert!(parts("q", &Shape::new([4, 2])).is_none());
        // scale_rows: row r of q times s[r]; a misshapen scale is reported by its key.
        m.insert(
            "s".into(),
            HostTensor::from_f32([4], vec![1.0, -2.0, 0.5, 3.0]).unwrap(),
        );
        let t = tensor_f32(&m, &scaled_rows_name("q", "s"), &Shape::new([4, 2]))
            .unwrap()
            .to_f32_vec();
        assert_eq!(t, [0., 1., -20., -22., 10., 10.5, 90., 93.]);
        m.insert(
            "s3".into(),
            HostTensor::from_f32([3], vec![1.0; 3]).unwrap(),
        );
        let e = tensor_f32(&m, &scaled_rows_name("q", "s3"), &Shape::new([4, 2]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("s3"), "{e}");
        // Nested: q's rows scaled, then interleaved with k and v; parts lists the stored leaves.
        let nested =
            interleaved_rows_name(&[scaled_rows_name("q", "s"), "k".into(), "v".into()], 2);
        let t = tensor_f32(&m, &nested, &Shape::new([12, 2]))
            .unwrap()
            .to_f32_vec();
        let rows: Vec<f32> = t.chunks(2).map(|r| r[0]).collect();
        assert_eq!(
            rows,
            [0., -20., 100., 110., 200., 210., 10., 90., 120., 130., 220., 230.]
        );
        let leaves: Vec<String> = parts(&nested, &Shape::new([12, 2]))
            .unwrap()
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(leaves, ["q", "s", "k", "v"]);
    }
}
