//! The record a store that groups by subject keeps for one subject (a user, an org, the
//! global scope): every one of that subject's counters in one value, so that a request's tiers
//! for one caller cost one read and one compare-and-swap write instead of one of each per tier.
//!
//! **Layout.** A tag byte ([`TAG`]), then one entry per rule: the rule's id (the low 32 bits of
//! its name's fingerprint, little-endian), the state's length (u16 little-endian) and the
//! algorithm's state bytes. Entries of rules a request does not touch are carried over as they
//! are, so a caller's endpoint rules keep their counts while other endpoints are called.
//!
//! **Unreadable records start fresh**, as unreadable states do (see [`crate::algorithm`]): a
//! value with another tag or a truncated entry reads as a subject with no counters.
//!
//! Entries of rules a later policy removed stay until the slot is taken over; a record holds
//! at most one entry per rule name it ever saw for its subject.

use std::ops::Range;

use crate::hash;

/// Tag byte of a subject record, layout version 1.
const TAG: u8 = 0xa1;

/// Bytes before each entry's state: rule id (4) and state length (2).
const ENTRY_HEADER: usize = 6;

/// A rule's id inside a record.
pub(crate) fn rule_id(name: &str) -> u32 {
    // Truncation is the point: 32 bits tell apart the handful of rules one subject has.
    hash::fingerprint(name.as_bytes()) as u32
}

/// One subject's counters, as read from the store, plus the states written since.
#[derive(Debug, Default)]
pub(crate) struct Record {
    /// The value as read.
    read: Vec<u8>,
    /// Each readable entry of `read`: rule id and where its state is.
    entries: Vec<(u32, Range<usize>)>,
    /// States set since the read, replacing or adding to `entries`.
    written: Vec<(u32, Vec<u8>)>,
}

impl Record {
    /// Reads a record; absent or unreadable bytes give an empty one.
    pub fn decode(bytes: Option<Vec<u8>>) -> Self {
        let read = bytes.unwrap_or_default();
        let entries = parse(&read).unwrap_or_default();
        Self {
            read,
            entries,
            written: Vec::new(),
        }
    }

    /// The state of rule `id`, if the record has one.
    pub fn get(&self, id: u32) -> Option<&[u8]> {
        if let Some((_, state)) = self.written.iter().find(|(w, _)| *w == id) {
            return Some(state);
        }
        self.entries
            .iter()
            .find(|(e, _)| *e == id)
            .and_then(|(_, span)| self.read.get(span.clone()))
    }

    /// Sets the state of rule `id`.
    pub fn set(&mut self, id: u32, state: Vec<u8>) {
        match self.written.iter_mut().find(|(w, _)| *w == id) {
            Some((_, old)) => *old = state,
            None => self.written.push((id, state)),
        }
    }

    /// The value to write: every entry read, with the states set since in place of theirs.
    pub fn encode(&self) -> Vec<u8> {
        let kept = self
            .entries
            .iter()
            .filter(|(id, _)| !self.written.iter().any(|(w, _)| w == id))
            .filter_map(|(id, span)| Some((*id, self.read.get(span.clone())?)));
        let written = self.written.iter().map(|(id, s)| (*id, s.as_slice()));
        let mut out = Vec::with_capacity(1 + self.read.len() + 32 * self.written.len());
        out.push(TAG);
        for (id, state) in kept.chain(written) {
            out.extend_from_slice(&id.to_le_bytes());
            // States are at most a few KiB (sliding logs are capped).
            let len = u16::try_from(state.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&state[..usize::from(len)]);
        }
        out
    }
}

/// The entries of a record value; `None` when it is not one.
fn parse(value: &[u8]) -> Option<Vec<(u32, Range<usize>)>> {
    let (&tag, _) = value.split_first()?;
    if tag != TAG {
        return None;
    }
    let mut entries = Vec::with_capacity(4);
    let mut at = 1;
    while at < value.len() {
        let header = value.get(at..at + ENTRY_HEADER)?;
        let id = u32::from_le_bytes(header.get(..4)?.try_into().ok()?);
        let len = usize::from(u16::from_le_bytes(header.get(4..)?.try_into().ok()?));
        let start = at + ENTRY_HEADER;
        value.get(start..start + len)?;
        entries.push((id, start..start + len));
        at = start + len;
    }
    Some(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_untouched_entries_are_kept() {
        let mut r = Record::decode(None);
        assert_eq!(r.get(1), None);
        r.set(1, b"one".to_vec());
        r.set(2, b"two".to_vec());
        r.set(1, b"uno".to_vec());
        let bytes = r.encode();

        let mut again = Record::decode(Some(bytes));
        assert_eq!(again.get(1), Some(&b"uno"[..]));
        assert_eq!(again.get(2), Some(&b"two"[..]));
        again.set(2, b"dos".to_vec());
        again.set(3, Vec::new());
        let third = Record::decode(Some(again.encode()));
        assert_eq!(
            third.get(1),
            Some(&b"uno"[..]),
            "an untouched entry is carried over"
        );
        assert_eq!(third.get(2), Some(&b"dos"[..]));
        assert_eq!(third.get(3), Some(&b""[..]));
        assert_eq!(third.entries.len(), 3, "one entry per rule");
    }

    #[test]
    fn unreadable_values_read_as_empty() {
        for value in [
            &b""[..],
            &b"\x11abc"[..],                 // a bare state, not a record
            &[TAG, 1, 0, 0, 0, 9, 0, 1][..], // an entry longer than the value
            &[TAG, 1, 0][..],                // a truncated header
        ] {
            let r = Record::decode(Some(value.to_vec()));
            assert_eq!(r.get(1), None, "{value:?}");
            assert!(r.entries.is_empty(), "{value:?}");
        }
    }

    #[test]
    fn rule_ids_differ_for_the_rules_of_one_policy() {
        let names = [
            "global",
            "org",
            "user",
            "items",
            "free.hourly",
            "pro.hourly",
        ];
        let mut ids: Vec<u32> = names.iter().map(|n| rule_id(n)).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), names.len());
    }
}
