//! Writing CA material to disk: atomically (temp file + rename, so a crash
//! never leaves a half-written key) and with the right permissions from the
//! first byte (the temp file is created 0600, never widened after the fact).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::CaError;

/// Mode of private keys on disk.
pub const PRIVATE_MODE: u32 = 0o600;
/// Mode of certificates on disk.
pub const PUBLIC_MODE: u32 = 0o644;
/// Mode of directories holding private keys.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Write a secret (private key) file: mode 0600, atomically.
pub fn write_private_file(path: &Path, bytes: &[u8]) -> Result<(), CaError> {
    write_atomic(path, bytes, PRIVATE_MODE)
}

/// Write a public file (certificate, trust bundle): mode 0644, atomically.
pub fn write_public_file(path: &Path, bytes: &[u8]) -> Result<(), CaError> {
    write_atomic(path, bytes, PUBLIC_MODE)
}

/// Create `dir` (and parents) and restrict it to its owner (0700).
pub fn create_private_dir(dir: &Path) -> Result<(), CaError> {
    fs::create_dir_all(dir).map_err(|e| CaError::io(dir, "create directory", e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(PRIVATE_DIR_MODE))
        .map_err(|e| CaError::io(dir, "set permissions 0700 on", e))
}

/// Read a whole file as UTF-8 text (PEM).
pub fn read_text(path: &Path) -> Result<String, CaError> {
    let bytes = fs::read(path).map_err(|e| CaError::io(path, "read", e))?;
    String::from_utf8(bytes).map_err(|_| CaError::file(path, "not a text (PEM) file"))
}

/// Permission bits of an existing file.
pub fn mode(path: &Path) -> Result<u32, CaError> {
    let meta = fs::metadata(path).map_err(|e| CaError::io(path, "stat", e))?;
    Ok(meta.permissions().mode() & 0o777)
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| CaError::file(path, "not a file path"))?;
    // Random suffix: two writers of the same file never share a temp file.
    let tmp = dir.join(format!(
        ".{}.tmp-{:016x}",
        file_name.to_string_lossy(),
        rand::random::<u64>()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| CaError::io(&tmp, "create", e))?;
        // The umask may have narrowed `mode`; set it exactly (e.g. 0644 certs).
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| CaError::io(&tmp, "set permissions on", e))?;
        f.write_all(bytes)
            .map_err(|e| CaError::io(&tmp, "write", e))?;
        f.sync_all().map_err(|e| CaError::io(&tmp, "sync", e))?;
        fs::rename(&tmp, path).map_err(|e| CaError::io(path, "rename temp file onto", e))?;
        // Make the rename itself durable.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_file_is_0600_and_replaced_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.pem");
        write_private_file(&p, b"one").unwrap();
        assert_eq!(mode(&p).unwrap(), 0o600);
        write_private_file(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(mode(&p).unwrap(), 0o600);
        // No temp files left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["k.pem".to_string()]);
    }

    #[test]
    fn public_file_is_0644_and_dir_0700() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a/b");
        create_private_dir(&sub).unwrap();
        assert_eq!(mode(&sub).unwrap(), 0o700);
        let p = sub.join("c.crt");
        write_public_file(&p, b"cert").unwrap();
        assert_eq!(mode(&p).unwrap(), 0o644);
    }

    #[test]
    fn write_into_missing_dir_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing/k.pem");
        let err = write_private_file(&p, b"x").unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
    }
}
