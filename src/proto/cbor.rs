//! A small, total CBOR decoder (RFC 8949) for the LwM2M CBOR (60) and SenML
//! CBOR (112) content formats.
//!
//! It decodes into [`Cbor`] values with hard limits on nesting depth and item
//! count so that hostile payloads cannot exhaust the stack or memory. Tags are
//! accepted and skipped (their content is kept). It never panics.

#[derive(Debug, Clone, PartialEq)]
pub enum Cbor {
    Uint(u64),
    /// Negative integer as i128 (CBOR major type 1 reaches -2^64).
    Nint(i128),
    Bytes(Vec<u8>),
    Text(String),
    Array(Vec<Cbor>),
    Map(Vec<(Cbor, Cbor)>),
    Bool(bool),
    Null,
    Undefined,
    Float(f64),
}

impl Cbor {
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Cbor::Uint(u) => Some(*u as f64),
            Cbor::Nint(n) => Some(*n as f64),
            Cbor::Float(f) => Some(*f),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Cbor::Uint(u) => i64::try_from(*u).ok(),
            Cbor::Nint(n) => i64::try_from(*n).ok(),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CborError {
    #[error("CBOR input truncated")]
    Truncated,
    #[error("CBOR item malformed")]
    Malformed,
    #[error("CBOR nesting or size limit exceeded")]
    Limit,
    #[error("trailing bytes after CBOR item")]
    Trailing,
}

const MAX_DEPTH: usize = 16;
const MAX_ITEMS: usize = 65_536;

struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
    items: usize,
}

