//! Checked little-endian reader and writer shared by the object encodings.

use super::ObjectError;
use super::{FileHash, ObjectHash};

pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], ObjectError> {
        if self.remaining() < n {
            return Err(ObjectError::Truncated {
                offset: self.pos,
                needed: n - self.remaining(),
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], ObjectError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub fn u8(&mut self) -> Result<u8, ObjectError> {
        Ok(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Result<u16, ObjectError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32, ObjectError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, ObjectError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub fn i64(&mut self) -> Result<i64, ObjectError> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    pub fn object_hash(&mut self) -> Result<ObjectHash, ObjectError> {
        Ok(ObjectHash::from_bytes(self.array()?))
    }

    pub fn file_hash(&mut self) -> Result<FileHash, ObjectError> {
        Ok(FileHash::from_bytes(self.array()?))
    }

    /// Checks the magic and version that begin every encoding.
    pub fn header(
        &mut self,
        magic: &[u8; 4],
        what: &'static str,
        version: u8,
    ) -> Result<(), ObjectError> {
        if self.array::<4>()? != *magic {
            return Err(ObjectError::Magic(what));
        }
        match self.u8()? {
            v if v == version => Ok(()),
            v => Err(ObjectError::Version { what, version: v }),
        }
    }

    /// Checks the magic, and that the version is one of `versions`; returns it.
    pub fn header_of(
        &mut self,
        magic: &[u8; 4],
        what: &'static str,
        versions: std::ops::RangeInclusive<u8>,
    ) -> Result<u8, ObjectError> {
        if self.array::<4>()? != *magic {
            return Err(ObjectError::Magic(what));
        }
        match self.u8()? {
            v if versions.contains(&v) => Ok(v),
            v => Err(ObjectError::Version { what, version: v }),
        }
    }

    /// A count of items of `item_size` bytes each, refused if the rest cannot hold them.
    pub fn count(&mut self, item_size: usize, max: usize) -> Result<usize, ObjectError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(ObjectError::Invalid("count above the limit"));
        }
        if n.saturating_mul(item_size) > self.remaining() {
            return Err(ObjectError::Truncated {
                offset: self.pos,
                needed: n * item_size - self.remaining(),
            });
        }
        Ok(n)
    }

    pub fn finish(self) -> Result<(), ObjectError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(ObjectError::Trailing(n)),
        }
    }
}

#[derive(Default)]
pub(crate) struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn header(magic: &[u8; 4], version: u8) -> Self {
        let mut w = Writer::default();
        w.bytes(magic);
        w.u8(version);
        w
    }
    pub fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    pub fn i64(&mut self, v: i64) {
        self.bytes(&v.to_le_bytes());
    }
    pub fn hash(&mut self, h: &[u8; 32]) {
        self.bytes(h);
    }
}
