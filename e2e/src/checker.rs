//! The checker: reads a volume's backing file directly (not through any mount) and
//! verifies what the writers reported against what landed.
//!
//! The three properties, each a method of [`Landed`]:
//! - [`Landed::acknowledged_present`]: every record a writer saw acknowledged (fsync
//!   returned 0) is in the file, exactly once — no acknowledged write was lost;
//! - [`Landed::nothing_from_after`]: no byte of a fenced writer lies at or beyond the
//!   file length measured at its fence point (appends land in order, so a later offset
//!   is a later write);
//! - [`Landed::no_interleave`]: once the new holder's first record landed, none of the
//!   old holder's follow.
//!
//! Every record must also be intact (fixed length, checksum): a torn write fails the
//! read itself.

use std::path::Path;

use crate::records::{decode_all, Record};

/// The records in a file, in landing order.
#[derive(Debug)]
pub struct Landed {
    pub records: Vec<Record>,
    pub len: u64,
}

impl Landed {
    /// Reads and parses `path`; a missing file has no records.
    pub fn read(path: &Path) -> Result<Landed, String> {
        let data = match std::fs::read(path) {
            Ok(data) => data,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        };
        let records = decode_all(&data).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Landed {
            records,
            len: data.len() as u64,
        })
    }

    /// The records of `writer`, in file order.
    pub fn of<'a>(&'a self, writer: &'a str) -> impl Iterator<Item = &'a Record> + 'a {
        self.records.iter().filter(move |r| r.writer == writer)
    }

    /// Every sequence number in `acked` appears exactly once for `writer`, and no
    /// sequence number of `writer` appears twice.
    pub fn acknowledged_present(&self, writer: &str, acked: &[u64]) -> Result<(), String> {
        let mut seen = std::collections::BTreeMap::<u64, usize>::new();
        for r in self.of(writer) {
            *seen.entry(r.seq).or_default() += 1;
        }
        if let Some((seq, n)) = seen.iter().find(|(_, n)| **n > 1) {
            return Err(format!("{writer} record {seq} landed {n} times"));
        }
        let lost: Vec<u64> = acked
            .iter()
            .copied()
            .filter(|s| !seen.contains_key(s))
            .collect();
        if !lost.is_empty() {
            return Err(format!(
                "{} acknowledged record(s) of {writer} are missing: {lost:?}",
                lost.len()
            ));
        }
        Ok(())
    }

    /// No record of `writer` starts at or after `fence_offset`.
    pub fn nothing_from_after(&self, writer: &str, fence_offset: u64) -> Result<(), String> {
        let late: Vec<&Record> = self
            .of(writer)
            .filter(|r| r.offset >= fence_offset)
            .collect();
        if late.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} record(s) of fenced writer {writer} landed after the fence point \
                 (offset {fence_offset}): first {:?}",
                late.len(),
                late[0]
            ))
        }
    }

    /// After the first record of `new`, no record of `old`.
    pub fn no_interleave(&self, old: &str, new: &str) -> Result<(), String> {
        let Some(first_new) = self.of(new).next() else {
            return Ok(());
        };
        match self.of(old).find(|r| r.offset > first_new.offset) {
            None => Ok(()),
            Some(r) => Err(format!(
                "{old} record {} at offset {} follows {new}'s first record at {}",
                r.seq, r.offset, first_new.offset
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::encode;

    fn landed(records: &[(&str, u64)]) -> Landed {
        let data: Vec<u8> = records.iter().flat_map(|(w, s)| encode(w, *s)).collect();
        Landed {
            records: decode_all(&data).unwrap(),
            len: data.len() as u64,
        }
    }

    #[test]
    fn each_property_catches_its_violation() {
        let ok = landed(&[("a", 0), ("a", 1), ("b", 0), ("b", 1)]);
        ok.acknowledged_present("a", &[0, 1]).unwrap();
        ok.nothing_from_after("a", 128).unwrap();
        ok.no_interleave("a", "b").unwrap();

        assert!(ok.acknowledged_present("b", &[0, 1, 2]).is_err());
        assert!(ok.nothing_from_after("a", 64).is_err());
        let interleaved = landed(&[("a", 0), ("b", 0), ("a", 1)]);
        assert!(interleaved.no_interleave("a", "b").is_err());
        let duplicated = landed(&[("a", 0), ("a", 0)]);
        assert!(duplicated.acknowledged_present("a", &[0]).is_err());
    }
}
