//! A resumable HTTP(S) downloader with sha256 verification.
//!
//! A download streams into `<dest>.part`. When a run is interrupted, the next
//! attempt (in the same run, or a later one) asks the server for the missing
//! bytes with an HTTP `Range` header; a server that ignores the header and
//! answers 200 makes the download start over cleanly. The sha256 is computed
//! while the bytes arrive (the bytes already on disk are hashed first), and
//! only a complete file whose digest checks out is renamed to `<dest>`; a file
//! whose digest differs is removed. An existing `<dest>` that verifies is not
//! downloaded again.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};

/// What a downloaded file must hash to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksum {
    /// The full sha256, in lower-case hex.
    Sha256(String),
    /// The first hex digits of the sha256, as torchvision's file names carry them.
    Sha256Prefix(String),
    /// No documented checksum: the transfer is only checked to be complete
    /// (its length matches what the server announced).
    Unknown,
}

impl Checksum {
    /// Tells whether `digest` (lower-case hex sha256) satisfies this checksum.
    fn accepts(&self, digest: &str) -> bool {
        match self {
            Checksum::Sha256(expected) => digest == expected.to_ascii_lowercase(),
            Checksum::Sha256Prefix(prefix) => digest.starts_with(&prefix.to_ascii_lowercase()),
            Checksum::Unknown => true,
        }
    }

    /// Describes the expected digest for error messages.
    fn expected(&self) -> String {
        match self {
            Checksum::Sha256(expected) => format!("sha256 {expected}"),
            Checksum::Sha256Prefix(prefix) => format!("a sha256 starting with {prefix}"),
            Checksum::Unknown => "any sha256".to_owned(),
        }
    }
}

/// What [`Downloader::fetch`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The file was already in place and verified; nothing was requested.
    AlreadyPresent,
    /// The file was downloaded (perhaps resuming an earlier partial transfer).
    Downloaded {
        /// The sha256 of the file, in lower-case hex.
        sha256: String,
    },
}

/// Settings for HTTP transfers.
#[derive(Debug, Clone)]
pub struct Downloader {
    /// How many times one download is tried before giving up; interrupted
    /// transfers resume where they stopped.
    pub attempts: u32,
    /// The limit for connecting to the server.
    pub connect_timeout: Duration,
    /// The limit for any single read, so that a stalled transfer fails.
    pub read_timeout: Duration,
    /// The pause between attempts.
    pub retry_pause: Duration,
    /// Whether to draw a progress bar on standard error (only when it is a terminal).
    pub progress: bool,
}

impl Default for Downloader {
    fn default() -> Self {
        Self {
            attempts: 5,
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
            retry_pause: Duration::from_secs(2),
            progress: true,
        }
    }
}

/// How one attempt ended.
enum Attempt {
    /// The file is complete and verified.
    Done(String),
    /// The transfer stopped early; the partial file is kept for the next attempt.
    Interrupted(anyhow::Error),
}

/// A parsed `Content-Range: bytes START-END/TOTAL` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ContentRange {
    start: u64,
    total: Option<u64>,
}

