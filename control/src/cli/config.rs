//! Which config file `sluicectl` uses: `--config` or `$SLUICECTL_CONFIG` (clap reads
//! both into one value), else the first existing of the per-user file and the one
//! `sluice-control` writes for the first admin.

use std::path::{Path, PathBuf};

use super::error::CliError;

/// Written by `sluice-control` with its default `--admin-config`.
pub const SYSTEM_CONFIG: &str = "/etc/sluice/admin.conf";
/// Under the user's home directory.
pub const USER_CONFIG: &str = ".config/sluice/config";

/// The files tried, in order, when none is given.
pub fn default_candidates(home: Option<&Path>) -> Vec<PathBuf> {
    home.map(|home| home.join(USER_CONFIG))
        .into_iter()
        .chain([PathBuf::from(SYSTEM_CONFIG)])
        .collect()
}

/// `explicit` as is (reading it reports a missing file), else the first candidate
/// for which `exists` holds; the error lists every path tried.
pub fn resolve(
    explicit: Option<&Path>,
    home: Option<&Path>,
    exists: impl Fn(&Path) -> bool,
) -> Result<PathBuf, CliError> {
    if let Some(path) = explicit {
        return Ok(path.to_owned());
    }
    let tried = default_candidates(home);
    match tried.iter().find(|path| exists(path)) {
        Some(path) => Ok(path.clone()),
        None => Err(CliError::NoConfig { tried }),
    }
}

/// [`resolve`] against this process's environment and file system.
pub fn resolve_here(explicit: Option<&Path>) -> Result<PathBuf, CliError> {
    let home = std::env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .map(PathBuf::from);
    resolve(explicit, home.as_deref(), Path::exists)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_path_wins_even_if_missing() {
        let path = resolve(Some(Path::new("/tmp/x.conf")), None, |_| false).expect("explicit");
        assert_eq!(path, Path::new("/tmp/x.conf"));
    }

    #[test]
    fn the_user_file_comes_before_the_system_file() {
        let home = Path::new("/home/alice");
        let path = resolve(None, Some(home), |_| true).expect("both exist");
        assert_eq!(path, Path::new("/home/alice/.config/sluice/config"));

        let path =
            resolve(None, Some(home), |p| p == Path::new(SYSTEM_CONFIG)).expect("system exists");
        assert_eq!(path, Path::new(SYSTEM_CONFIG));

        let path = resolve(None, None, |_| true).expect("no home");
        assert_eq!(path, Path::new(SYSTEM_CONFIG));
    }

    #[test]
    fn the_error_lists_every_path_tried() {
        let error =
            resolve(None, Some(Path::new("/home/alice")), |_| false).expect_err("nothing exists");
        assert_eq!(
            error.to_string(),
            "no config file found (tried /home/alice/.config/sluice/config, \
             /etc/sluice/admin.conf); pass --config FILE or set SLUICECTL_CONFIG"
        );
    }
}
