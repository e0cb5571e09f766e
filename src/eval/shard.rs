//! Shards: one slice of a benchmark's files per process, chosen by `--shard K/N` or by the
//! cluster's scheduler (a Slurm job array, a Kubernetes Indexed Job), never by a coordinator of
//! our own. Batch b of the set (`eval::batches`: consecutive files of `--batch` images) goes to
//! shard b % N: balanced within one batch, and two shards never write the same file.

use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// Parses `K/N` (0 <= K < N).
    pub fn parse(s: &str) -> Result<Shard> {
        let Some((k, n)) = s.split_once('/') else {
            bail!("--shard `{s}`: expected K/N (shard K of N, 0 <= K < N), e.g. 0/4")
        };
        let num = |what: &str, v: &str| -> Result<usize> {
            let v = v.trim();
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                bail!("--shard `{s}`: {what} `{v}` is not a non-negative integer");
            }
            v.parse::<usize>()
                .map_err(|_| anyhow::anyhow!("--shard `{s}`: {what} `{v}` is too large"))
        };
        Shard::new(num("K", k)?, num("N", n)?, "--shard")
    }

    fn new(index: usize, count: usize, from: &str) -> Result<Shard> {
        if count == 0 {
            bail!("{from}: the shard count is 0 (it must be at least 1)");
        }
        if index >= count {
            bail!("{from}: shard index {index} is not below the shard count {count} (shards are numbered 0..{count})");
        }
        Ok(Shard { index, count })
    }

    /// The shard the scheduler gives this process: SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT
    /// (a job array `--array=0-(N-1)`), else JOB_COMPLETION_INDEX with JOB_COMPLETION_COUNT (a
    /// Kubernetes Indexed Job; the manifest sets the count from `.spec.completions`). `None` when
    /// neither index is set; with it, a description of where it came from.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Option<(Shard, String)>> {
        for (id, count) in [
            ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
            ("JOB_COMPLETION_INDEX", "JOB_COMPLETION_COUNT"),
        ] {
            let Some(k) = get(id) else { continue };
            let Some(n) = get(count) else {
                bail!("${id}={k} is set but ${count} is not: set it to the number of shards")
            };
            let num = |name: &str, v: &str| -> Result<usize> {
                let t = v.trim();
                if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                    bail!("${name}={v:?} is not a non-negative integer");
                }
                t.parse::<usize>()
                    .map_err(|_| anyhow::anyhow!("${name}={v:?} is too large"))
            };
            let shard = Shard::new(
                num(id, &k)?,
                num(count, &n)?,
                &format!("${id}={k}, ${count}={n}"),
            )?;
            return Ok(Some((shard, format!("${id}={k}, ${count}={n}"))));
        }
        Ok(None)
    }

    /// Whether batch `i` of the set is this shard's.
    pub fn owns(self, i: usize) -> bool {
        i % self.count == self.index
    }

    /// The manifest file name of this shard.
    pub fn manifest_name(self) -> String {
        format!("manifest-{}-of-{}.jsonl", self.index, self.count)
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_validate() {
        assert_eq!(Shard::parse("1/4").unwrap(), Shard { index: 1, count: 4 });
        for (bad, says) in [
            ("4/4", "not below"),
            ("0/0", "count is 0"),
            ("x/2", "`x`"),
            ("1", "expected K/N"),
            ("-1/2", "`-1`"),
        ] {
            let e = format!("{:#}", Shard::parse(bad).unwrap_err());
            assert!(e.contains(says), "{bad}: {e}");
        }
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(Shard::from_env(env(&[])).unwrap(), None);
        let (s, why) = Shard::from_env(env(&[
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (s, why.contains("SLURM_ARRAY_TASK_ID=2")),
            (Shard { index: 2, count: 3 }, true)
        );
        let (s, _) = Shard::from_env(env(&[
            ("JOB_COMPLETION_INDEX", "0"),
            ("JOB_COMPLETION_COUNT", "2"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(s, Shard { index: 0, count: 2 });
        for (pairs, says) in [
            (
                &[
                    ("SLURM_ARRAY_TASK_ID", "a"),
                    ("SLURM_ARRAY_TASK_COUNT", "3"),
                ][..],
                "not a non-negative integer",
            ),
            (
                &[
                    ("SLURM_ARRAY_TASK_ID", "3"),
                    ("SLURM_ARRAY_TASK_COUNT", "3"),
                ][..],
                "not below",
            ),
            (
                &[("JOB_COMPLETION_INDEX", "1")][..],
                "JOB_COMPLETION_COUNT is not",
            ),
        ] {
            let e = format!("{:#}", Shard::from_env(env(pairs)).unwrap_err());
            assert!(e.contains(says), "{e}");
        }
    }
}
