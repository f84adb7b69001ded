//! A small HTTP/1.1 server on 127.0.0.1 for the download tests.
//!
//! It serves byte strings by path, honours `Range: bytes=N-` requests, logs
//! every request, and can be told to break off a transfer in the middle of
//! the body or to ignore `Range`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// How the server answers requests for one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Serve the body, honouring `Range`.
    Normal,
    /// On the first request, announce the full length but close the
    /// connection after this many body bytes; afterwards behave normally.
    DropFirstAfter(usize),
    /// On every request, close the connection after this many body bytes.
    AlwaysDropAfter(usize),
    /// Answer 200 with the whole body even when a `Range` was asked for.
    IgnoreRange,
}

/// One request the server received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The request path.
    pub path: String,
    /// The `Range` header, if any.
    pub range: Option<String>,
}

/// A served file.
#[derive(Debug)]
struct Served {
    body: Vec<u8>,
    behaviour: Behaviour,
    requests: usize,
}

/// State shared with the server thread.
#[derive(Debug, Default)]
struct State {
    files: HashMap<String, Served>,
    log: Vec<Request>,
}

/// A running test server; its thread ends with the test process.
#[derive(Debug)]
pub struct TestServer {
    base: String,
    state: Arc<Mutex<State>>,
}

impl TestServer {
    /// Starts a server on a free port of 127.0.0.1.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let base = format!("http://{}", listener.local_addr().expect("local address"));
        let state = Arc::new(Mutex::new(State::default()));
        let shared = Arc::clone(&state);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                // A client that goes away mid-answer is part of some tests.
                let _ = handle(stream, &shared);
            }
        });
        Self { base, state }
    }

    /// Serves `body` at `path` with the given behaviour.
    pub fn serve(&self, path: &str, body: Vec<u8>, behaviour: Behaviour) {
        let served = Served {
            body,
            behaviour,
            requests: 0,
        };
        self.lock().files.insert(path.to_owned(), served);
    }

    /// Returns the URL of `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Returns the requests received so far.
    pub fn requests(&self) -> Vec<Request> {
        self.lock().log.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// Answers one request on `stream`, then closes it.
fn handle(stream: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_owned();
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("range") {
                range = Some(value.trim().to_owned());
            }
        }
    }

    let (status, headers, body) = {
        let mut state = state.lock().unwrap_or_else(|poison| poison.into_inner());
        state.log.push(Request {
            path: path.clone(),
            range: range.clone(),
        });
        match state.files.get_mut(&path) {
            None => ("404 Not Found", Vec::new(), (b"not found".to_vec(), None)),
            Some(served) => {
                served.requests += 1;
                answer(served, range.as_deref())
            }
        }
    };
    let (body, cut) = body;
    let mut stream = stream;
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for header in &headers {
        head.push_str(header);
        head.push_str("\r\n");
    }
    if !headers.iter().any(|h| h.starts_with("Content-Length")) {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    let sent = cut.map_or(body.len(), |cut| cut.min(body.len()));
    stream.write_all(&body[..sent])?;
    stream.flush()?;
    stream.shutdown(std::net::Shutdown::Both)?;
    Ok(())
}

/// Chooses the status, headers, body and cut-off point for a request.
#[allow(clippy::type_complexity)]
fn answer(
    served: &Served,
    range: Option<&str>,
) -> (&'static str, Vec<String>, (Vec<u8>, Option<usize>)) {
    let len = served.body.len();
    let cut = match served.behaviour {
        Behaviour::DropFirstAfter(cut) if served.requests == 1 => Some(cut),
        Behaviour::AlwaysDropAfter(cut) => Some(cut),
        _ => None,
    };
    let start = match (served.behaviour, range) {
        (Behaviour::IgnoreRange, _) | (_, None) => None,
        (_, Some(range)) => range
            .strip_prefix("bytes=")
            .and_then(|spec| spec.strip_suffix('-'))
            .and_then(|start| start.parse::<usize>().ok()),
    };
    match start {
        None => (
            "200 OK",
            vec![format!("Content-Length: {len}")],
            (served.body.clone(), cut),
        ),
        Some(start) if start >= len => (
            "416 Range Not Satisfiable",
            vec![format!("Content-Range: bytes */{len}")],
            (Vec::new(), None),
        ),
        Some(start) => (
            "206 Partial Content",
            vec![
                format!("Content-Range: bytes {start}-{}/{len}", len - 1),
                format!("Content-Length: {}", len - start),
            ],
            (served.body[start..].to_vec(), cut),
        ),
    }
}
