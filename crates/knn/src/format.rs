//! The exact backend's binary serialisation format.
//!
//! Layout (all integers and floats little-endian):
//!
//! | field    | size         | content                                              |
//! |----------|--------------|------------------------------------------------------|
//! | magic    | 8 bytes      | `PCKNNEX1`                                           |
//! | version  | 4 bytes      | `u32`, currently 1                                   |
//! | dim      | 8 bytes      | `u64`, positive                                      |
//! | n        | 8 bytes      | `u64`, positive                                      |
//! | data     | `4·n·dim`    | the bank rows as `f32`                               |
//! | checksum | 8 bytes      | `u64`, a word-wise FNV-1a style hash of dim, n, data |

use std::io::{ErrorKind, Read, Write};

use byteorder::{LittleEndian, ReadBytesExt, WriteBytesExt};

use crate::KnnError;

const MAGIC: [u8; 8] = *b"PCKNNEX1";
const VERSION: u32 = 1;
/// Values converted per chunk while reading or writing.
const CHUNK: usize = 1 << 14;

/// A word-wise variant of FNV-1a: every 64-bit word is xor-ed in and the state multiplied by the
/// FNV prime. Multiplying by an odd constant is a bijection, so any single changed word changes
/// the final hash.
pub(crate) struct Checksum(pub(crate) u64);

impl Checksum {
    pub(crate) fn new() -> Self {
        Checksum(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn word(&mut self, w: u64) {
        self.0 = (self.0 ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    }

    /// Hashes `bytes`, eight per little-endian word, the last word zero-padded, then the length.
    #[cfg(feature = "faiss")]
    pub(crate) fn bytes(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            self.word(u64::from_le_bytes([
                w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7],
            ]));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.word(u64::from_le_bytes(last));
        }
        self.word(bytes.len() as u64);
    }

    /// Hashes the bit patterns of `values`, two per word.
    pub(crate) fn floats(&mut self, values: &[f32]) {
        let mut pairs = values.chunks_exact(2);
        for pair in &mut pairs {
            self.word(u64::from(pair[0].to_bits()) | (u64::from(pair[1].to_bits()) << 32));
        }
        if let [last] = pairs.remainder() {
            self.word(u64::from(last.to_bits()));
        }
    }
}

/// Writes `data` (rows of `dim` values) in the exact backend's format.
pub(crate) fn write_exact(w: &mut dyn Write, dim: usize, data: &[f32]) -> Result<(), KnnError> {
    let n = data.len() / dim;
    let mut sum = Checksum::new();
    sum.word(dim as u64);
    sum.word(n as u64);
    w.write_all(&MAGIC)?;
    w.write_u32::<LittleEndian>(VERSION)?;
    w.write_u64::<LittleEndian>(dim as u64)?;
    w.write_u64::<LittleEndian>(n as u64)?;
    let mut bytes = Vec::with_capacity(4 * CHUNK.min(data.len()));
    for chunk in data.chunks(CHUNK) {
        sum.floats(chunk);
        bytes.clear();
        for v in chunk {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        w.write_all(&bytes)?;
    }
    w.write_u64::<LittleEndian>(sum.0)?;
    w.flush()?;
    Ok(())
}

/// Maps an unexpected end of stream to [`KnnError::Corrupt`], naming what was being read.
pub(crate) fn truncated(what: &str) -> impl FnOnce(std::io::Error) -> KnnError + '_ {
    move |e| {
        if e.kind() == ErrorKind::UnexpectedEof {
            KnnError::Corrupt(format!("stream truncated while reading the {what}"))
        } else {
            KnnError::Io(e)
        }
    }
}

/// Reads a stream written by [`write_exact`] and returns the dimension and the data.
pub(crate) fn read_exact(r: &mut dyn Read) -> Result<(usize, Vec<f32>), KnnError> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(truncated("magic"))?;
    if magic != MAGIC {
        return Err(KnnError::Corrupt(format!(
            "bad magic {magic:02x?}: not a patchcore-knn exact index (expected {MAGIC:02x?})"
        )));
    }
    let version = r.read_u32::<LittleEndian>().map_err(truncated("version"))?;
    if version != VERSION {
        return Err(KnnError::Corrupt(format!(
            "unsupported format version {version} (this build reads version {VERSION})"
        )));
    }
    let dim = r
        .read_u64::<LittleEndian>()
        .map_err(truncated("dimension"))?;
    let n = r
        .read_u64::<LittleEndian>()
        .map_err(truncated("row count"))?;
    if dim == 0 || n == 0 {
        return Err(KnnError::Corrupt(format!(
            "header declares {n} rows of dimension {dim}; both must be positive"
        )));
    }
    let total = usize::try_from(dim)
        .ok()
        .zip(usize::try_from(n).ok())
        .and_then(|(d, n)| d.checked_mul(n))
        .filter(|t| t.checked_mul(4).is_some())
        .ok_or_else(|| {
            KnnError::Corrupt(format!(
                "header declares {n} rows of dimension {dim}, too large to address"
            ))
        })?;
    let mut sum = Checksum::new();
    sum.word(dim);
    sum.word(n);
    // Grow the buffer while reading, so a corrupted header cannot force a huge allocation before
    // the stream runs out.
    let mut data: Vec<f32> = Vec::with_capacity(total.min(1 << 20));
    let mut bytes = vec![0u8; 4 * CHUNK.min(total)];
    while data.len() < total {
        let take = CHUNK.min(total - data.len());
        let buf = &mut bytes[..4 * take];
        r.read_exact(buf).map_err(|e| {
            if e.kind() == ErrorKind::UnexpectedEof {
                KnnError::Corrupt(format!(
                    "stream truncated: expected {total} values ({n} rows × {dim}), \
                     got fewer than {}",
                    data.len() + take
                ))
            } else {
                KnnError::Io(e)
            }
        })?;
        let start = data.len();
        data.extend(
            buf.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
        sum.floats(&data[start..]);
    }
    let stored = r
        .read_u64::<LittleEndian>()
        .map_err(truncated("checksum"))?;
    if stored != sum.0 {
        return Err(KnnError::Corrupt(format!(
            "checksum mismatch: stored {stored:#018x}, computed {:#018x}",
            sum.0
        )));
    }
    Ok((dim as usize, data))
}