impl Downloader {
    /// Makes sure `dest` holds the file at `url`, verified against `checksum`.
    ///
    /// An existing `dest` that verifies is kept and nothing is requested; one
    /// that does not is removed and downloaded again. The partial transfer
    /// lives in `<dest>.part` and is resumed by the next attempt or run.
    pub fn fetch(&self, url: &str, dest: &Path, checksum: &Checksum) -> Result<Outcome> {
        if dest.is_file() {
            if *checksum == Checksum::Unknown {
                // The file got its name only after a complete transfer.
                return Ok(Outcome::AlreadyPresent);
            }
            let digest = sha256_file(dest)?;
            if checksum.accepts(&digest) {
                return Ok(Outcome::AlreadyPresent);
            }
            eprintln!(
                "xtask: {} has sha256 {digest}, but {} was expected; downloading it again",
                dest.display(),
                checksum.expected()
            );
            fs::remove_file(dest)
                .with_context(|| format!("could not remove {}", dest.display()))?;
        }
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("could not create the folder {}", parent.display()))?;
        }
        let part = part_path(dest);
        let agent = self.agent(url);
        let attempts = self.attempts.max(1);
        let mut last_error = None;
        for attempt in 1..=attempts {
            if attempt > 1 {
                std::thread::sleep(self.retry_pause);
            }
            match self.attempt(&agent, url, dest, &part, checksum)? {
                Attempt::Done(sha256) => return Ok(Outcome::Downloaded { sha256 }),
                Attempt::Interrupted(err) => {
                    eprintln!(
                        "xtask: the download of {url} stopped (attempt {attempt} of {attempts}): {err:#}"
                    );
                    last_error = Some(err);
                }
            }
        }
        let err = last_error.unwrap_or_else(|| anyhow::anyhow!("no attempt was made"));
        let kept = if part.is_file() {
            format!(
                "; the partial file {} is kept and the next run resumes it",
                part.display()
            )
        } else {
            String::new()
        };
        Err(err.context(format!(
            "could not download {url} in {attempts} attempts{kept}"
        )))
    }

    /// Builds an HTTP agent; loopback addresses bypass any proxy from the environment.
    fn agent(&self, url: &str) -> ureq::Agent {
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(self.connect_timeout))
            .timeout_recv_response(Some(self.read_timeout))
            .timeout_per_read(Some(self.read_timeout))
            .user_agent(concat!("patchcore-xtask/", env!("CARGO_PKG_VERSION")));
        if is_loopback(url) {
            config = config.proxy(None);
        }
        config.build().into()
    }

    /// Makes one request, appending to `part` or starting it over.
    ///
    /// Errors that another attempt cannot fix (HTTP errors, a checksum
    /// mismatch, the local disk) are returned as `Err`; a transfer that stops
    /// early is returned as [`Attempt::Interrupted`].
    fn attempt(
        &self,
        agent: &ureq::Agent,
        url: &str,
        dest: &Path,
        part: &Path,
        checksum: &Checksum,
    ) -> Result<Attempt> {
        let have = match fs::metadata(part) {
            Ok(meta) => meta.len(),
            Err(err) if err.kind() == io::ErrorKind::NotFound => 0,
            Err(err) => {
                return Err(err).with_context(|| format!("could not inspect {}", part.display()))
            }
        };
        let mut request = agent.get(url);
        if have > 0 {
            request = request.header("Range", format!("bytes={have}-"));
        }
        let response = match request.call() {
            Ok(response) => response,
            Err(err) => {
                return Ok(Attempt::Interrupted(
                    anyhow::Error::new(err).context(format!("GET {url} failed")),
                ))
            }
        };
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
        };
        let content_range = header("content-range");
        let content_length =
            header("content-length").and_then(|len| len.trim().parse::<u64>().ok());

        let (start, total) = match status {
            200 => (0, content_length),
            206 => {
                let range = content_range
                    .as_deref()
                    .and_then(parse_content_range)
                    .with_context(|| {
                        format!(
                            "GET {url} answered 206 with an unreadable Content-Range {content_range:?}"
                        )
                    })?;
                if range.start != have {
                    // The server sent another part than asked for: start over.
                    remove_if_exists(part)?;
                    return Ok(Attempt::Interrupted(anyhow::anyhow!(
                        "GET {url} resumed at byte {} instead of {have}; starting over",
                        range.start
                    )));
                }
                (have, range.total)
            }
            416 if have > 0 => {
                // The range starts at or past the end: the part may be complete already.
                let total = content_range
                    .as_deref()
                    .and_then(|value| value.trim().strip_prefix("bytes */"))
                    .and_then(|total| total.trim().parse::<u64>().ok());
                if total == Some(have) {
                    return self.finish(part, dest, checksum, hash_existing(part)?);
                }
                remove_if_exists(part)?;
                return Ok(Attempt::Interrupted(anyhow::anyhow!(
                    "GET {url} refused to resume at byte {have} (HTTP 416); starting over"
                )));
            }
            _ => {
                let text = response.status().canonical_reason().unwrap_or("");
                let err = anyhow::anyhow!("GET {url} answered HTTP {status} {text}");
                if status >= 500 || status == 408 || status == 429 {
                    return Ok(Attempt::Interrupted(err));
                }
                return Err(err);
            }
        };

        // Hash what is already on disk, then open the part for appending.
        let (mut hasher, mut file) = if start == 0 {
            let file = File::create(part)
                .with_context(|| format!("could not create {}", part.display()))?;
            (Sha256::new(), file)
        } else {
            let hasher = hash_existing(part)?;
            let file = OpenOptions::new()
                .append(true)
                .open(part)
                .with_context(|| format!("could not open {} for appending", part.display()))?;
            (hasher, file)
        };

        let bar = self.progress_bar(dest, start, total);
        let mut body = response.into_body().into_reader();
        let mut writer = BufWriter::with_capacity(1 << 20, &mut file);
        let mut buffer = vec![0u8; 1 << 16];
        let mut received = start;
        let read_error = loop {
            match body.read(&mut buffer) {
                Ok(0) => break None,
                Ok(read) => {
                    writer
                        .write_all(&buffer[..read])
                        .with_context(|| format!("could not write {}", part.display()))?;
                    hasher.update(&buffer[..read]);
                    received += read as u64;
                    bar.set_position(received);
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => break Some(err),
            }
        };
        writer
            .flush()
            .with_context(|| format!("could not write {}", part.display()))?;
        drop(writer);
        bar.finish_and_clear();
        if let Some(err) = read_error {
            return Ok(Attempt::Interrupted(anyhow::Error::new(err).context(
                format!("the transfer of {url} broke off after {received} bytes"),
            )));
        }
        if let Some(total) = total {
            if received != total {
                return Ok(Attempt::Interrupted(anyhow::anyhow!(
                    "the transfer of {url} ended after {received} of {total} bytes"
                )));
            }
        }
        file.sync_all()
            .with_context(|| format!("could not write {}", part.display()))?;
        drop(file);
        self.finish(part, dest, checksum, hasher)
    }

    /// Verifies the complete `part` and renames it to `dest`, or removes it.
    fn finish(
        &self,
        part: &Path,
        dest: &Path,
        checksum: &Checksum,
        hasher: Sha256,
    ) -> Result<Attempt> {
        let digest = to_hex(&hasher.finalize());
        if !checksum.accepts(&digest) {
            remove_if_exists(part)?;
            bail!(
                "checksum mismatch for {}: expected {}, got sha256 {digest}; \
                 the corrupt download was removed",
                dest.display(),
                checksum.expected()
            );
        }
        fs::rename(part, dest).with_context(|| {
            format!("could not rename {} to {}", part.display(), dest.display())
        })?;
        Ok(Attempt::Done(digest))
    }

    /// Returns a progress bar for the transfer, hidden unless wanted.
    fn progress_bar(&self, dest: &Path, start: u64, total: Option<u64>) -> ProgressBar {
        if !self.progress {
            return ProgressBar::hidden();
        }
        let bar = match total {
            Some(total) => ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr()),
            None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
        };
        let template = if total.is_some() {
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
        } else {
            "{msg} {bytes} {bytes_per_sec}"
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        let name = dest
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        bar.set_message(name);
        bar.set_position(start);
        bar
    }
}

