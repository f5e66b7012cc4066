//! A conformance suite for any [`paxos::Storage`]: every implementation runs it.
//!
//! It checks the trait's rules: the promise only rises; `accept` is a per-slot upsert
//! that never drops or alters another slot; `entries` returns accepted slots in order
//! and skips gaps; and, for stores that persist, everything written before a `sync`
//! is there after reopening. Failures panic with a message (it is meant for tests).

use bytes::Bytes;
use paxos::{Ballot, Command, Entry, Slot, Storage, Value};
use std::collections::BTreeMap;

fn value(tag: u64, n: usize) -> Value {
    if n == 0 {
        return Value::Noop;
    }
    Value::Batch(
        (0..n as u64)
            .map(|i| Command {
                client: tag,
                seq: i,
                payload: Bytes::from(vec![(tag as u8) ^ (i as u8); (tag as usize * 7 + i as usize) % 300]),
            })
            .collect(),
    )
}

fn entry(slot: Slot, round: u64, node: u64, tag: u64, n: usize) -> Entry {
    Entry { slot, ballot: Ballot::new(round, node), value: value(tag, n) }
}

fn check_matches<S: Storage>(s: &S, model: &BTreeMap<Slot, Entry>, promise: Ballot, when: &str) {
    assert_eq!(s.promise(), promise, "{when}: promise");
    let last = model.keys().next_back().copied().unwrap_or(0);
    assert_eq!(s.last_slot(), last, "{when}: last_slot");
    for slot in 0..=last + 2 {
        let got = s.entry(slot).unwrap_or_else(|e| panic!("{when}: entry({slot}): {e}"));
        assert_eq!(got.as_ref(), model.get(&slot), "{when}: entry({slot})");
    }
    let all = s.entries(0, last + 5).unwrap_or_else(|e| panic!("{when}: entries: {e}"));
    let want: Vec<Entry> = model.values().cloned().collect();
    assert_eq!(all, want, "{when}: entries(0, last+5)");
    if last >= 3 {
        let mid = s.entries(2, last - 1).expect("entries");
        let want: Vec<Entry> = model.range(2..=last - 1).map(|(_, e)| e.clone()).collect();
        assert_eq!(mid, want, "{when}: entries(2, last-1)");
    }
    assert!(s.entries(5, 2).expect("entries").is_empty(), "{when}: entries(5, 2) is empty");
}

/// Runs the suite. `fresh` makes an empty store. `reopen`, for stores that persist,
/// drops a store (after a `sync`) and opens the same data again.
pub fn check_storage<S: Storage>(fresh: &mut dyn FnMut() -> S, mut reopen: Option<&mut dyn FnMut(S) -> S>) {
    let mut s = fresh();
    let mut model: BTreeMap<Slot, Entry> = BTreeMap::new();
    check_matches(&s, &model, Ballot::ZERO, "empty");

    // The promise only rises; an equal promise is accepted.
    s.set_promise(Ballot::new(1, 1)).expect("set_promise");
    s.set_promise(Ballot::new(1, 2)).expect("set_promise");
    s.set_promise(Ballot::new(1, 2)).expect("set_promise (equal)");
    let mut promise = Ballot::new(1, 2);
    assert_eq!(s.promise(), promise, "promise after raises");

    // Accept a few slots, with a gap.
    for (slot, n) in [(1, 1), (2, 3), (3, 0), (10, 2)] {
        let e = entry(slot, 1, 2, slot, n);
        s.accept(e.clone()).expect("accept");
        model.insert(slot, e);
    }
    check_matches(&s, &model, promise, "after first accepts");

    // Upsert: re-accepting slot 2 under a higher ballot replaces slot 2 only.
    let e = entry(2, 2, 1, 99, 2);
    s.accept(e.clone()).expect("re-accept");
    model.insert(2, e);
    check_matches(&s, &model, promise, "after re-accept of slot 2");

    // Re-accepting a slot below the last one never drops later slots.
    let e = entry(1, 3, 3, 77, 1);
    s.accept(e.clone()).expect("re-accept slot 1");
    model.insert(1, e);
    check_matches(&s, &model, promise, "after re-accept of slot 1");

    s.sync().expect("sync");
    if let Some(reopen) = reopen.as_mut() {
        s = reopen(s);
        check_matches(&s, &model, promise, "after reopen");
    }

    // More traffic after a reopen: many slots (enough to fill several small segments),
    // re-accepts interleaved, promises raised in between.
    for i in 0..300u64 {
        let slot = 11 + i;
        let e = entry(slot, 3 + i / 100, 1, slot, (i % 4) as usize);
        s.accept(e.clone()).expect("accept");
        model.insert(slot, e);
        if i % 7 == 0 {
            let back = *model.keys().nth((i as usize * 13) % model.len()).expect("a slot");
            let old = model[&back].ballot;
            let e = entry(back, old.round + 1, old.node, i + 1000, 1);
            s.accept(e.clone()).expect("re-accept");
            model.insert(back, e);
        }
        if i % 50 == 0 {
            promise = Ballot::new(10 + i, 2);
            s.set_promise(promise).expect("set_promise");
        }
    }
    check_matches(&s, &model, promise, "after bulk");
    s.sync().expect("sync");
    if let Some(reopen) = reopen.as_mut() {
        s = reopen(s);
        check_matches(&s, &model, promise, "after second reopen");
        // And once more without writes in between.
        s = reopen(s);
        check_matches(&s, &model, promise, "after third reopen");
    }
}
