//! Counters in proxy-wasm shared data: one process-wide table that every worker's VM reads and
//! writes with compare-and-swap, so all workers share one count per key.
//!
//! **Layout.** A fixed table of `slots` entries, keys `tg:w128:<slots>:<n>`. The store groups
//! counters by subject ([`CounterStore::groups_by_subject`]): all of one caller's counters (or
//! one org's, or the global ones) are one record (`tollgate_core`'s subject record: each rule's
//! state under the rule's id), so a request's tiers of one caller cost one `get` and one CAS
//! `set` between them, not one of each per tier. A record lives in slot
//! `fingerprint(key) % slots`; the value is the record key's 8-byte fingerprint, the record's
//! length (2 bytes), the record and zero padding up to [`SLOT_WIDTH`] bytes. A value with length
//! 0 is a vacant slot.
//!
//! **Why fixed width.** Envoy replaces a shared-data value with a new string of the value's
//! size. Were vacant slots empty (no heap) and used ones ~30 bytes, memory would grow by a heap
//! allocation per key until every slot was used. Written full-width from the start — vacant
//! ones too — every slot's allocation is made once, at startup, and each update swaps it for one
//! of the same size: memory stays flat from the first request, whatever the number of distinct
//! keys, about `slots × (key ~16 B + value 128 B + Envoy's map and string overhead)`. Records
//! larger than the width (see [`SLOT_WIDTH`]) still work; only their slots grow.
//!
//! **Eviction rule.** A slot holding another subject's fingerprint reads as absent for this
//! one; the newcomer's CAS write takes the slot over, and the evicted subject starts fresh the
//! next time it is seen (each of its tiers may grant up to one more window's worth). Size
//! `slots` well above the number of callers (and orgs) live in one window so that collisions
//! stay rare: with `k` live subjects the share of them sharing a slot is about `k / slots`.
//!
//! **Why the table is pre-written.** Envoy's `set_shared_data` ignores the CAS token for a key
//! that does not exist yet (it simply creates it), and a never-written key has no token to
//! compare. Two workers touching a fresh key at once would both "create" it and one update would
//! be lost: an over-grant. So no counter is ever written to a missing key: [`init_table`] writes
//! every slot (vacant) in the main thread's configuration canary — before any worker serves a
//! request — and marks the table done; workers find the marker and skip. From then on every
//! write is a real CAS against an existing entry. Should a slot still be missing (a host that
//! does not run the canary first), [`SlotStore`] creates it vacant and re-reads it, which narrows
//! the race to that one first write; it is counted in `tollgate.slot_created_late`.

use tollgate_core::engine::{CounterKey, CounterStore, Stored};

/// A shared-data failure other than a CAS conflict.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("shared data {op} of `{key}` failed: {status}")]
pub struct HostError {
    /// get or set.
    pub op: &'static str,
    /// The shared-data key.
    pub key: String,
    /// The host's status, as text.
    pub status: String,
}

/// The shared-data host calls the filter makes; Envoy's semantics: `set` with `cas: None`
/// writes unconditionally, `set` on a missing key always creates it, and `get` of a missing key
/// gives `(None, None)`.
pub trait SharedData {
    /// Reads a value and its CAS token.
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), HostError>;
    /// Writes a value; `Ok(false)` on a CAS mismatch.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, HostError>;
}

/// Bytes of every slot value: fingerprint (8), record length (2), record, zero padding. The
/// 117 bytes left hold a subject's record of three tiers of the largest fixed-size states
/// (sliding window, calendar quota: 25 bytes, plus 6 of entry header each), or more of the
/// smaller ones (fixed window 17, GCRA and token bucket 9).
pub const SLOT_WIDTH: usize = 128;

/// Bytes before the state.
const HEADER: usize = 10;

