//! The key-encryption keys (KEKs) a process wraps and unwraps users' data keys with: from
//! configuration (`PCF_KEK` with `PCF_KEK_ID`, or `PCF_KEK_FILE`), or, in development and
//! embedded mode with none configured, the one kept in the data directory (generated on first
//! start). Production refuses to start without one.

use anyhow::Context;
use pcf_adapters::personal::{Kek, Keyring};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config::{Config, Environment};

/// The file, in the data directory, of the KEK development mode generates.
pub const GENERATED_KEK_FILE: &str = "kek";

/// The configured KEKs; in development without any, the generated one.
pub fn keyring(config: &Config) -> anyhow::Result<Keyring> {
    let keks = if let Some(path) = &config.kek_file {
        read_kek_file(path)?
    } else if let Some(kek) = &config.kek {
        vec![Kek::parse(&config.kek_id, kek).context("PCF_KEK")?]
    } else if config.environment == Environment::Production {
        anyhow::bail!(
            "production needs a key-encryption key: set PCF_KEK (base64 of 32 bytes) and \
             PCF_KEK_ID, or PCF_KEK_FILE (see docs/security.md)"
        );
    } else {
        vec![generated_kek(&config.data_dir)?]
    };
    Ok(Keyring::new(keks)?)
}

/// Reads a KEK file: `<id> <base64 of 32 bytes>` a line, the first line the KEK that wraps;
/// blank lines and lines starting with `#` are skipped.
pub fn read_kek_file(path: &Path) -> anyhow::Result<Vec<Kek>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading PCF_KEK_FILE {}", path.display()))?;
    let mut keks = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (id, key) = line.split_once(char::is_whitespace).with_context(|| {
            format!(
                "{} line {}: expected `<id> <base64 key>`",
                path.display(),
                n + 1
            )
        })?;
        keks.push(
            Kek::parse(id, key).with_context(|| format!("{} line {}", path.display(), n + 1))?,
        );
    }
    anyhow::ensure!(!keks.is_empty(), "{} holds no key", path.display());
    Ok(keks)
}

/// The development KEK in `data_dir`, generated (and said so) if it is not there yet.
fn generated_kek(data_dir: &Path) -> anyhow::Result<Kek> {
    let path: PathBuf = data_dir.join(GENERATED_KEK_FILE);
    if path.exists() {
        let mut keks = read_kek_file(&path)?;
        return Ok(keks.remove(0));
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    let kek = Kek::generate("dev");
    // Written whole under a name of its own, then linked into place, which fails
    // if another process starting at the same time got there first: then its KEK is the one.
    let draft = data_dir.join(format!(".{GENERATED_KEK_FILE}.{}", uuid::Uuid::new_v4()));
    let mut file = create_private(&draft)?;
    writeln!(
        file,
        "# The key-encryption key of this development data directory: it wraps every \
         user's data key.\n# Losing it loses every user's personal data.\n{} {}",
        kek.id(),
        kek.to_base64().as_str()
    )
    .and_then(|()| file.sync_all())
    .with_context(|| format!("writing {}", draft.display()))?;
    let linked = std::fs::hard_link(&draft, &path);
    let _ = std::fs::remove_file(&draft);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Ok(read_kek_file(&path)?.remove(0));
        }
        Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
    }
    tracing::warn!(
        path = %path.display(),
        "generated a key-encryption key for development; it alone opens the personal data \
         in this data directory: keep it with the data (production needs PCF_KEK or PCF_KEK_FILE)"
    );
    Ok(kek)
}

/// A new file only its owner may read.
fn create_private(path: &Path) -> anyhow::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> Config {
        Config {
            data_dir: dir.to_owned(),
            ..Config::default()
        }
    }

    #[test]
    fn development_generates_a_kek_once_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = keyring(&config(dir.path())).unwrap();
        let key = pcf_adapters::personal::DataKey::generate();
        let wrapped = first.wrap("u", &key);
        let again = keyring(&config(dir.path())).unwrap();
        again
            .unwrap("u", &wrapped)
            .expect("the same KEK on the next start");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(GENERATED_KEK_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "only its owner may read the KEK file");
        }
    }

    #[test]
    fn processes_starting_at_once_agree_on_one_generated_kek() {
        let dir = tempfile::tempdir().unwrap();
        let rings: Vec<Keyring> = std::thread::scope(|s| {
            let starts: Vec<_> = (0..8)
                .map(|_| s.spawn(|| keyring(&config(dir.path())).unwrap()))
                .collect();
            starts.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let wrapped = rings[0].wrap("u", &pcf_adapters::personal::DataKey::generate());
        for ring in &rings {
            ring.unwrap("u", &wrapped).expect("one KEK for all");
        }
    }

    #[test]
    fn production_refuses_to_start_without_a_kek() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        c.environment = Environment::Production;
        let e = keyring(&c).unwrap_err().to_string();
        assert!(e.contains("PCF_KEK"), "{e}");
        assert!(!dir.path().join(GENERATED_KEK_FILE).exists());
    }

    #[test]
    fn a_kek_file_lists_the_wrapping_kek_first() {
        let dir = tempfile::tempdir().unwrap();
        let (new, old) = (Kek::generate("new"), Kek::generate("old"));
        let path = dir.path().join("keks");
        std::fs::write(
            &path,
            format!(
                "# rotation\nnew {}\n\nold {}\n",
                new.to_base64().as_str(),
                old.to_base64().as_str()
            ),
        )
        .unwrap();
        let mut c = config(dir.path());
        c.kek_file = Some(path.clone());
        let ring = keyring(&c).unwrap();
        assert_eq!(ring.current_id(), "new");
        assert_eq!(ring.ids().collect::<Vec<_>>(), ["new", "old"]);

        std::fs::write(&path, "new not-base64\n").unwrap();
        let e = format!("{:#}", keyring(&c).unwrap_err());
        assert!(e.contains("line 1") && e.contains("base64"), "{e}");
    }
}
