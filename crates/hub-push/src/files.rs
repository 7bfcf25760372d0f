//! The files to upload: where their bytes come from, reading a folder into a file list, and the
//! per-file facts the protocol needs (size, first 512 bytes, sha256).

use std::borrow::Cow;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{HubError, Result, Step};

/// Where the bytes of a file to upload come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileSource {
    /// Bytes held in memory.
    Bytes(Vec<u8>),
    /// A file on the local disk: hashed first, then read again (streamed for LFS uploads).
    Path(PathBuf),
}

impl From<Vec<u8>> for FileSource {
    fn from(bytes: Vec<u8>) -> Self {
        FileSource::Bytes(bytes)
    }
}

impl From<&[u8]> for FileSource {
    fn from(bytes: &[u8]) -> Self {
        FileSource::Bytes(bytes.to_vec())
    }
}

impl From<&str> for FileSource {
    /// The UTF-8 bytes of the string (not a path: use a [`PathBuf`] or [`Path`] for that).
    fn from(text: &str) -> Self {
        FileSource::Bytes(text.as_bytes().to_vec())
    }
}

impl From<PathBuf> for FileSource {
    fn from(path: PathBuf) -> Self {
        FileSource::Path(path)
    }
}

impl From<&Path> for FileSource {
    fn from(path: &Path) -> Self {
        FileSource::Path(path.to_path_buf())
    }
}

/// Which entries of a folder [`read_folder`] keeps. The default keeps the visible files directly
/// in the folder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FolderOptions {
    /// Descend into subfolders (their files get `sub/dir/name` paths in the repository).
    pub recursive: bool,
    /// Keep entries whose name starts with `.` (a `.git` folder is skipped all the same).
    pub include_hidden: bool,
}

/// Lists the files of `dir` as `(path_in_repo, FileSource::Path)` pairs, sorted by path, with `/`
/// separators. Hidden entries and subfolders are skipped unless `options` asks for them;
/// symbolic links are followed.
pub fn read_folder(dir: &Path, options: FolderOptions) -> Result<Vec<(String, FileSource)>> {
    let mut files = Vec::new();
    collect(dir, "", options, &mut files)?;
    files.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(files)
}

fn collect(
    dir: &Path,
    prefix: &str,
    options: FolderOptions,
    out: &mut Vec<(String, FileSource)>,
) -> Result<()> {
    let io_err = |path: &Path, source| HubError::Io {
        step: Step::ReadFiles,
        path: path.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            return Err(HubError::InvalidArgument {
                argument: "folder",
                problem: format!(
                    "{} is not valid UTF-8; expected UTF-8 file names",
                    path.display()
                ),
            });
        };
        if name.starts_with('.') && (!options.include_hidden || name == ".git") {
            continue;
        }
        let metadata = std::fs::metadata(&path).map_err(|e| io_err(&path, e))?;
        let path_in_repo = format!("{prefix}{name}");
        if metadata.is_dir() {
            if options.recursive {
                collect(&path, &format!("{path_in_repo}/"), options, out)?;
            }
        } else if metadata.is_file() {
            out.push((path_in_repo, FileSource::Path(path)));
        }
    }
    Ok(())
}

/// A file to upload with what the protocol needs to know about it.
#[derive(Debug)]
pub(crate) struct PreparedFile<'a> {
    /// Path in the repository.
    pub path: &'a str,
    pub source: &'a FileSource,
    pub size: u64,
    /// The first 512 bytes (what preupload sniffs).
    pub sample: Vec<u8>,
    pub sha256: [u8; 32],
}