/// A slot value: `fp`'s state `state`, padded to [`SLOT_WIDTH`].
fn encode_slot(fp: u64, state: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(SLOT_WIDTH.max(HEADER + state.len()));
    value.extend_from_slice(&fp.to_le_bytes());
    // A state is at most a few KiB (sliding logs are capped), far below 64 KiB.
    value.extend_from_slice(&u16::try_from(state.len()).unwrap_or(u16::MAX).to_le_bytes());
    value.extend_from_slice(state);
    value.resize(SLOT_WIDTH.max(value.len()), 0);
    value
}

/// The owner's fingerprint and state of a slot value; `None` for a vacant or unreadable one.
fn decode_slot(value: &[u8]) -> Option<(u64, &[u8])> {
    let owner = u64::from_le_bytes(value.get(..8)?.try_into().ok()?);
    let len = usize::from(u16::from_le_bytes(value.get(8..HEADER)?.try_into().ok()?));
    if len == 0 {
        return None;
    }
    Some((owner, value.get(HEADER..HEADER + len)?))
}

/// A vacant slot's value.
fn vacant() -> Vec<u8> {
    encode_slot(0, &[])
}

/// The shared-data key of slot `n` in a table of `slots`. The table size is part of the key, so
/// a configuration with another size gets a fresh table instead of misreading the old one.
pub fn slot_key(slots: u32, n: u32) -> String {
    let mut key = String::new();
    write_table_prefix(&mut key, slots);
    key.push_str(itoa::Buffer::new().format(n));
    key
}

/// `tg:w128:<slots>:`, the part of every slot key its table shares. By hand, not with
/// `format!`: [`SlotStore`] writes it once and then only changes the slot number after it.
fn write_table_prefix(key: &mut String, slots: u32) {
    // `w128`: the value layout (128-byte subject records; `w64` held one counter per slot), so
    // a filter with another layout never misreads this table.
    key.push_str("tg:w128:");
    key.push_str(itoa::Buffer::new().format(slots));
    key.push(':');
}

fn marker_key(slots: u32) -> String {
    let mut key = String::new();
    write_table_prefix(&mut key, slots);
    key.push_str("ready");
    key
}

/// Writes every slot of the table (vacant) unless the table is already marked done. Returns
/// how many slots were written.
pub fn init_table<H: SharedData>(host: &H, slots: u32) -> Result<u32, HostError> {
    let marker = marker_key(slots);
    if host.get(&marker)?.0.is_some() {
        return Ok(0);
    }
    let mut written = 0;
    let empty = vacant();
    for n in 0..slots {
        let key = slot_key(slots, n);
        if host.get(&key)?.1.is_none() {
            host.set(&key, &empty, None)?;
            written += 1;
        }
    }
    host.set(&marker, b"1", None)?;
    Ok(written)
}

/// A [`CounterStore`] over the slot table.
pub struct SlotStore<'h, H: SharedData> {
    host: &'h H,
    slots: u32,
    /// Test-only: every read fails (see `TestOnly::fail_store`).
    pub fail: bool,
    /// Slots found missing and created on the request path (see the module docs).
    pub created_late: u32,
    /// The current slot's key, rebuilt in place for each counter (no allocation per call).
    slot: String,
    /// Where the table's prefix ends in `slot`: only the slot number after it changes.
    prefix: usize,
}

impl<'h, H: SharedData> SlotStore<'h, H> {
    /// A store over a table of `slots` (at least 1).
    pub fn new(host: &'h H, slots: u32) -> Self {
        let slots = slots.max(1);
        let mut slot = String::with_capacity(32);
        write_table_prefix(&mut slot, slots);
        Self {
            host,
            slots,
            fail: false,
            created_late: 0,
            prefix: slot.len(),
            slot,
        }
    }

    /// Points `self.slot` at the counter's slot; returns the counter's fingerprint.
    fn locate(&mut self, key: &CounterKey) -> u64 {
        let fp = key.fingerprint();
        // `slots` ≤ 2^24, so the remainder fits in u32.
        let n = u32::try_from(fp % u64::from(self.slots)).unwrap_or(0);
        self.slot.truncate(self.prefix);
        self.slot.push_str(itoa::Buffer::new().format(n));
        fp
    }
}

