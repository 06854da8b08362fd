//! hello: the smallest useful HTTP service, std only. `GET /` says hello, `GET /health`
//! answers `ok` (for Kubernetes probes); anything else is 404. Listens on `0.0.0.0:$PORT`
//! (default 8080), one thread per connection, HTTP/1.1 with `Connection: close`.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

fn main() {
    let port = match std::env::var("PORT") {
        Ok(p) => match p.trim().parse::<u16>() {
            Ok(port) => port,
            Err(_) => {
                eprintln!("error: PORT={p:?} is not a port number (1-65535)");
                std::process::exit(2);
            }
        },
        Err(_) => 8080,
    };
    // A SocketAddr, not a host name: no name resolution, so a static binary needs no resolver.
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("hello: listening on {addr}");
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                std::thread::spawn(move || {
                    if let Err(e) = serve(s) {
                        eprintln!("hello: {e}");
                    }
                });
            }
            Err(e) => eprintln!("hello: accept: {e}"),
        }
    }
}

/// (status, body) for a request line such as `GET /health HTTP/1.1`.
fn route(request_line: &str) -> (&'static str, String) {
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/") => (
            "200 OK",
            format!("hello from imgbuild ({})\n", std::env::consts::ARCH),
        ),
        ("GET" | "HEAD", "/health") => ("200 OK", "ok\n".to_string()),
        ("GET" | "HEAD", _) => ("404 Not Found", "not found\n".to_string()),
        _ => ("405 Method Not Allowed", "method not allowed\n".to_string()),
    }
}

fn serve(stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Read (and ignore) the headers, up to the blank line.
    let mut header = String::new();
    while reader.read_line(&mut header)? > 0 && header.trim_end() != "" {
        header.clear();
    }
    let (status, body) = route(&request_line);
    let head_only = request_line.starts_with("HEAD ");
    let mut out = stream;
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    if !head_only {
        out.write_all(body.as_bytes())?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::route;

    #[test]
    fn routes() {
        for (line, status, body) in [
            ("GET /health HTTP/1.1", "200 OK", "ok\n"),
            ("GET /health?x=1 HTTP/1.1", "200 OK", "ok\n"),
            ("GET /nope HTTP/1.1", "404 Not Found", "not found\n"),
            (
                "POST / HTTP/1.1",
                "405 Method Not Allowed",
                "method not allowed\n",
            ),
        ] {
            assert_eq!(route(line), (status, body.to_string()), "{line}");
        }
        assert!(route("GET / HTTP/1.1").1.starts_with("hello from imgbuild"));
    }
}