impl<'a> Decoder<'a> {
    fn byte(&mut self) -> Result<u8, CborError> {
        let b = *self.buf.get(self.pos).ok_or(CborError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }
    fn take(&mut self, n: u64) -> Result<&'a [u8], CborError> {
        let n = usize::try_from(n).map_err(|_| CborError::Truncated)?;
        let end = self.pos.checked_add(n).ok_or(CborError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(CborError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    /// Argument of the initial byte; `None` means indefinite length (31).
    fn arg(&mut self, info: u8) -> Result<Option<u64>, CborError> {
        Ok(Some(match info {
            0..=23 => info as u64,
            24 => self.byte()? as u64,
            25 => u16::from_be_bytes(self.take(2)?.try_into().unwrap_or([0; 2])) as u64,
            26 => u32::from_be_bytes(self.take(4)?.try_into().unwrap_or([0; 4])) as u64,
            27 => u64::from_be_bytes(self.take(8)?.try_into().unwrap_or([0; 8])),
            31 => return Ok(None),
            _ => return Err(CborError::Malformed),
        }))
    }
    fn count(&mut self) -> Result<(), CborError> {
        self.items += 1;
        if self.items > MAX_ITEMS {
            return Err(CborError::Limit);
        }
        Ok(())
    }
    fn at_break(&self) -> bool {
        self.buf.get(self.pos) == Some(&0xff)
    }
    fn string(&mut self, major: u8, info: u8) -> Result<Vec<u8>, CborError> {
        match self.arg(info)? {
            Some(n) => Ok(self.take(n)?.to_vec()),
            None => {
                let mut out = Vec::new();
                loop {
                    if self.at_break() {
                        self.pos += 1;
                        return Ok(out);
                    }
                    let ib = self.byte()?;
                    if ib >> 5 != major || ib & 0x1f == 31 {
                        return Err(CborError::Malformed);
                    }
                    let n = self.arg(ib & 0x1f)?.ok_or(CborError::Malformed)?;
                    out.extend_from_slice(self.take(n)?);
                }
            }
        }
    }
    fn item(&mut self, depth: usize) -> Result<Cbor, CborError> {
        if depth > MAX_DEPTH {
            return Err(CborError::Limit);
        }
        self.count()?;
        let ib = self.byte()?;
        let (major, info) = (ib >> 5, ib & 0x1f);
        match major {
            0 => Ok(Cbor::Uint(self.arg(info)?.ok_or(CborError::Malformed)?)),
            1 => Ok(Cbor::Nint(
                -1 - self.arg(info)?.ok_or(CborError::Malformed)? as i128,
            )),
            2 => Ok(Cbor::Bytes(self.string(2, info)?)),
            3 => String::from_utf8(self.string(3, info)?)
                .map(Cbor::Text)
                .map_err(|_| CborError::Malformed),
            4 => {
                let mut v = Vec::new();
                match self.arg(info)? {
                    Some(n) => {
                        if n > (self.buf.len() - self.pos) as u64 {
                            return Err(CborError::Truncated);
                        }
                        for _ in 0..n {
                            v.push(self.item(depth + 1)?);
                        }
                    }
                    None => {
                        while !self.at_break() {
                            v.push(self.item(depth + 1)?);
                        }
                        self.pos += 1;
                    }
                }
                Ok(Cbor::Array(v))
            }
            5 => {
                let mut v = Vec::new();
                match self.arg(info)? {
                    Some(n) => {
                        if n > (self.buf.len() - self.pos) as u64 {
                            return Err(CborError::Truncated);
                        }
                        for _ in 0..n {
                            let k = self.item(depth + 1)?;
                            let val = self.item(depth + 1)?;
                            v.push((k, val));
                        }
                    }
                    None => {
                        while !self.at_break() {
                            let k = self.item(depth + 1)?;
                            let val = self.item(depth + 1)?;
                            v.push((k, val));
                        }
                        self.pos += 1;
                    }
                }
                Ok(Cbor::Map(v))
            }
            6 => {
                // Tag: keep the content, drop the tag number.
                self.arg(info)?.ok_or(CborError::Malformed)?;
                self.item(depth + 1)
            }
            _ => match info {
                20 => Ok(Cbor::Bool(false)),
                21 => Ok(Cbor::Bool(true)),
                22 => Ok(Cbor::Null),
                23 => Ok(Cbor::Undefined),
                24 => {
                    self.byte()?;
                    Ok(Cbor::Undefined)
                }
                25 => {
                    let b = self.take(2)?;
                    Ok(Cbor::Float(f16_to_f64(u16::from_be_bytes([b[0], b[1]]))))
                }
                26 => {
                    let b = self.take(4)?;
                    Ok(Cbor::Float(
                        f32::from_be_bytes([b[0], b[1], b[2], b[3]]) as f64
                    ))
                }
                27 => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    Ok(Cbor::Float(f64::from_be_bytes(a)))
                }
                0..=19 => Ok(Cbor::Undefined),
                _ => Err(CborError::Malformed),
            },
        }
    }
}

fn f16_to_f64(h: u16) -> f64 {
    let exp = (h >> 10) & 0x1f;
    let mant = (h & 0x3ff) as f64;
    let v = match exp {
        0 => mant * 2f64.powi(-24),
        31 => {
            if mant == 0.0 {
                f64::INFINITY
            } else {
                f64::NAN
            }
        }
        _ => (1.0 + mant / 1024.0) * 2f64.powi(exp as i32 - 15),
    };
    if h & 0x8000 != 0 {
        -v
    } else {
        v
    }
}

/// Decodes exactly one CBOR item occupying the whole input.
pub fn decode(buf: &[u8]) -> Result<Cbor, CborError> {
    let mut d = Decoder {
        buf,
        pos: 0,
        items: 0,
    };
    let v = d.item(0)?;
    if d.pos != buf.len() {
        return Err(CborError::Trailing);
    }
    Ok(v)
}

/// Minimal CBOR encoder used by tests, the load generator and benches.
pub mod enc {
    fn head(out: &mut Vec<u8>, major: u8, v: u64) {
        let m = major << 5;
        if v < 24 {
            out.push(m | v as u8);
        } else if v <= 0xff {
            out.extend_from_slice(&[m | 24, v as u8]);
        } else if v <= 0xffff {
            out.push(m | 25);
            out.extend_from_slice(&(v as u16).to_be_bytes());
        } else if v <= 0xffff_ffff {
            out.push(m | 26);
            out.extend_from_slice(&(v as u32).to_be_bytes());
        } else {
            out.push(m | 27);
            out.extend_from_slice(&v.to_be_bytes());
        }
    }
    pub fn int(out: &mut Vec<u8>, v: i64) {
        if v >= 0 {
            head(out, 0, v as u64)
        } else {
            head(out, 1, (-1 - v) as u64)
        }
    }
    pub fn text(out: &mut Vec<u8>, s: &str) {
        head(out, 3, s.len() as u64);
        out.extend_from_slice(s.as_bytes());
    }
    pub fn bytes(out: &mut Vec<u8>, b: &[u8]) {
        head(out, 2, b.len() as u64);
        out.extend_from_slice(b);
    }
    pub fn array(out: &mut Vec<u8>, n: usize) {
        head(out, 4, n as u64)
    }
    pub fn map(out: &mut Vec<u8>, n: usize) {
        head(out, 5, n as u64)
    }
    pub fn f64(out: &mut Vec<u8>, v: f64) {
        out.push(0xfb);
        out.extend_from_slice(&v.to_be_bytes());
    }
    pub fn bool(out: &mut Vec<u8>, v: bool) {
        out.push(if v { 0xf5 } else { 0xf4 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc8949_examples() {
        assert_eq!(decode(&[0x00]).unwrap(), Cbor::Uint(0));
        assert_eq!(decode(&[0x38, 0x63]).unwrap(), Cbor::Nint(-100));
        assert_eq!(decode(&[0xf9, 0x3c, 0x00]).unwrap(), Cbor::Float(1.0));
        assert_eq!(
            decode(&[0xfb, 0x3f, 0xf1, 0x99, 0x99, 0x99, 0x99, 0x99, 0x9a]).unwrap(),
            Cbor::Float(1.1)
        );
        assert_eq!(decode(&[0xf5]).unwrap(), Cbor::Bool(true));
        assert_eq!(decode(&[0x61, 0x61]).unwrap(), Cbor::Text("a".into()));
        assert_eq!(
            decode(&[0x9f, 0x01, 0x02, 0xff]).unwrap(),
            Cbor::Array(vec![Cbor::Uint(1), Cbor::Uint(2)])
        );
        assert_eq!(
            decode(&[0x7f, 0x61, 0x61, 0x61, 0x62, 0xff]).unwrap(),
            Cbor::Text("ab".into())
        );
    }

    #[test]
    fn limits() {
        assert_eq!(
            decode(&[0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Err(CborError::Truncated)
        );
        let deep = vec![0x81u8; 100];
        assert_eq!(decode(&deep), Err(CborError::Limit));
        assert_eq!(decode(&[0x01, 0x02]), Err(CborError::Trailing));
    }

    proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&data);
        }
    }
}