impl<H: SharedData> CounterStore for SlotStore<'_, H> {
    type Error = HostError;

    fn load(&mut self, key: &CounterKey) -> Result<Stored, HostError> {
        let fp = self.locate(key);
        let slot = self.slot.as_str();
        if self.fail {
            return Err(HostError {
                op: "get",
                key: slot.to_string(),
                status: "failure injected by test_only.fail_store".into(),
            });
        }
        let (mut value, mut cas) = self.host.get(slot)?;
        // Envoy hands an empty value back as no data with a token: only a missing token means
        // a missing entry.
        if cas.is_none() {
            // Missing: create it vacant (Envoy ignores the token for a missing key) and re-read
            // to get a real token.
            self.created_late += 1;
            self.host.set(&self.slot, &vacant(), None)?;
            (value, cas) = self.host.get(&self.slot)?;
        }
        let version = u64::from(cas.unwrap_or(0));
        let bytes = value
            .as_deref()
            .and_then(decode_slot)
            .and_then(|(owner, state)| (owner == fp).then(|| state.to_vec()));
        Ok(Stored { bytes, version })
    }

    fn store(&mut self, key: &CounterKey, bytes: &[u8], version: u64) -> Result<bool, HostError> {
        // Token 0 would be an unconditional write: never send it.
        let Some(cas) = u32::try_from(version).ok().filter(|&c| c != 0) else {
            return Ok(false);
        };
        let fp = self.locate(key);
        self.host
            .set(&self.slot, &encode_slot(fp, bytes), Some(cas))
    }

    fn groups_by_subject(&self) -> bool {
        true
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! Shared data with Envoy's semantics, in memory.
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    #[derive(Default)]
    pub struct FakeShared {
        pub map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
        next: RefCell<u32>,
    }

    impl SharedData for FakeShared {
        fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), HostError> {
            // Like Envoy: an empty value comes back as no data, with its token.
            Ok(match self.map.borrow().get(key) {
                Some((v, c)) if v.is_empty() => (None, Some(*c)),
                Some((v, c)) => (Some(v.clone()), Some(*c)),
                None => (None, None),
            })
        }

        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, HostError> {
            let mut map = self.map.borrow_mut();
            let mut next = self.next.borrow_mut();
            *next += 1;
            if let Some((v, c)) = map.get_mut(key) {
                if cas.is_some_and(|cas| cas != *c) {
                    return Ok(false);
                }
                *v = value.to_vec();
                *c = *next;
            } else {
                map.insert(key.to_string(), (value.to_vec(), *next));
            }
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeShared;
    use super::*;
    use tollgate_core::gate::{GateAction, GateOptions, HttpRequest};
    use tollgate_core::{Policy, Timestamp};

    #[test]
    fn init_writes_every_slot_once() {
        let host = FakeShared::default();
        assert_eq!(init_table(&host, 16).unwrap(), 16);
        assert_eq!(init_table(&host, 16).unwrap(), 0);
        assert_eq!(host.map.borrow().len(), 17);
        // Vacant slots are already full width: using them allocates nothing new.
        assert_eq!(host.map.borrow()["tg:w128:16:3"].0, vec![0u8; SLOT_WIDTH]);
    }

    #[test]
    fn every_value_is_full_width_and_round_trips() {
        let host = FakeShared::default();
        init_table(&host, 4).unwrap();
        let mut s = SlotStore::new(&host, 4);
        let k = CounterKey::from("r|u:a");
        for state in [&b"x"[..], &[7u8; 118][..], &[9u8; 200][..]] {
            let st = s.load(&k).unwrap();
            assert!(s.store(&k, state, st.version).unwrap());
            assert_eq!(s.load(&k).unwrap().bytes.as_deref(), Some(state));
            let widths: Vec<usize> = host
                .map
                .borrow()
                .iter()
                .filter(|(k, _)| !k.ends_with(":ready"))
                .map(|(_, v)| v.0.len())
                .collect();
            let expected = SLOT_WIDTH.max(HEADER + state.len());
            assert!(
                widths.iter().all(|w| *w == SLOT_WIDTH || *w == expected),
                "{widths:?}"
            );
        }
        // Garbage in a slot reads as vacant, never panics.
        assert_eq!(decode_slot(&[]), None);
        assert_eq!(decode_slot(&[1, 2, 3]), None);
        assert_eq!(decode_slot(&[0xff; 12]), None, "length beyond the value");
    }

    #[test]
    fn cas_conflict_and_eviction() {
        let host = FakeShared::default();
        init_table(&host, 1).unwrap();
        let mut a = SlotStore::new(&host, 1);
        let ka = CounterKey::from("r|u:a");
        let kb = CounterKey::from("r|u:b");
        let s = a.load(&ka).unwrap();
        assert_eq!(s.bytes, None);
        assert!(a.store(&ka, b"AAA", s.version).unwrap());
        // A stale token loses.
        assert!(!a.store(&ka, b"BBB", s.version).unwrap());
        assert_eq!(a.load(&ka).unwrap().bytes, Some(b"AAA".to_vec()));
        // One slot: b sees it as absent and takes it over; a then starts fresh.
        let sb = a.load(&kb).unwrap();
        assert_eq!(sb.bytes, None);
        assert!(a.store(&kb, b"B", sb.version).unwrap());
        assert_eq!(a.load(&ka).unwrap().bytes, None);
        assert_eq!(a.created_late, 0);
        assert!(!a.store(&ka, b"x", 0).unwrap(), "token 0 is refused");
    }

    #[test]
    fn interleaved_workers_on_a_fresh_key_never_both_win() {
        // Two workers read the same fresh counter, both decide to grant, both write: with the
        // table pre-written the second write is a CAS conflict, so it must re-read and decide
        // again. Without it, Envoy would have let both "create" the key: a lost update.
        let host = FakeShared::default();
        init_table(&host, 64).unwrap();
        let k = CounterKey::from("r|u:x");
        let (mut a, mut b) = (SlotStore::new(&host, 64), SlotStore::new(&host, 64));
        let (ra, rb) = (a.load(&k).unwrap(), b.load(&k).unwrap());
        assert_eq!((ra.bytes.as_deref(), rb.bytes.as_deref()), (None, None));
        assert!(a.store(&k, b"one", ra.version).unwrap());
        assert!(
            !b.store(&k, b"one", rb.version).unwrap(),
            "the loser must retry"
        );
        let again = b.load(&k).unwrap();
        assert_eq!(again.bytes.as_deref(), Some(&b"one"[..]));
        assert!(b.store(&k, b"two", again.version).unwrap());
    }

    #[test]
    fn missing_slot_is_created_then_cas_applies() {
        let host = FakeShared::default();
        let mut s = SlotStore::new(&host, 8);
        let k = CounterKey::from("r|g");
        let st = s.load(&k).unwrap();
        assert_eq!(st.bytes, None);
        assert_ne!(st.version, 0);
        assert_eq!(s.created_late, 1);
        assert!(s.store(&k, b"1", st.version).unwrap());
    }

    #[test]
    fn the_gate_runs_over_the_slot_table() {
        let host = FakeShared::default();
        init_table(&host, 64).unwrap();
        let policy = Policy::from_json(
            r#"{"version":1,"rules":[{"name":"api","algorithm":"fixed_window","limit":3,"window":"1m","scope":"global"}]}"#,
        )
        .unwrap();
        let none = |_: &str| None;
        let req = HttpRequest {
            method: "GET",
            path: "/x",
            header: &none,
            client_ip: Some("127.0.0.1"),
            claims: None,
            cost: 1,
        };
        let now = Timestamp::from_secs(1_800_000_000);
        let mut allowed = 0;
        for _ in 0..5 {
            let mut store = SlotStore::new(&host, 64);
            if let GateAction::Proceed { .. } =
                policy.gate(&GateOptions::default(), &req, now, &mut store)
            {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 3);
    }
}