impl<'a> PreparedFile<'a> {
    /// Reads `source` once: size, sample, sha256.
    pub fn prepare(path: &'a str, source: &'a FileSource) -> Result<Self> {
        let (size, sample, sha256) = match source {
            FileSource::Bytes(bytes) => {
                let sample = bytes[..bytes.len().min(512)].to_vec();
                (bytes.len() as u64, sample, Sha256::digest(bytes).into())
            }
            FileSource::Path(local) => {
                let io_err = |source| HubError::Io {
                    step: Step::ReadFiles,
                    path: local.clone(),
                    source,
                };
                let mut file = File::open(local).map_err(io_err)?;
                let mut hasher = Sha256::new();
                let mut sample = Vec::with_capacity(512);
                let mut size = 0u64;
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    let n = file.read(&mut buf).map_err(io_err)?;
                    if n == 0 {
                        break;
                    }
                    if sample.len() < 512 {
                        let take = (512 - sample.len()).min(n);
                        sample.extend_from_slice(&buf[..take]);
                    }
                    hasher.update(&buf[..n]);
                    size += n as u64;
                }
                (size, sample, hasher.finalize().into())
            }
        };
        Ok(Self {
            path,
            source,
            size,
            sample,
            sha256,
        })
    }

    /// The sha256 as lowercase hex (the Git LFS oid).
    pub fn oid(&self) -> String {
        hex(&self.sha256)
    }

    /// The whole content (for regular files, sent inline in the commit).
    pub fn read_all(&self) -> Result<Cow<'a, [u8]>> {
        match self.source {
            FileSource::Bytes(bytes) => Ok(Cow::Borrowed(bytes)),
            FileSource::Path(_) => {
                let mut bytes = Vec::with_capacity(self.size as usize);
                self.reader(0, self.size)?
                    .read_to_end(&mut bytes)
                    .map_err(|e| self.io_err(e))?;
                self.check_len(bytes.len() as u64)?;
                Ok(Cow::Owned(bytes))
            }
        }
    }

    /// `len` bytes from `offset` (an LFS upload or one part of it).
    pub fn reader(&self, offset: u64, len: u64) -> Result<Box<dyn Read + 'a>> {
        match self.source {
            FileSource::Bytes(bytes) => {
                let start = (offset as usize).min(bytes.len());
                let end = (offset.saturating_add(len) as usize).min(bytes.len());
                Ok(Box::new(&bytes[start..end]))
            }
            FileSource::Path(local) => {
                let mut file = File::open(local).map_err(|e| self.io_err(e))?;
                file.seek(SeekFrom::Start(offset))
                    .map_err(|e| self.io_err(e))?;
                Ok(Box::new(file.take(len)))
            }
        }
    }

    fn check_len(&self, len: u64) -> Result<()> {
        if len == self.size {
            return Ok(());
        }
        Err(self.io_err(std::io::Error::other(format!(
            "file changed while uploading: {len} bytes now, {} when hashed",
            self.size
        ))))
    }

    fn io_err(&self, source: std::io::Error) -> HubError {
        let path = match self.source {
            FileSource::Path(p) => p.clone(),
            FileSource::Bytes(_) => PathBuf::from(self.path),
        };
        HubError::Io {
            step: Step::ReadFiles,
            path,
            source,
        }
    }
}

/// Lowercase hex of bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_bytes_and_path_agree() {
        let data: Vec<u8> = (0..2000u32).map(|i| (i * 7) as u8).collect();
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("f.bin");
        std::fs::write(&local, &data).unwrap();
        let (a, b) = (FileSource::Bytes(data.clone()), FileSource::Path(local));
        let pa = PreparedFile::prepare("f.bin", &a).unwrap();
        let pb = PreparedFile::prepare("f.bin", &b).unwrap();
        assert_eq!(
            (pa.size, &pa.sample, pa.sha256),
            (pb.size, &pb.sample, pb.sha256)
        );
        assert_eq!(pa.sample.len(), 512);
        assert_eq!(pa.oid().len(), 64);
        assert_eq!(&*pb.read_all().unwrap(), &data[..]);
        let mut part = Vec::new();
        pb.reader(1000, 600)
            .unwrap()
            .read_to_end(&mut part)
            .unwrap();
        assert_eq!(part, &data[1000..1600]);
    }

    #[test]
    fn sha256_of_empty_is_the_known_value() {
        let empty = FileSource::Bytes(Vec::new());
        let p = PreparedFile::prepare("e", &empty).unwrap();
        assert_eq!(
            p.oid(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn missing_file_names_the_step_and_path() {
        let missing = FileSource::Path(PathBuf::from("/nonexistent/x.bin"));
        let err = PreparedFile::prepare("x.bin", &missing).unwrap_err();
        assert_eq!(err.step(), Some(Step::ReadFiles));
        assert!(err.to_string().contains("/nonexistent/x.bin"), "{err}");
    }
}
