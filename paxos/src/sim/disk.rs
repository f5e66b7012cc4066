//! A simulated disk: writes are buffered until `sync`; a crash loses what was not
//! synced. The durable part outlives the replica that used it (it is shared with the
//! simulator), so a restarted replica finds exactly what was persisted.

use crate::storage::{MemStorage, Storage, StorageError};
use crate::types::{Ballot, Entry, Slot};
use std::cell::RefCell;
use std::rc::Rc;

#[derive(Debug, Clone)]
enum Write {
    Promise(Ballot),
    Accept(Entry),
    Chosen(Slot),
    Trim(Slot),
}

/// What survives a crash: the state as of the last successful sync.
pub type Durable = Rc<RefCell<MemStorage>>;

/// Storage over a simulated disk (see the module docs).
#[derive(Debug)]
pub struct SimDisk {
    durable: Durable,
    /// The durable state plus the unsynced writes: what the replica sees.
    view: MemStorage,
    pending: Vec<Write>,
    syncs: u64,
}

impl SimDisk {
    /// A disk whose durable state is `durable` (shared with the simulator).
    pub fn open(durable: Durable) -> Self {
        let view = durable.borrow().clone();
        SimDisk { durable, view, pending: Vec::new(), syncs: 0 }
    }

    /// Number of syncs done.
    pub fn syncs(&self) -> u64 {
        self.syncs
    }
}

impl Storage for SimDisk {
    fn promise(&self) -> Ballot {
        self.view.promise()
    }

    fn set_promise(&mut self, b: Ballot) -> Result<(), StorageError> {
        self.view.set_promise(b)?;
        self.pending.push(Write::Promise(b));
        Ok(())
    }

    fn accept(&mut self, entry: Entry) -> Result<(), StorageError> {
        self.view.accept(entry.clone())?;
        self.pending.push(Write::Accept(entry));
        Ok(())
    }

    fn entry(&self, slot: Slot) -> Result<Option<Entry>, StorageError> {
        self.view.entry(slot)
    }

    fn last_slot(&self) -> Slot {
        self.view.last_slot()
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        let mut d = self.durable.borrow_mut();
        for w in self.pending.drain(..) {
            match w {
                Write::Promise(b) => d.set_promise(b)?,
                Write::Accept(e) => d.accept(e)?,
                Write::Chosen(c) => d.set_chosen_hint(c)?,
                Write::Trim(s) => d.trim(s)?,
            }
        }
        self.syncs += 1;
        Ok(())
    }

    fn entries(&self, from: Slot, to: Slot) -> Result<Vec<Entry>, StorageError> {
        self.view.entries(from, to)
    }

    fn set_chosen_hint(&mut self, slot: Slot) -> Result<(), StorageError> {
        self.view.set_chosen_hint(slot)?;
        self.pending.push(Write::Chosen(slot));
        Ok(())
    }

    fn chosen_hint(&self) -> Slot {
        self.view.chosen_hint()
    }

    fn trim(&mut self, upto: Slot) -> Result<(), StorageError> {
        self.view.trim(upto)?;
        self.pending.push(Write::Trim(upto));
        Ok(())
    }

    fn trimmed(&self) -> Slot {
        self.view.trimmed()
    }
}
