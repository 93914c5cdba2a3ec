//! Key and certificate files.
//!
//! Private keys are written 0600 and never leave the host that made them. Files are replaced
//! atomically (write to a temporary file in the same directory, fsync, rename) so a crash
//! never leaves half a key or a chain that does not match its key.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::KeyPair;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::IdentityError;

/// File names inside a Client's state directory.
pub const SVID_CERT: &str = "svid.pem";
/// The SVID's private key (0600).
pub const SVID_KEY: &str = "svid.key";
/// The trust bundle (Hub CA certificates).
pub const BUNDLE: &str = "bundle.pem";

/// The key of a renewal asked for SVID serial `serial` (0600), kept until the renewed SVID is
/// stored: a serial renews once, so a Client that restarts before it stored the answer must
/// ask again with the same key (the Hub refuses another one).
pub fn renew_key_file(serial: &str) -> String {
    format!("{RENEW_KEY_PREFIX}{serial}.key")
}

/// What every [`renew_key_file`] name starts with.
pub const RENEW_KEY_PREFIX: &str = "renew-";

/// PEM rendering helpers.
#[derive(Debug)]
pub struct Pem;

impl Pem {
    /// Certificates as concatenated PEM blocks.
    pub fn certs(certs: &[CertificateDer<'_>]) -> String {
        certs
            .iter()
            .map(|c| pem_block("CERTIFICATE", c.as_ref()))
            .collect()
    }
}

fn pem_block(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// An SVID as held in memory: the chain (leaf first) and the key.
pub struct Svid {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 DER of the private key.
    key_der: Vec<u8>,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("chain_len", &self.chain.len())
            .field("key", &"***")
            .finish()
    }
}

impl Svid {
    /// Builds from a chain and an rcgen key pair.
    pub fn new(chain: Vec<CertificateDer<'static>>, key: &KeyPair) -> Self {
        Self {
            chain,
            key_der: key.serialize_der(),
        }
    }

    /// Builds from a chain and the PKCS#8 DER of its key (as a SPIFFE Workload API delivers
    /// them). Whether the key is the leaf's is checked by [`Svid::key_matches`].
    pub fn from_pkcs8(chain: Vec<CertificateDer<'static>>, key_der: Vec<u8>) -> Self {
        Self { chain, key_der }
    }

    /// Whether the private key is the one the leaf certifies (and parses at all).
    pub fn key_matches(&self) -> bool {
        let Some(leaf) = self.chain.first() else {
            return false;
        };
        let Ok(key) = KeyPair::try_from(self.key_der.as_slice()) else {
            return false;
        };
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) else {
            return false;
        };
        rcgen::PublicKeyData::subject_public_key_info(&key) == cert.public_key().raw
    }

    /// The private key for rustls.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key_der.clone().into())
    }

    /// Loads `<stem>.pem` and `<stem>.key` from `dir`.
    pub fn load(dir: &Path, cert_file: &str, key_file: &str) -> Result<Self, IdentityError> {
        let chain = read_certs(&dir.join(cert_file))?;
        if chain.is_empty() {
            return Err(IdentityError::Pem(dir.join(cert_file)));
        }
        let key = read_key_pair(&dir.join(key_file))?;
        Ok(Self::new(chain, &key))
    }

    /// Writes the chain and the key (0600) into `dir`; the key first, so a chain on disk
    /// always has its key.
    pub fn save(&self, dir: &Path, cert_file: &str, key_file: &str) -> Result<(), IdentityError> {
        write_durable(&dir.join(key_file), self.key_pem().as_bytes(), 0o600)?;
        write_durable(
            &dir.join(cert_file),
            Pem::certs(&self.chain).as_bytes(),
            0o644,
        )
    }

    /// [`save`](Self::save) with the chain first: for a renewal, whose key is kept in a file of
    /// its own until both are written. Interrupted between the two, the directory holds the
    /// new chain, the old key and the kept one: the new chain's key is found again, where the
    /// other order would leave the new key beside the old chain and lose the old key.
    pub fn save_chain_first(
        &self,
        dir: &Path,
        cert_file: &str,
        key_file: &str,
    ) -> Result<(), IdentityError> {
        write_durable(
            &dir.join(cert_file),
            Pem::certs(&self.chain).as_bytes(),
            0o644,
        )?;
        write_durable(&dir.join(key_file), self.key_pem().as_bytes(), 0o600)
    }

    fn key_pem(&self) -> String {
        pem_block("PRIVATE KEY", &self.key_der)
    }
}

