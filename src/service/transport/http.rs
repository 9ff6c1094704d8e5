//! The metrics listener (`service tandem { inet_listener metrics {} }`): one HTTP/1.x request
//! per connection, answered with the OpenMetrics text of the status snapshot, then closed.
//! Whoever reaches the port may read it, as with Dovecot's own `service stats` exporter: the
//! listener carries user names (the ones with the oldest backlog) and nothing else.

use crate::service::metrics::{render, CONTENT_TYPE, TOP_USERS};
use crate::service::status::Shared;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// The name of the `inet_listener` in the `service tandem {}` block that serves metrics.
pub const METRICS_LISTENER: &str = "metrics";
/// A request's head, at most: a scraper's is a few hundred bytes.
const MAX_REQUEST: usize = 8 << 10;
/// The whole request must arrive within this, or the connection is closed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Answers one request on `stream`; errors only end the connection.
pub fn serve(mut stream: TcpStream, status: &Shared) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
    let Some(path) = read_request(&mut stream) else {
        let _ = respond(
            &mut stream,
            "400 Bad Request",
            "text/plain",
            b"bad request\n",
        );
        return;
    };
    match path {
        Ok((p, head)) if p == "/metrics" || p.starts_with("/metrics?") => {
            let snapshot = status.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let body = render(snapshot, TOP_USERS);
            let body = if head { &b""[..] } else { body.as_bytes() };
            let _ = respond(&mut stream, "200 OK", CONTENT_TYPE, body);
        }
        Ok(_) => {
            let _ = respond(
                &mut stream,
                "404 Not Found",
                "text/plain",
                b"try /metrics\n",
            );
        }
        Err(()) => {
            let _ = respond(
                &mut stream,
                "405 Method Not Allowed",
                "text/plain",
                b"GET only\n",
            );
        }
    }
}

/// Reads the request head: `Some(Ok((path, is_head)))` for a GET or HEAD, `Some(Err(()))` for
/// another method, `None` for anything that is not a complete request within the bounds.
fn read_request(stream: &mut TcpStream) -> Option<Result<(String, bool), ()>> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        stream.set_read_timeout(Some(left)).ok()?;
        let n = stream.read(&mut buf[len..]).ok()?;
        if n == 0 {
            return None;
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => {
                let method = req.method?;
                let path = req.path?.to_string();
                return Some(if method == "GET" || method == "HEAD" {
                    Ok((path, method == "HEAD"))
                } else {
                    Err(())
                });
            }
            Ok(httparse::Status::Partial) if len < buf.len() => continue,
            _ => return None,
        }
    }
}

fn respond(stream: &mut TcpStream, status: &str, kind: &str, body: &[u8]) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}
