//! A registry one round trip away, for `bench/run.sh`'s round-trip rows: an HTTP proxy that
//! holds every request for DELAY_MS before forwarding it to a local registry, and logs each
//! request with its start and end times, so the script can count requests and round trips.
//!
//! ```text
//! delay_proxy LISTEN_PORT UPSTREAM_HOST:PORT DELAY_MS LOG_FILE
//! delay_proxy report LOG_FILE      # prints "REQUESTS ROUND_TRIPS"
//! ```
//!
//! Faithful apart from the delay, and cheap, so that the wall time of a push through it is the
//! client's work plus the delays:
//! - keep-alive on both sides: each client connection has its own upstream connection, opened
//!   with its first request and reused, as a client's connection to a registry would be (one
//!   reopened once if the registry closed it while idle: nothing was processed on it);
//! - Nagle off and each answer written in one send (no delayed-ACK stalls);
//! - one thread per connection, plain blocking std I/O. The Python proxy this replaces spent
//!   5-40 ms of its own per request when 7 requests ran at once (its interpreter runs one
//!   thread at a time), so at a 0 ms delay a 30 ms push took 130 ms through it;
//! - Content-Length and chunked bodies both ways; answers are forwarded whole with
//!   Content-Length (the benchmark's blobs are small);
//! - a TLS ClientHello is closed at once, as a plain-http registry's port would refuse it, so
//!   clients that try https first fall back to http without waiting;
//! - the Host header is passed on, so the registry's Location headers name the proxy.
//!
//! Log lines: `START_NS END_NS METHOD PATH STATUS` (nanoseconds since the proxy started; the
//! query string is left out). `report` counts the requests and the round trips: the longest
//! chain of requests that ran one after another (each started after the previous one ended).

use std::io::{self, BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Hop-by-hop headers (RFC 9110 7.6.1), not forwarded; lengths are set by the proxy.
const HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "transfer-encoding",
    "proxy-connection",
    "te",
    "upgrade",
    "content-length",
];

fn main() {
    const USAGE: &str =
        "usage: delay_proxy LISTEN_PORT UPSTREAM_HOST:PORT DELAY_MS LOG_FILE | report LOG_FILE";
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        // `cargo test --all-targets` runs this binary with no arguments: say how to use it
        // and succeed (serving would never end).
        [] => {
            eprintln!("{USAGE}");
            Ok(())
        }
        [cmd, log] if cmd == "report" => report(log),
        [port, upstream, delay, log] => serve(port, upstream, delay, log),
        _ => Err(io::Error::other(USAGE)),
    };
    if let Err(e) = result {
        eprintln!("delay_proxy: {e}");
        std::process::exit(1);
    }
}

/// Requests and round trips in a log (see the module docs).
fn report(path: &str) -> io::Result<()> {
    let mut reqs: Vec<(u64, u64)> = std::fs::read_to_string(path)?
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
        })
        .collect();
    reqs.sort_unstable();
    let mut depth: Vec<u32> = Vec::with_capacity(reqs.len());
    for (i, &(start, _)) in reqs.iter().enumerate() {
        let d = (0..i)
            .filter(|&j| reqs[j].1 <= start)
            .map(|j| depth[j] + 1)
            .max()
            .unwrap_or(1);
        depth.push(d);
    }
    println!("{} {}", reqs.len(), depth.iter().max().unwrap_or(&0));
    Ok(())
}

struct Shared {
    upstream: String,
    delay: Duration,
    log: Mutex<std::fs::File>,
    epoch: Instant,
}

fn serve(port: &str, upstream: &str, delay_ms: &str, log: &str) -> io::Result<()> {
    let delay_ms: f64 = delay_ms
        .parse()
        .map_err(|_| io::Error::other(format!("DELAY_MS {delay_ms:?} is not a number")))?;
    let shared = Arc::new(Shared {
        upstream: upstream.to_string(),
        delay: Duration::from_secs_f64(delay_ms / 1000.0),
        log: Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)?,
        ),
        epoch: Instant::now(),
    });
    let listener =
        TcpListener::bind(("127.0.0.1", port.parse::<u16>().map_err(io::Error::other)?))?;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || {
            // A connection that breaks ends its thread; the client sees it closed.
            let _ = connection(conn, &shared);
        });
    }
    Ok(())
}