/// A state directory (or, while it does not exist, the nearest directory above it) that belongs
/// to another user than the one this process creates files as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignOwner {
    /// The directory: the state directory, or the ancestor it would be created in.
    pub dir: PathBuf,
    /// Its owner.
    pub owner: u32,
    /// Its group.
    pub group: u32,
    /// This process's filesystem uid.
    pub caller: u32,
}

impl ForeignOwner {
    /// How to run a command as the owner: `sudo -u NAME` when the uid has a name here, else
    /// `setpriv` with the directory's uid and gid (sudo refuses a uid with no name by default).
    pub fn run_as(&self) -> String {
        match user_name(self.owner) {
            Some(name) => format!("sudo -u {name}"),
            None => format!(
                "setpriv --reuid={} --regid={} --clear-groups",
                self.owner, self.group
            ),
        }
    }
}

impl std::fmt::Display for ForeignOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} belongs to uid {}, and this command runs as uid {}",
            self.dir.display(),
            self.owner,
            self.caller
        )
    }
}

/// Whether what this process would create in `state_dir` would belong to another user than
/// the directory's owner, who runs the Hub or Client there and could not then read it (a key,
/// an SVID: 0600). While `state_dir` does not exist, its nearest existing ancestor is asked
/// instead. A root-owned directory is nobody's else: root reads anything (a volume with a
/// group-writable root directory, Kubernetes' `fsGroup`).
pub fn foreign_owner(state_dir: &Path) -> std::io::Result<Option<ForeignOwner>> {
    use std::os::unix::fs::MetadataExt;
    let mut dir = state_dir;
    let meta = loop {
        match fs::metadata(dir) {
            Ok(m) => break m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match dir.parent() {
                Some(up) if !up.as_os_str().is_empty() => dir = up,
                // A relative path: its first component is in the working directory.
                Some(_) => dir = Path::new("."),
                None => return Ok(None),
            },
            Err(e) => return Err(e),
        }
    };
    let caller = fs_uid()?;
    let (owner, group) = (meta.uid(), meta.gid());
    Ok((owner != caller && owner != 0).then(|| ForeignOwner {
        dir: dir.to_owned(),
        owner,
        group,
        caller,
    }))
}

/// Makes `dir` 0700 if it is missing, its missing parents as any directory is made (so that
/// `/etc/billing/ewii` leaves `/etc/billing` open to the user later given `ewii`). One that
/// exists keeps its mode.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        other => other,
    }
}

/// This process's filesystem uid (the owner of what it creates), from `/proc/self/status`.
pub(crate) fn fs_uid() -> std::io::Result<u32> {
    const STATUS: &str = "/proc/self/status";
    let status = fs::read_to_string(STATUS)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{STATUS}: {e}")))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        // Real, effective, saved, filesystem.
        .and_then(|ids| ids.split_whitespace().nth(3))
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("{STATUS}: no Uid line")))
}

/// The name of `uid` in `/etc/passwd`, if it has one there.
fn user_name(uid: u32) -> Option<String> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        (f.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_owned())
    })
}

/// Reads every certificate in a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let data = read(path)?;
    CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| IdentityError::Pem(path.to_owned()))
}

/// Reads a PKCS#8 private key.
pub fn read_key_pair(path: &Path) -> Result<KeyPair, IdentityError> {
    let data = read(path)?;
    let text = String::from_utf8(data).map_err(|_| IdentityError::Pem(path.to_owned()))?;
    KeyPair::from_pem(&text).map_err(|_| IdentityError::Pem(path.to_owned()))
}

/// [`write_file`], and the directory synced: the rename survives a power loss.
pub fn write_durable(path: &Path, data: &[u8], mode: u32) -> Result<(), IdentityError> {
    write_file(path, data, mode)?;
    let dir = parent(path);
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| IdentityError::Io {
            path: dir.to_owned(),
            source,
        })
}

