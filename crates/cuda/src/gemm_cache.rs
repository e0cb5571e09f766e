//! The per-shape cuBLASLt algorithm choice kept on disk (issue 13 item 5), so that the candidates
//! are timed once per (device, driver, cuBLASLt version, shape, dtypes, epilogue, alignments), not
//! once per process.
//!
//! The file is text: the line `# openuni cuBLASLt algorithm choices v1`, then one `KEY<TAB>INDEX`
//! line per choice, INDEX the position of the chosen algorithm in cuBLASLt's heuristic list for
//! that key (the list is the same for the same cuBLASLt version, device and problem, which the key
//! names). It is written whole to a temporary file and renamed over the old one (a reader never
//! sees half a file); a file that does not parse gives a warning on stderr and is rebuilt from
//! the choices made from then on. Never a panic: a cache that cannot be written only costs the
//! timing again in the next process.
//!
//! Where: `$OPENUNI_GEMM_CACHE` (a file; `off` disables it), else `gemm-algos.tsv` in the kernel
//! cache folder (`nvrtc::cache_dir`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const HEADER: &str = "# openuni cuBLASLt algorithm choices v1";

/// The choices of one process, backed by a file.
pub struct AlgoCache {
    path: Option<PathBuf>,
    /// Loaded on first use.
    map: Mutex<Option<BTreeMap<String, usize>>>,
}

impl AlgoCache {
    /// A cache backed by `path` (`None`: in memory only).
    pub fn at(path: Option<PathBuf>) -> AlgoCache {
        AlgoCache {
            path,
            map: Mutex::new(None),
        }
    }

    /// The cache at its default place (see the module docs).
    pub fn default_location() -> AlgoCache {
        let path = match std::env::var("OPENUNI_GEMM_CACHE") {
            Ok(s) if s == "off" || s == "0" => None,
            Ok(s) if !s.is_empty() => Some(PathBuf::from(s)),
            _ => crate::nvrtc::cache_dir().map(|d| d.join("gemm-algos.tsv")),
        };
        AlgoCache::at(path)
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn with_map<R>(&self, f: impl FnOnce(&mut BTreeMap<String, usize>) -> R) -> R {
        let mut guard = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let map = guard.get_or_insert_with(|| self.path.as_deref().map(load).unwrap_or_default());
        f(map)
    }

    /// The index chosen before for `key`, if any.
    pub fn get(&self, key: &str) -> Option<usize> {
        self.with_map(|m| m.get(key).copied())
    }

    /// Records a choice and writes the file (merged with what another process may have added
    /// meanwhile). A write error is a warning.
    pub fn insert(&self, key: &str, index: usize) {
        let key = sanitize(key);
        self.with_map(|m| {
            m.insert(key.clone(), index);
            let Some(path) = &self.path else { return };
            // What another process added meanwhile (a corrupt file was reported when loaded).
            let mut merged = std::fs::read_to_string(path).ok().and_then(|t| parse(&t).ok()).unwrap_or_default();
            merged.extend(m.iter().map(|(k, v)| (k.clone(), *v)));
            if let Err(e) = write_atomic(path, &render(&merged)) {
                eprintln!("warning: cuBLASLt choice cache {}: cannot write it ({e}); the choice holds for this process only", path.display());
            }
        })
    }
}

/// Keys are one line without tabs.
fn sanitize(key: &str) -> String {
    key.replace(['\t', '\n', '\r'], " ")
}

fn render(map: &BTreeMap<String, usize>) -> String {
    let mut s = format!("{HEADER}\n");
    for (k, v) in map {
        s.push_str(&format!("{k}\t{v}\n"));
    }
    s
}

/// Parses a cache file; the error names the line.
pub fn parse(text: &str) -> std::result::Result<BTreeMap<String, usize>, String> {
    let mut lines = text.lines();
    match lines.next() {
        Some(HEADER) => {}
        Some(other) => {
            return Err(format!(
                "line 1: expected `{HEADER}`, found `{}`",
                other.chars().take(60).collect::<String>()
            ))
        }
        None => return Err("empty file".into()),
    }
    let mut map = BTreeMap::new();
    for (i, line) in lines.enumerate() {
        let (k, v) = line
            .split_once('\t')
            .ok_or_else(|| format!("line {}: no tab between key and index", i + 2))?;
        let v: usize = v
            .trim()
            .parse()
            .map_err(|_| format!("line {}: index `{v}` is not a number", i + 2))?;
        if k.is_empty() || v > 1024 {
            return Err(format!(
                "line {}: empty key or index {v} out of range",
                i + 2
            ));
        }
        map.insert(k.to_string(), v);
    }
    Ok(map)
}

/// The choices in `path`: empty when it is missing; a warning and empty when it is unreadable or
/// corrupt (the next insert rewrites it).
fn load(path: &Path) -> BTreeMap<String, usize> {
    let text = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return BTreeMap::new(),
        Err(e) => {
            eprintln!(
                "warning: cuBLASLt choice cache {}: cannot read it ({e}); rebuilding it",
                path.display()
            );
            return BTreeMap::new();
        }
    };
    match std::str::from_utf8(&text)
        .map_err(|e| format!("not UTF-8 ({e})"))
        .and_then(parse)
    {
        Ok(m) => m,
        Err(e) => {
            eprintln!(
                "warning: cuBLASLt choice cache {}: corrupt ({e}); rebuilding it",
                path.display()
            );
            BTreeMap::new()
        }
    }
}

