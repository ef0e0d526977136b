//! The record format the writer workload appends and the checker reads back.
//!
//! A record is exactly [`RECORD_LEN`] bytes of ASCII: `HFREC <writer> <seq> <sum>`,
//! padded with `.` and ended by `\n`. The fixed length lets the checker cut the file
//! into records by offset, so a torn or interleaved write shows up as a record that
//! does not parse or whose checksum does not match — never as a silently shifted one.

use std::fmt;

pub const RECORD_LEN: usize = 64;
const MAGIC: &str = "HFREC";
/// Writer ids are short so a record always fits.
pub const MAX_WRITER_LEN: usize = 16;

/// One record as found in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub writer: String,
    pub seq: u64,
    /// Byte offset of the record in the file.
    pub offset: u64,
}

/// Why a file does not consist of whole, intact records.
#[derive(Debug, PartialEq, Eq)]
pub enum RecordError {
    /// The file length is not a multiple of [`RECORD_LEN`]: a partial record at the end.
    Partial { len: u64 },
    /// The bytes at `offset` are not one intact record.
    Torn { offset: u64, text: String },
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordError::Partial { len } => write!(f, "file length {len} ends in a partial record"),
            RecordError::Torn { offset, text } => write!(f, "torn record at {offset}: {text:?}"),
        }
    }
}

/// FNV-1a over the writer id and sequence number.
fn checksum(writer: &str, seq: u64) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in writer.bytes().chain([b'|']).chain(seq.to_le_bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The bytes of record `seq` of `writer`. Panics on a writer id that is too long or
/// contains a space (a harness bug, not a test outcome).
pub fn encode(writer: &str, seq: u64) -> [u8; RECORD_LEN] {
    assert!(
        !writer.is_empty() && writer.len() <= MAX_WRITER_LEN && !writer.contains(' '),
        "bad writer id {writer:?}"
    );
    let text = format!("{MAGIC} {writer} {seq} {:016x} ", checksum(writer, seq));
    let mut out = [b'.'; RECORD_LEN];
    out[..text.len()].copy_from_slice(text.as_bytes());
    out[RECORD_LEN - 1] = b'\n';
    out
}

/// Parses one record's bytes; `None` if they are not exactly what [`encode`] makes.
pub fn decode(bytes: &[u8], offset: u64) -> Option<Record> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut fields = text.split(' ');
    let (magic, writer, seq) = (fields.next()?, fields.next()?, fields.next()?);
    let seq: u64 = seq.parse().ok()?;
    let sum = u64::from_str_radix(fields.next()?, 16).ok()?;
    if magic != MAGIC || sum != checksum(writer, seq) || bytes != encode(writer, seq) {
        return None;
    }
    Some(Record {
        writer: writer.to_string(),
        seq,
        offset,
    })
}

/// Every record of `data`, in file order.
pub fn decode_all(data: &[u8]) -> Result<Vec<Record>, RecordError> {
    if !data.len().is_multiple_of(RECORD_LEN) {
        return Err(RecordError::Partial {
            len: data.len() as u64,
        });
    }
    data.chunks(RECORD_LEN)
        .enumerate()
        .map(|(i, chunk)| {
            let offset = (i * RECORD_LEN) as u64;
            decode(chunk, offset).ok_or_else(|| RecordError::Torn {
                offset,
                text: String::from_utf8_lossy(chunk).into_owned(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let mut data = Vec::new();
        data.extend_from_slice(&encode("node1-a", 0));
        data.extend_from_slice(&encode("node2-a", 7));
        let records = decode_all(&data).unwrap();
        assert_eq!(records[1].writer, "node2-a");
        assert_eq!((records[1].seq, records[1].offset), (7, 64));
        data[70] ^= 1;
        assert!(matches!(
            decode_all(&data),
            Err(RecordError::Torn { offset: 64, .. })
        ));
        assert!(matches!(
            decode_all(&data[..100]),
            Err(RecordError::Partial { len: 100 })
        ));
    }
}