/// Returns `<dest>.part`, where a transfer in progress lives.
pub fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.as_os_str().to_owned();
    name.push(".part");
    PathBuf::from(name)
}

/// Parses `bytes START-END/TOTAL` (TOTAL may be `*`).
fn parse_content_range(value: &str) -> Option<ContentRange> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let start = start.trim().parse::<u64>().ok()?;
    let end = end.trim().parse::<u64>().ok()?;
    if end < start {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        total => Some(total.parse::<u64>().ok()?),
    };
    Some(ContentRange { start, total })
}

/// Tells whether the URL's host is a loopback address.
fn is_loopback(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let host = if let Some(bracketed) = host.strip_prefix('[') {
        bracketed.split(']').next().unwrap_or("")
    } else {
        host.split(':').next().unwrap_or("")
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Removes `path` if it exists.
fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("could not remove {}", path.display())),
    }
}

/// Feeds the file at `path` into a fresh sha256 hasher.
fn hash_existing(path: &Path) -> Result<Sha256> {
    let file = File::open(path).with_context(|| format!("could not open {}", path.display()))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    io::copy(&mut reader, &mut hasher)
        .with_context(|| format!("could not read {}", path.display()))?;
    Ok(hasher)
}

/// Returns the sha256 of the file at `path`, in lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    Ok(to_hex(&hash_existing(path)?.finalize()))
}

