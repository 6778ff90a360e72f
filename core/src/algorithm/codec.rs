//! The byte layout of algorithm states: one tag byte naming the algorithm and layout version,
//! then fixed-width little-endian fields. No serde: this runs on every request in the filter.

/// State bytes that cannot be read by the algorithm asked to read them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The tag names another algorithm or layout version.
    #[error("state tag {found:#04x} is not {expected:#04x}")]
    WrongTag {
        /// The tag the reader expected.
        expected: u8,
        /// The tag found.
        found: u8,
    },
    /// Fewer or more bytes than the layout has.
    #[error("state is {found} bytes, not {expected}")]
    WrongLength {
        /// Bytes the layout has.
        expected: usize,
        /// Bytes found.
        found: usize,
    },
}

/// Tags: high nibble the algorithm, low nibble the layout version.
pub(crate) mod tag {
    pub const TOKEN_BUCKET: u8 = 0x11;
    pub const TOKEN_BUCKET_NANOS: u8 = 0x12;
    pub const GCRA: u8 = 0x21;
    pub const GCRA_NANOS: u8 = 0x22;
    pub const FIXED_WINDOW: u8 = 0x31;
    pub const SLIDING_WINDOW: u8 = 0x41;
    pub const SLIDING_LOG: u8 = 0x52; // 0x51 had no high-water mark
    pub const CONCURRENCY: u8 = 0x61;
    pub const CALENDAR_QUOTA: u8 = 0x71;
}

/// Reads fixed-width little-endian fields after checking tag and length.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Checks the tag and that the body is exactly `body_len` bytes.
    pub fn exact(bytes: &'a [u8], tag: u8, body_len: usize) -> Result<Self, StateError> {
        let reader = Self::tagged(bytes, tag)?;
        if reader.bytes.len() != body_len {
            return Err(StateError::WrongLength {
                expected: body_len + 1,
                found: bytes.len(),
            });
        }
        Ok(reader)
    }

    /// Checks the tag only; the caller reads a variable-length body.
    pub fn tagged(bytes: &'a [u8], tag: u8) -> Result<Self, StateError> {
        match bytes.split_first() {
            Some((&found, rest)) if found == tag => Ok(Self { bytes: rest }),
            Some((&found, _)) => Err(StateError::WrongTag {
                expected: tag,
                found,
            }),
            None => Err(StateError::WrongLength {
                expected: 1,
                found: 0,
            }),
        }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.bytes.len()
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        let Some((head, rest)) = self.bytes.split_first_chunk::<N>() else {
            return Err(StateError::WrongLength {
                expected: N,
                found: self.bytes.len(),
            });
        };
        self.bytes = rest;
        Ok(*head)
    }

    pub fn u32(&mut self) -> Result<u32, StateError> {
        self.take::<4>().map(u32::from_le_bytes)
    }

    pub fn u64(&mut self) -> Result<u64, StateError> {
        self.take::<8>().map(u64::from_le_bytes)
    }

    pub fn u128(&mut self) -> Result<u128, StateError> {
        self.take::<16>().map(u128::from_le_bytes)
    }
}

/// Appends fields in the layout `Reader` reads.
pub(crate) struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> Writer<'a> {
    pub fn new(out: &'a mut Vec<u8>, tag: u8) -> Self {
        out.push(tag);
        Self { out }
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u128(&mut self, v: u128) -> &mut Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }
}