/// Writes `text` to a temporary file beside `path`, then renames it over `path`.
fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("openuni-gemm-cache-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d.join("gemm-algos.tsv")
    }

    #[test]
    fn a_choice_survives_the_process_and_merges_with_others() {
        let p = temp("merge");
        let a = AlgoCache::at(Some(p.clone()));
        assert_eq!(a.get("dev|m1 n2 k3"), None, "miss on an empty cache");
        a.insert("dev|m1 n2 k3", 2);
        assert_eq!(a.get("dev|m1 n2 k3"), Some(2), "hit in the same process");
        // Another process (another cache on the same file) adds its own; both survive.
        let b = AlgoCache::at(Some(p.clone()));
        assert_eq!(b.get("dev|m1 n2 k3"), Some(2), "hit from the file");
        b.insert("dev|m4 n5 k6", 0);
        a.insert("dev|m7\tn8 k9", 1);
        let text = std::fs::read_to_string(&p).unwrap();
        let m = parse(&text).unwrap();
        assert_eq!(m.len(), 3, "{text}");
        assert_eq!(m["dev|m7 n8 k9"], 1, "tabs in keys are replaced");
        let leftovers: Vec<_> = std::fs::read_dir(p.parent().unwrap())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name() != "gemm-algos.tsv")
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }

    #[test]
    fn a_corrupt_file_is_rebuilt_not_a_panic() {
        for junk in [
            "",
            "garbage\n",
            &format!("{HEADER}\nkey without tab\n"),
            &format!("{HEADER}\nk\tnot-a-number\n"),
            "\u{0}\u{ff}",
        ] {
            let p = temp("corrupt");
            std::fs::write(&p, junk).unwrap();
            let c = AlgoCache::at(Some(p.clone()));
            assert_eq!(c.get("k"), None, "{junk:?}: a corrupt cache is a miss");
            c.insert("k", 3);
            assert_eq!(
                parse(&std::fs::read_to_string(&p).unwrap()).unwrap()["k"],
                3,
                "{junk:?}: rebuilt"
            );
        }
        assert!(parse(&format!("{HEADER}\nk\t1\n")).is_ok());
        assert!(parse("nonsense").unwrap_err().contains("line 1"));
    }

    #[test]
    fn an_unwritable_place_is_a_warning() {
        let c = AlgoCache::at(Some(PathBuf::from(
            "/proc/openuni-no-such-dir/gemm-algos.tsv",
        )));
        c.insert("k", 1);
        assert_eq!(c.get("k"), Some(1), "the choice still holds in memory");
    }
}
