//! Making `libnccl.so` resolvable for the dynamic loader.
//!
//! cudarc's loader opens `libnccl.so` (and `libnccl.so.<major>` guesses), but NCCL's packages
//! and its pip wheel `nvidia-nccl-cu12` ship `libnccl.so.2` only (the unversioned name comes
//! with the `-dev` package). [`nccl_loader_dir`] finds NCCL and, where needed, makes a directory
//! holding a `libnccl.so` symlink to it, for `LD_LIBRARY_PATH`.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

/// The names of the NCCL library searched for, unversioned first.
const NAMES: [&str; 2] = ["libnccl.so", "libnccl.so.2"];

/// The first directory holding `libnccl.so` or `libnccl.so.2`, searched in the directories of
/// `LD_LIBRARY_PATH`, `/usr/lib/x86_64-linux-gnu`, `/usr/local/cuda/lib64`, then the
/// `nvidia/nccl/lib` of Python's site-packages (`/usr/lib/python3*/{site,dist}-packages`,
/// `/usr/local/lib/python3*/{site,dist}-packages`, `~/.local/lib/python3*/site-packages`,
/// `$VIRTUAL_ENV/lib/python3*/site-packages`). Runs nothing; only looks at the file system.
pub fn nccl_library_dir() -> Option<PathBuf> {
    let get = |name: &str| std::env::var_os(name).map(PathBuf::from);
    first_with_nccl(&search_dirs(get))
}

/// A directory in which `libnccl.so` resolves, for the front of `LD_LIBRARY_PATH`; `None` when
/// NCCL is not found. That is [`nccl_library_dir`] when it holds `libnccl.so`, else `cache`
/// holding a symlink `libnccl.so -> <found>/libnccl.so.2` (created atomically, so concurrent
/// launchers agree).
pub fn nccl_loader_dir(cache: &Path) -> Result<Option<PathBuf>> {
    loader_dir_for(nccl_library_dir(), cache)
}

/// [`nccl_loader_dir`] for a known NCCL directory.
fn loader_dir_for(found: Option<PathBuf>, cache: &Path) -> Result<Option<PathBuf>> {
    let Some(found) = found else {
        return Ok(None);
    };
    if found.join(NAMES[0]).exists() {
        return Ok(Some(found));
    }
    let target = found.join(NAMES[1]);
    let link = cache.join(NAMES[0]);
    if fs::read_link(&link).is_ok_and(|t| t == target) {
        return Ok(Some(cache.to_path_buf()));
    }
    let link_err = |source| Error::NcclLink {
        link: link.clone(),
        target: target.clone(),
        source,
    };
    fs::create_dir_all(cache).map_err(link_err)?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = cache.join(format!(".libnccl.so.{}.{nanos}", std::process::id()));
    std::os::unix::fs::symlink(&target, &tmp).map_err(link_err)?;
    fs::rename(&tmp, &link).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        link_err(e)
    })?;
    Ok(Some(cache.to_path_buf()))
}

/// The first of `dirs` holding one of [`NAMES`] (a dangling symlink does not count).
fn first_with_nccl(dirs: &[PathBuf]) -> Option<PathBuf> {
    dirs.iter()
        .find(|d| NAMES.iter().any(|n| d.join(n).exists()))
        .cloned()
}

/// The directories searched, in order, given the environment (`LD_LIBRARY_PATH`, `HOME`,
/// `VIRTUAL_ENV`) through `get`.
fn search_dirs(get: impl Fn(&str) -> Option<PathBuf>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = get("LD_LIBRARY_PATH")
        .map(|v| {
            std::env::split_paths(&v)
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        })
        .unwrap_or_default();
    dirs.push("/usr/lib/x86_64-linux-gnu".into());
    dirs.push("/usr/local/cuda/lib64".into());
    let mut site_roots: Vec<(PathBuf, &[&str])> = vec![
        ("/usr/lib".into(), &["site-packages", "dist-packages"]),
        ("/usr/local/lib".into(), &["site-packages", "dist-packages"]),
    ];
    if let Some(home) = get("HOME") {
        site_roots.push((home.join(".local/lib"), &["site-packages"]));
    }
    if let Some(venv) = get("VIRTUAL_ENV") {
        // A virtual environment is the user's choice: search it before the system's Pythons.
        site_roots.insert(0, (venv.join("lib"), &["site-packages"]));
    }
    for (root, kinds) in site_roots {
        for python in python_dirs(&root) {
            for kind in kinds {
                dirs.push(python.join(kind).join("nvidia/nccl/lib"));
            }
        }
    }
    dirs
}

