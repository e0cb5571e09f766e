//! Atomic output files: every file the program writes (PNGs, converted safetensors, JSON
//! reports) is written to a hidden temporary file in the target's own folder and renamed into
//! place only once complete, so an interrupted or failed run never leaves a truncated file at the
//! target name (which a re-run could take for finished work). The temporary file is removed when
//! writing fails; a SIGINT, SIGTERM or SIGHUP (Ctrl-C) during a write is deferred until the
//! write has stopped and its temporary files are gone, then ends the process. Only a kill that
//! runs no handler (SIGKILL, power loss) can leave a hidden temporary file, never a file at the
//! target name.

use std::ffi::c_int;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::Once;

use anyhow::{bail, Context, Result};

/// Files being written now, and a termination signal that arrived meanwhile (0: none).
static WRITING: AtomicUsize = AtomicUsize::new(0);
static DEFERRED: AtomicI32 = AtomicI32::new(0);

/// SIGINT, SIGTERM, SIGHUP: while a file is being written the signal is deferred until the write
/// has finished and its temporary file is removed (a library writing the file, such as
/// safetensors, may keep its own temporary file that only its normal return cleans up), then the
/// process ends by the same signal. Otherwise the default action runs at once.
extern "C" fn on_signal(sig: c_int) {
    if WRITING.load(Ordering::SeqCst) > 0 {
        DEFERRED.store(sig, Ordering::SeqCst);
    } else {
        die_by(sig);
    }
}

fn die_by(sig: c_int) {
    // SAFETY: signal and raise are async-signal-safe.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// One write in progress (see [`on_signal`]).
struct Writing;

impl Writing {
    fn start() -> Writing {
        static HANDLERS: Once = Once::new();
        HANDLERS.call_once(|| {
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                // SAFETY: installs a handler that only does async-signal-safe work.
                unsafe {
                    libc::signal(sig, on_signal as extern "C" fn(c_int) as libc::sighandler_t)
                };
            }
        });
        WRITING.fetch_add(1, Ordering::SeqCst);
        Writing
    }

    fn interrupted() -> bool {
        DEFERRED.load(Ordering::SeqCst) != 0
    }

    /// Ends the write; a signal deferred meanwhile now ends the process.
    fn finish(self, result: Result<()>) -> Result<()> {
        drop(self);
        if WRITING.load(Ordering::SeqCst) == 0 {
            let sig = DEFERRED.swap(0, Ordering::SeqCst);
            if sig != 0 {
                die_by(sig);
            }
        }
        result
    }
}

impl Drop for Writing {
    fn drop(&mut self) {
        WRITING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A hidden temporary file next to `path`; it is deleted on drop unless persisted.
fn temp_next_to(path: &Path) -> Result<tempfile::NamedTempFile> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file name", path.display()))?;
    let mut b = tempfile::Builder::new();
    // The permissions a plain create gives (0666 less the umask), not tempfile's private 0600.
    #[cfg(unix)]
    b.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    b.prefix(&format!(".{}.", name.to_string_lossy()))
        .suffix(".partial")
        .tempfile_in(dir)
        .with_context(|| {
            format!(
                "{}: cannot create a temporary file in {}",
                path.display(),
                dir.display()
            )
        })
}

/// Moves a complete temporary file to `path` (replacing what is there), unless a termination
/// signal arrived while it was written: then it is removed.
fn persist(tmp: tempfile::NamedTempFile, path: &Path) -> Result<()> {
    if Writing::interrupted() {
        bail!(
            "{}: interrupted; the partial file was removed",
            path.display()
        );
    }
    tmp.as_file()
        .sync_all()
        .with_context(|| format!("{}: cannot flush", path.display()))?;
    tmp.persist(path)
        .map_err(|e| anyhow::Error::new(e.error))
        .with_context(|| {
            format!(
                "{}: cannot move the finished file into place",
                path.display()
            )
        })?;
    Ok(())
}

/// Writes `path` atomically through `write`, which gets a buffered writer.
pub fn write_with(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<&File>) -> Result<()>,
) -> Result<()> {
    let writing = Writing::start();
    let result = (|| {
        let tmp = temp_next_to(path)?;
        {
            let mut w = BufWriter::new(tmp.as_file());
            write(&mut w).with_context(|| format!("{}: cannot write", path.display()))?;
            w.flush()
                .with_context(|| format!("{}: cannot write", path.display()))?;
        }
        persist(tmp, path)
    })();
    writing.finish(result)
}

/// Writes `bytes` to `path` atomically.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |w| Ok(w.write_all(bytes)?))
}

/// Writes `path` atomically through a writer that takes a file path (e.g. a library that opens the
/// file itself): `write` gets the temporary file's path.
pub fn write_via_path(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let writing = Writing::start();
    let result = (|| {
        let tmp = temp_next_to(path)?;
        write(tmp.path())?;
        // The writer may have replaced the file at the temporary path: reopen before syncing.
        let reopened =
            tempfile::NamedTempFile::from_parts(File::open(tmp.path())?, tmp.into_temp_path());
        persist(reopened, path)
    })();
    writing.finish(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".partial"))
            .collect()
    }

    #[test]
    fn failed_write_leaves_nothing_and_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_bytes(&p, b"old").unwrap();
        let e = write_with(&p, |w| {
            w.write_all(b"half")?;
            anyhow::bail!("disk full")
        });
        assert!(format!("{:#}", e.unwrap_err()).contains("disk full"));
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert!(leftovers(dir.path()).is_empty());
        let e = write_via_path(&p, |t| {
            std::fs::write(t, b"partial")?;
            anyhow::bail!("interrupted")
        });
        assert!(e.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert!(leftovers(dir.path()).is_empty());
        write_via_path(&p, |t| Ok(std::fs::write(t, b"new")?)).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert!(leftovers(dir.path()).is_empty());
    }
}
