//! A small blocking HTTP/1.1 client for the admin API (plain HTTP, one
//! request per connection; bodies by Content-Length, chunked, or until
//! close). Enough for `corem-ctl` and the tests; no TLS (the admin API
//! listens on loopback, or behind the operator's own TLS proxy).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Where the admin API is and how to authenticate.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub token: Option<String>,
    pub timeout: Duration,
}

/// An answer: status code and body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("bad admin URL {0:?}: http://host:port")]
    Url(String),
    #[error("cannot reach the admin API at {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("admin API at {0}: {1}")]
    Io(String, std::io::Error),
    #[error("admin API at {0}: malformed response ({1})")]
    Malformed(String, &'static str),
}

impl Endpoint {
    /// From `http://host:port` (the path, if any, is ignored).
    pub fn parse(url: &str, token: Option<String>) -> Result<Endpoint, HttpError> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| HttpError::Url(url.to_string()))?;
        let hostport = rest.split('/').next().unwrap_or("");
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h.trim_start_matches('[').trim_end_matches(']').to_string(),
                p.parse().map_err(|_| HttpError::Url(url.to_string()))?,
            ),
            _ => (hostport.to_string(), 80),
        };
        if host.is_empty() {
            return Err(HttpError::Url(url.to_string()));
        }
        Ok(Endpoint {
            host,
            port,
            token,
            timeout: Duration::from_secs(30),
        })
    }

    fn display(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    fn addr(&self) -> Result<SocketAddr, HttpError> {
        (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| HttpError::Connect(self.display(), e))?
            .next()
            .ok_or_else(|| {
                HttpError::Connect(
                    self.display(),
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
                )
            })
    }

    /// Sends one request; `body` with its content type.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
    ) -> Result<Response, HttpError> {
        let addr = self.addr()?;
        let d = self.display();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| HttpError::Connect(d.clone(), e))?;
        s.set_read_timeout(Some(self.timeout))
            .map_err(|e| HttpError::Io(d.clone(), e))?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}:{}\r\nConnection: close\r\nUser-Agent: corem-ctl/{}\r\n",
            self.host,
            self.port,
            env!("CARGO_PKG_VERSION")
        );
        if let Some(t) = &self.token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        let (ct, b) = body.unwrap_or(("application/json", &[]));
        head.push_str(&format!(
            "Content-Type: {ct}\r\nContent-Length: {}\r\n\r\n",
            b.len()
        ));
        s.write_all(head.as_bytes())
            .and_then(|_| s.write_all(b))
            .map_err(|e| HttpError::Io(d.clone(), e))?;
        read_response(BufReader::new(s)).map_err(|e| match e {
            ReadError::Io(e) => HttpError::Io(d, e),
            ReadError::Malformed(why) => HttpError::Malformed(d, why),
        })
    }

    pub fn get(&self, path: &str) -> Result<Response, HttpError> {
        self.request("GET", path, None)
    }

    pub fn send_json(
        &self,
        method: &str,
        path: &str,
        v: &serde_json::Value,
    ) -> Result<Response, HttpError> {
        let b = serde_json::to_vec(v).unwrap_or_default();
        self.request(method, path, Some(("application/json", &b)))
    }
}

/// Parses a whole HTTP/1.1 response (for the fuzz target).
pub fn parse_response(data: &[u8]) -> Option<Response> {
    read_response(data).ok()
}

enum ReadError {
    Io(std::io::Error),
    Malformed(&'static str),
}

impl From<std::io::Error> for ReadError {
    fn from(e: std::io::Error) -> Self {
        ReadError::Io(e)
    }
}

/// Largest response body accepted.
const MAX_BODY: usize = 256 << 20;

fn read_response<R: BufRead>(mut r: R) -> Result<Response, ReadError> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or(ReadError::Malformed("status line"))?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(ReadError::Malformed("headers cut short"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                length = Some(v.parse().map_err(|_| ReadError::Malformed("length"))?);
            } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let n = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| ReadError::Malformed("chunk size"))?;
            if n == 0 {
                break;
            }
            if body.len() + n > MAX_BODY {
                return Err(ReadError::Malformed("body too large"));
            }
            let start = body.len();
            body.resize(start + n, 0);
            r.read_exact(&mut body[start..])?;
            line.clear();
            r.read_line(&mut line)?;
        }
    } else if let Some(n) = length {
        if n > MAX_BODY {
            return Err(ReadError::Malformed("body too large"));
        }
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else {
        r.take(MAX_BODY as u64).read_to_end(&mut body)?;
    }
    Ok(Response { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let e = Endpoint::parse("http://127.0.0.1:8080", None).unwrap();
        assert_eq!((e.host.as_str(), e.port), ("127.0.0.1", 8080));
        let e = Endpoint::parse("http://[::1]:9000/x", None).unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 9000));
        let e = Endpoint::parse("http://gw.example", None).unwrap();
        assert_eq!((e.host.as_str(), e.port), ("gw.example", 80));
        assert!(Endpoint::parse("https://x:1", None).is_err());
        assert!(Endpoint::parse("http://:1", None).is_err());
    }

    #[test]
    fn responses_by_length_chunked_and_close() {
        let r = read_response(&b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA"[..])
            .ok()
            .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
        let r = read_response(
            &b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n"[..],
        )
        .ok()
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"abcde"[..]));
        let r = read_response(&b"HTTP/1.0 500 X\r\n\r\nall of it"[..])
            .ok()
            .unwrap();
        assert_eq!(r.body, b"all of it");
        assert!(read_response(&b"garbage\r\n\r\n"[..]).is_err());
        assert!(read_response(&b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort"[..]).is_err());
    }
}