/// `root/python3*`, newest-looking name first.
fn python_dirs(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs.reverse();
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, b"not really a library").unwrap();
    }

    #[test]
    fn search_finds_a_venv_wheel_and_ld_library_path_dirs_first() {
        let t = test_support::fresh_temp_dir("data-parallel", "nccl-search");
        let venv = t.join("venv");
        let wheel = venv.join("lib/python3.11/site-packages/nvidia/nccl/lib");
        touch(&wheel.join("libnccl.so.2"));
        let ld_a = t.join("a");
        let ld_b = t.join("b");
        fs::create_dir_all(&ld_a).unwrap();
        fs::create_dir_all(&ld_b).unwrap();
        let ld = std::env::join_paths([&ld_a, &ld_b]).unwrap();
        let get = |name: &str| match name {
            "LD_LIBRARY_PATH" => Some(PathBuf::from(&ld)),
            "VIRTUAL_ENV" => Some(venv.clone()),
            _ => None,
        };
        let dirs = search_dirs(get);
        assert_eq!(&dirs[..2], &[ld_a.clone(), ld_b.clone()]);
        let pos = dirs
            .iter()
            .position(|d| *d == wheel)
            .expect("venv wheel dir searched");
        assert!(
            pos < dirs
                .iter()
                .position(|d| d.starts_with("/usr/lib/python3"))
                .unwrap_or(usize::MAX)
        );

        assert_eq!(
            first_with_nccl(&[ld_a.clone(), wheel.clone()]),
            Some(wheel.clone())
        );
        touch(&ld_b.join("libnccl.so"));
        assert_eq!(
            first_with_nccl(&[ld_a.clone(), ld_b.clone(), wheel]),
            Some(ld_b)
        );
        assert_eq!(first_with_nccl(&[ld_a]), None);
    }

    #[test]
    fn a_dangling_symlink_does_not_count() {
        let t = test_support::fresh_temp_dir("data-parallel", "nccl-dangling");
        std::os::unix::fs::symlink(t.join("missing"), t.join("libnccl.so.2")).unwrap();
        assert_eq!(first_with_nccl(std::slice::from_ref(&t)), None);
    }

    #[test]
    fn loader_dir_links_libnccl_so_to_the_versioned_library_once() {
        let t = test_support::fresh_temp_dir("data-parallel", "nccl-loader");
        let found = t.join("wheel");
        touch(&found.join("libnccl.so.2"));
        let cache = t.join("cache");
        for _ in 0..2 {
            let dir = loader_dir_for(Some(found.clone()), &cache).unwrap();
            assert_eq!(dir.as_deref(), Some(cache.as_path()));
            assert_eq!(
                fs::read_link(cache.join("libnccl.so")).unwrap(),
                found.join("libnccl.so.2")
            );
            assert!(cache.join("libnccl.so").exists(), "the link resolves");
        }
        assert_eq!(
            fs::read_dir(&cache).unwrap().count(),
            1,
            "no temporary links left"
        );

        touch(&found.join("libnccl.so"));
        assert_eq!(
            loader_dir_for(Some(found.clone()), &cache).unwrap(),
            Some(found)
        );
        assert_eq!(loader_dir_for(None, &cache).unwrap(), None);
    }

    #[test]
    fn an_unwritable_cache_is_an_error_naming_the_link() {
        let t = test_support::fresh_temp_dir("data-parallel", "nccl-unwritable");
        let found = t.join("wheel");
        touch(&found.join("libnccl.so.2"));
        let file = t.join("a-file");
        touch(&file);
        let e = loader_dir_for(Some(found), &file.join("cache")).unwrap_err();
        assert!(matches!(e, Error::NcclLink { .. }), "{e}");
        assert!(e.to_string().contains("libnccl.so"), "{e}");
    }
}