/// One parsed HTTP/1.1 message head: the start line and the headers in order.
struct Head {
    start: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn chunked(&self) -> bool {
        self.get("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }
    fn length(&self) -> Option<usize> {
        self.get("content-length")
            .and_then(|v| v.trim().parse().ok())
    }
    /// The status of an answer's head (0 if there is none).
    fn status(&self) -> u16 {
        self.start
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }
    /// The message with this start line, the headers that are not hop-by-hop, `length` as
    /// Content-Length, and `body`.
    fn message(&self, start: &str, length: Option<&str>, body: &[u8]) -> Vec<u8> {
        let mut head = format!("{start}\r\n");
        for (k, v) in &self.headers {
            if !HOP.contains(&k.to_ascii_lowercase().as_str()) {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
        }
        if let Some(n) = length {
            head.push_str(&format!("Content-Length: {n}\r\n"));
        }
        head.push_str("\r\n");
        let mut msg = head.into_bytes();
        msg.extend_from_slice(body);
        msg
    }
    fn closes(&self) -> bool {
        self.get("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// The next message head, or None at a clean end of the stream.
fn read_head(r: &mut impl BufRead) -> io::Result<Option<Head>> {
    let mut start = String::new();
    if r.read_line(&mut start)? == 0 {
        return Ok(None);
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok(Some(Head {
        start: start.trim_end().to_string(),
        headers,
    }))
}

/// A message body: chunked, Content-Length, or (`to_eof`) everything until the peer closes.
fn read_body(r: &mut impl BufRead, head: &Head, to_eof: bool) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    if head.chunked() {
        loop {
            let mut line = String::new();
            r.read_line(&mut line)?;
            let size = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16).map_err(io::Error::other)?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    line.clear();
                    if r.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
                        return Ok(out);
                    }
                }
            }
            let at = out.len();
            out.resize(at + size, 0);
            r.read_exact(&mut out[at..])?;
            line.clear();
            r.read_line(&mut line)?;
        }
    } else if let Some(n) = head.length() {
        out.resize(n, 0);
        r.read_exact(&mut out)?;
    } else if to_eof {
        r.read_to_end(&mut out)?;
    }
    Ok(out)
}

/// The registry's side of one client connection.
struct Upstream {
    write: TcpStream,
    read: BufReader<TcpStream>,
}

impl Upstream {
    fn open(addr: &str) -> io::Result<Self> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(Upstream {
            read: BufReader::new(s.try_clone()?),
            write: s,
        })
    }
    /// Send one request and read its answer: the head, the body, and whether the registry
    /// closes the connection after it.
    fn exchange(&mut self, method: &str, req: &[u8]) -> io::Result<(Head, Vec<u8>, bool)> {
        self.write.write_all(req)?;
        let head = read_head(&mut self.read)?.ok_or(io::ErrorKind::ConnectionReset)?;
        let status = head.status();
        let bodiless = method == "HEAD" || status / 100 == 1 || status == 204 || status == 304;
        let to_eof = !bodiless && !head.chunked() && head.length().is_none();
        let body = if bodiless {
            Vec::new()
        } else {
            read_body(&mut self.read, &head, to_eof)?
        };
        let closes = to_eof || head.closes();
        Ok((head, body, closes))
    }
}

fn connection(client: TcpStream, shared: &Shared) -> io::Result<()> {
    client.set_nodelay(true)?;
    let mut first = [0u8; 1];
    // A TLS ClientHello (0x16) or an empty connection: close it, as a plain-http port would.
    if client.peek(&mut first)? == 0 || first[0] == 0x16 {
        return Ok(());
    }
    let mut out = client.try_clone()?;
    let mut input = BufReader::new(client);
    let mut upstream: Option<Upstream> = None;
    while let Some(head) = read_head(&mut input)? {
        let start = shared.epoch.elapsed().as_nanos();
        let body = read_body(&mut input, &head, false)?;
        let mut words = head.start.split_whitespace();
        let method = words.next().unwrap_or("").to_string();
        let target = words.next().unwrap_or("").to_string();
        std::thread::sleep(shared.delay);

        let sends_length = !body.is_empty() || matches!(method.as_str(), "PUT" | "POST" | "PATCH");
        let req = head.message(
            &format!("{method} {target} HTTP/1.1"),
            sends_length.then(|| body.len().to_string()).as_deref(),
            &body,
        );

        let mut answer = None;
        for attempt in 0..2 {
            let reused = upstream.is_some();
            let up = match &mut upstream {
                Some(up) => up,
                None => upstream.insert(Upstream::open(&shared.upstream)?),
            };
            match up.exchange(&method, &req) {
                Ok(a) => {
                    answer = Some(a);
                    break;
                }
                // A kept-alive connection the registry closed while idle: reopen it once.
                Err(_) if reused && attempt == 0 => upstream = None,
                Err(e) => return Err(e),
            }
        }
        let (resp, payload, closes) = answer.ok_or(io::ErrorKind::ConnectionReset)?;
        if closes {
            upstream = None;
        }

        // A HEAD answer keeps the registry's length and has no body; others get the body's.
        let msg = if method == "HEAD" {
            resp.message(&resp.start, resp.get("content-length"), &[])
        } else {
            resp.message(&resp.start, Some(&payload.len().to_string()), &payload)
        };
        out.write_all(&msg)?;
        let end = shared.epoch.elapsed().as_nanos();
        let status = resp.status();
        let path = target.split('?').next().unwrap_or("");
        let line = format!("{start} {end} {method} {path} {status}\n");
        shared
            .log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .write_all(line.as_bytes())?;
        if head.closes() {
            break;
        }
    }
    Ok(())
}