/// Formats bytes as lower-case hex.
pub fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut hex, byte| {
        // Writing to a String cannot fail.
        let _ = write!(hex, "{byte:02x}");
        hex
    })
}

/// Returns the lower-case hex sha256 of `bytes`.
#[cfg(test)]
pub fn sha256_hex(bytes: &[u8]) -> String {
    to_hex(&Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testserver::{Behaviour, TestServer};

    fn test_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("xtask-download-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn quiet() -> Downloader {
        Downloader {
            attempts: 3,
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(5),
            retry_pause: Duration::from_millis(10),
            progress: false,
        }
    }

    fn payload(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn parses_content_ranges() {
        assert_eq!(
            parse_content_range("bytes 100-199/200"),
            Some(ContentRange {
                start: 100,
                total: Some(200)
            })
        );
        assert_eq!(
            parse_content_range("bytes 0-9/*"),
            Some(ContentRange {
                start: 0,
                total: None
            })
        );
        assert_eq!(parse_content_range("bytes 9-0/10"), None);
        assert_eq!(parse_content_range("items 0-9/10"), None);
    }

    #[test]
    fn recognises_loopback_hosts() {
        assert!(is_loopback("http://127.0.0.1:8080/a"));
        assert!(is_loopback("http://localhost/a"));
        assert!(is_loopback("http://[::1]:80/a"));
        assert!(!is_loopback("https://example.org/a"));
        assert!(!is_loopback("not a url"));
    }

    #[test]
    fn full_download_is_verified_and_not_repeated() {
        let dir = test_dir("full");
        let body = payload(300_000);
        let server = TestServer::start();
        server.serve("/f.bin", body.clone(), Behaviour::Normal);
        let dest = dir.join("f.bin");
        let checksum = Checksum::Sha256(sha256_hex(&body));
        let outcome = quiet()
            .fetch(&server.url("/f.bin"), &dest, &checksum)
            .unwrap();
        assert_eq!(
            outcome,
            Outcome::Downloaded {
                sha256: sha256_hex(&body)
            }
        );
        assert_eq!(fs::read(&dest).unwrap(), body);
        assert!(!part_path(&dest).exists());
        assert_eq!(server.requests().len(), 1);
        assert_eq!(server.requests()[0].range, None);

        let again = quiet()
            .fetch(&server.url("/f.bin"), &dest, &checksum)
            .unwrap();
        assert_eq!(again, Outcome::AlreadyPresent);
        assert_eq!(
            server.requests().len(),
            1,
            "a verified file must not be requested again"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn interrupted_transfer_resumes_with_a_range_request() {
        let dir = test_dir("resume");
        let body = payload(200_000);
        let server = TestServer::start();
        server.serve("/f.bin", body.clone(), Behaviour::DropFirstAfter(70_000));
        let dest = dir.join("f.bin");
        let checksum = Checksum::Sha256(sha256_hex(&body));
        quiet()
            .fetch(&server.url("/f.bin"), &dest, &checksum)
            .unwrap();
        assert_eq!(fs::read(&dest).unwrap(), body);
        let requests = server.requests();
        assert_eq!(requests.len(), 2, "{requests:?}");
        assert_eq!(requests[0].range, None);
        assert_eq!(requests[1].range.as_deref(), Some("bytes=70000-"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_partial_file_from_an_earlier_run_is_resumed() {
        let dir = test_dir("earlier");
        let body = payload(50_000);
        let server = TestServer::start();
        server.serve("/f.bin", body.clone(), Behaviour::Normal);
        let dest = dir.join("f.bin");
        fs::write(part_path(&dest), &body[..12_345]).unwrap();
        let checksum = Checksum::Sha256(sha256_hex(&body));
        quiet()
            .fetch(&server.url("/f.bin"), &dest, &checksum)
            .unwrap();
        assert_eq!(fs::read(&dest).unwrap(), body);
        assert_eq!(server.requests()[0].range.as_deref(), Some("bytes=12345-"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_server_that_ignores_range_restarts_cleanly() {
        let dir = test_dir("ignore-range");
        let body = payload(40_000);
        let server = TestServer::start();
        server.serve("/f.bin", body.clone(), Behaviour::IgnoreRange);
        let dest = dir.join("f.bin");
        // A stale prefix that does not match the body must not survive.
        fs::write(part_path(&dest), vec![0xAAu8; 1000]).unwrap();
        let checksum = Checksum::Sha256(sha256_hex(&body));
        quiet()
            .fetch(&server.url("/f.bin"), &dest, &checksum)
            .unwrap();
        assert_eq!(fs::read(&dest).unwrap(), body);
        assert_eq!(server.requests()[0].range.as_deref(), Some("bytes=1000-"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_complete_part_file_is_finished_after_416() {
        let dir = test_dir("416");
        let body = payload(10_000);
        let server = TestServer::start();
        server.serve("/f.bin", body.clone(), Behaviour::Normal);
        let dest = dir.join("f.bin");
        fs::write(part_path(&dest), &body).unwrap();
        let checksum = Checksum::Sha256(sha256_hex(&body));
        quiet()
            .fetch(&server.url("/f.bin"), &dest, &checksum)
            .unwrap();
        assert_eq!(fs::read(&dest).unwrap(), body);
        assert_eq!(server.requests().len(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn checksum_mismatch_removes_the_file_and_names_both_digests() {
        let dir = test_dir("mismatch");
        let body = payload(20_000);
        let server = TestServer::start();
        server.serve("/f.bin", body.clone(), Behaviour::Normal);
        let dest = dir.join("f.bin");
        let wrong = "0".repeat(64);
        let err = quiet()
            .fetch(
                &server.url("/f.bin"),
                &dest,
                &Checksum::Sha256(wrong.clone()),
            )
            .unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("checksum mismatch"), "{text}");
        assert!(text.contains(&dest.display().to_string()), "{text}");
        assert!(text.contains(&wrong), "{text}");
        assert!(text.contains(&sha256_hex(&body)), "{text}");
        assert!(!dest.exists());
        assert!(!part_path(&dest).exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn http_errors_name_the_url_and_status() {
        let dir = test_dir("404");
        let server = TestServer::start();
        let url = server.url("/missing.bin");
        let err = quiet()
            .fetch(&url, &dir.join("missing.bin"), &Checksum::Unknown)
            .unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains(&url), "{text}");
        assert!(text.contains("HTTP 404"), "{text}");
        assert!(!dir.join("missing.bin").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn giving_up_keeps_the_partial_file_for_the_next_run() {
        let dir = test_dir("give-up");
        let body = payload(30_000);
        let server = TestServer::start();
        server.serve("/f.bin", body.clone(), Behaviour::AlwaysDropAfter(10_000));
        let dest = dir.join("f.bin");
        let checksum = Checksum::Sha256(sha256_hex(&body));
        let mut downloader = quiet();
        downloader.attempts = 2;
        let err = downloader
            .fetch(&server.url("/f.bin"), &dest, &checksum)
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("in 2 attempts; the partial file"),
            "{err:#}"
        );
        assert!(!dest.exists());
        let kept = fs::read(part_path(&dest)).unwrap();
        assert_eq!(kept, body[..kept.len()]);
        assert!(kept.len() >= 10_000);
        fs::remove_dir_all(&dir).unwrap();
    }
}