/// Writes `data` to `path` atomically with `mode`.
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = parent(path);
    // A name of its own, made here or not at all (O_EXCL, which follows no link): nothing
    // planted in the directory is written through or has its mode changed, and two writers of
    // one path (two runs of a command into one directory) each rename a whole file.
    let tmp: PathBuf = dir.join(format!(
        ".{}.{}-{:016x}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id(),
        rand::random::<u64>()
    ));
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, mode);
    let mut f = opts.open(&tmp).map_err(io)?;
    let written = (|| {
        // The umask may have narrowed `mode`: set it exactly, on the file just made.
        #[cfg(unix)]
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.map_err(io)
}

/// The directory `path` is in: `.` for a bare file name (whose `parent()` is empty).
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Removes the temporary files [`write_file`] left in `dir` when its process died mid-write
/// (`.NAME.<pid>-<random>.tmp` whose process is gone; a key's holds the whole key): at a start,
/// before the state directory is written. A file of a process still running is left alone.
pub fn remove_leftover_temporaries(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for name in entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
    {
        let Some(pid) = temporary_of(&name) else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            if let Err(e) = fs::remove_file(dir.join(&name)) {
                tracing::warn!(file = %name, error = %e, "cannot remove a temporary file a write cut short left");
            }
        }
    }
}

/// The pid in a temporary file name of [`write_file`]'s, if `name` is one.
fn temporary_of(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (_, tail) = rest.rsplit_once('.')?;
    let (pid, random) = tail.split_once('-')?;
    (random.len() == 16 && random.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| pid.parse().ok())
        .flatten()
}

fn read(path: &Path) -> Result<Vec<u8>, IdentityError> {
    fs::read(path).map_err(|source| IdentityError::Io {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// Nothing planted in the directory (a link at the name a temporary file once had) makes
    /// the write, or its mode, land on another file; no temporary file is left behind.
    #[test]
    fn a_write_lands_on_its_own_path_only_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        fs::write(&target, b"theirs").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).unwrap();
        let path = dir.path().join("status.json");
        std::os::unix::fs::symlink(&target, dir.path().join(".status.json.tmp")).unwrap();
        write_file(&path, b"ours", 0o644).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"theirs");
        assert_eq!(mode(&target), 0o600);
        assert!(!fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read(&path).unwrap(), b"ours");
        assert_eq!(mode(&path), 0o644);
        write_durable(&path, b"again", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"again");
        assert_eq!(mode(&path), 0o600);
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [".status.json.tmp", "elsewhere", "status.json"]);
    }

    /// A bare file name is written in the working directory, synced there too.
    #[test]
    fn a_bare_file_name_is_written_and_synced_in_the_working_directory() {
        assert_eq!(parent(Path::new("seen-ids")), Path::new("."));
        assert_eq!(parent(Path::new("/a/b")), Path::new("/a"));
        assert_eq!(parent(Path::new("a/b")), Path::new("a"));
    }

    /// What a crash mid-write left is removed at the next start; a running writer's is not.
    #[test]
    fn temporary_files_a_crash_left_are_removed_and_a_live_writers_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let dead = ".svid.key.0-00000000deadbeef.tmp";
        let live = format!(".status.json.{}-0123456789abcdef.tmp", std::process::id());
        for name in [
            dead,
            live.as_str(),
            ".svid.key.tmp",
            "svid.key",
            ".x.1-short.tmp",
        ] {
            fs::write(dir.path().join(name), b"k").unwrap();
        }
        remove_leftover_temporaries(dir.path());
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let mut want = vec![
            live,
            ".svid.key.tmp".into(),
            ".x.1-short.tmp".into(),
            "svid.key".into(),
        ];
        want.sort();
        assert_eq!(names, want);
    }

    /// Two writers of one path at once: every write succeeds, and the file is always one of
    /// them whole, never a mix or a cut.
    #[test]
    fn two_writers_of_one_path_each_rename_a_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bundle.pem");
        let writer = |byte: u8| {
            let path = path.clone();
            std::thread::spawn(move || {
                for _ in 0..200 {
                    write_file(&path, &[byte; 64 * 1024], 0o644).unwrap();
                    let now = fs::read(&path).unwrap();
                    assert_eq!(now.len(), 64 * 1024);
                    assert!(now.iter().all(|b| *b == now[0]), "a mixed file");
                }
            })
        };
        let (a, b) = (writer(b'a'), writer(b'b'));
        a.join().unwrap();
        b.join().unwrap();
    }
}
