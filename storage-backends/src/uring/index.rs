//! The in-memory index of one shard's namespace: which slot holds which key, the
//! per-layer checksums of each live block, least-recently-used order, pins
//! that keep a slot from being reused while a read into it is in flight, and
//! per key the slots outside the index whose records on disk still name it
//! (older copies), which a removal must clear too.
//!
//! Pure bookkeeping, no I/O: every state change here is decided before or after the
//! disk operation that makes it durable, by the shard.

use std::collections::HashMap;

use block_layout::BlockKey;

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Taken by a put in progress; not visible to lookups.
    Writing,
    Live,
    /// Replaced or deleted while pinned; freed when the last pin goes.
    Retired,
}

#[derive(Debug, Clone)]
struct Slot {
    state: SlotState,
    key: BlockKey,
    generation: u64,
    pins: u32,
    /// The header file may hold a valid record for this slot: it must be
    /// invalidated durably before the slot's data is overwritten.
    record_on_disk: bool,
    newer: u32,
    older: u32,
    /// In its key's list of stale records (see `SlotTable::stale`), and
    /// its neighbours there.
    stale_linked: bool,
    stale_prev: u32,
    stale_next: u32,
}

impl Slot {
    /// A slot outside the index whose record on disk may still name its key.
    fn holds_stale_record(&self) -> bool {
        self.record_on_disk && matches!(self.state, SlotState::Free | SlotState::Retired)
    }
}

/// What [`SlotTable::next_live`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextLive {
    Found {
        slot: u32,
        key: BlockKey,
    },
    /// No live slot among those looked at; go on from `next`.
    Searched {
        next: u32,
    },
    /// No live slot from there to the last.
    End,
}

/// A slot taken for a put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub slot: u32,
    /// The slot's old header record must be invalidated (and synced) first.
    pub needs_invalidation: bool,
    /// The key evicted to make room, if any.
    pub evicted: Option<BlockKey>,
}

#[derive(Debug)]
pub struct SlotTable {
    slots: Vec<Slot>,
    layers: usize,
    crcs: Vec<u32>,
    map: HashMap<BlockKey, u32>,
    free: Vec<u32>,
    /// Most recently used live slot.
    newest: u32,
    /// Least recently used live slot: the next to evict.
    oldest: u32,
    /// Per key, the first of a doubly linked list (through the slots) of the
    /// free or retired slots whose records on disk may still name it: a
    /// slot is listed exactly while `Slot::holds_stale_record` (under its
    /// key), so a removal finds them without a pass over every slot.
    stale: HashMap<BlockKey, u32>,
}

impl SlotTable {
    pub fn new(slot_count: u32, layers: u16) -> Self {
        let slot = Slot {
            state: SlotState::Free,
            key: BlockKey(0),
            generation: 0,
            pins: 0,
            record_on_disk: false,
            newer: NIL,
            older: NIL,
            stale_linked: false,
            stale_prev: NIL,
            stale_next: NIL,
        };
        Self {
            slots: vec![slot; slot_count as usize],
            layers: usize::from(layers),
            crcs: vec![0; slot_count as usize * usize::from(layers)],
            map: HashMap::with_capacity(slot_count as usize),
            free: (0..slot_count).rev().collect(),
            newest: NIL,
            oldest: NIL,
            stale: HashMap::new(),
        }
    }

    pub fn slot_count(&self) -> u32 {
        u32::try_from(self.slots.len()).expect("slot count came from a u32")
    }

    pub fn live_count(&self) -> usize {
        self.map.len()
    }

    pub fn keys(&self) -> impl Iterator<Item = BlockKey> + '_ {
        self.map.keys().copied()
    }

    pub fn lookup(&self, key: BlockKey) -> Option<u32> {
        self.map.get(&key).copied()
    }

    pub fn layer_crcs(&self, slot: u32) -> &[u32] {
        let start = slot as usize * self.layers;
        &self.crcs[start..start + self.layers]
    }

    /// Marks a live slot most recently used.
    pub fn touch(&mut self, slot: u32) {
        debug_assert_eq!(self.slots[slot as usize].state, SlotState::Live);
        self.unlink(slot);
        self.link_newest(slot);
    }

    pub fn pin(&mut self, slot: u32) {
        self.slots[slot as usize].pins += 1;
    }

    pub fn unpin(&mut self, slot: u32) {
        let entry = &mut self.slots[slot as usize];
        assert!(entry.pins > 0, "unpin of an unpinned slot");
        entry.pins -= 1;
        if entry.pins == 0 && entry.state == SlotState::Retired {
            self.release(slot);
        }
    }

    /// Takes a slot for a new block: a free one, else the least recently used
    /// unpinned live one. `None` when every slot is pinned or being written.
    pub fn reserve(&mut self) -> Option<Reservation> {
        if let Some(slot) = self.free.pop() {
            self.unlist_stale(slot);
            let entry = &mut self.slots[slot as usize];
            entry.state = SlotState::Writing;
            return Some(Reservation {
                slot,
                needs_invalidation: entry.record_on_disk,
                evicted: None,
            });
        }
        let mut candidate = self.oldest;
        while candidate != NIL && self.slots[candidate as usize].pins > 0 {
            candidate = self.slots[candidate as usize].newer;
        }
        if candidate == NIL {
            return None;
        }
        let evicted = self.slots[candidate as usize].key;
        self.unlink(candidate);
        self.map.remove(&evicted);
        let entry = &mut self.slots[candidate as usize];
        entry.state = SlotState::Writing;
        Some(Reservation {
            slot: candidate,
            needs_invalidation: entry.record_on_disk,
            evicted: Some(evicted),
        })
    }

    /// The slot's old record has been invalidated durably.
    pub fn mark_record_cleared(&mut self, slot: u32) {
        self.unlist_stale(slot);
        self.slots[slot as usize].record_on_disk = false;
    }

    /// Gives back a reservation whose put failed. Its data may be partly written,
    /// but no record describes it, so it is simply free.
    pub fn abandon(&mut self, slot: u32) {
        let entry = &mut self.slots[slot as usize];
        assert_eq!(
            entry.state,
            SlotState::Writing,
            "abandon of a slot not being written"
        );
        entry.state = SlotState::Free;
        self.free.push(slot);
        self.list_stale(slot);
    }

    /// Makes a written and durably recorded block visible. Returns the slot that
    /// held the key before, which is now retired or free.
    pub fn commit(
        &mut self,
        slot: u32,
        key: BlockKey,
        generation: u64,
        crcs: &[u32],
    ) -> Option<u32> {
        assert_eq!(crcs.len(), self.layers, "one checksum per layer");
        let entry = &mut self.slots[slot as usize];
        assert_eq!(
            entry.state,
            SlotState::Writing,
            "commit of a slot not being written"
        );
        entry.state = SlotState::Live;
        entry.key = key;
        entry.generation = generation;
        entry.record_on_disk = true;
        let start = slot as usize * self.layers;
        self.crcs[start..start + self.layers].copy_from_slice(crcs);
        self.link_newest(slot);
        let previous = self.map.insert(key, slot);
        if let Some(old) = previous {
            self.retire(old);
        }
        previous
    }

    /// Inserts a block found valid at recovery (in ascending generation order, so the
    /// newest ends most recently used). A second record of the same key wins when
    /// its generation is higher.
    pub fn recover(&mut self, slot: u32, key: BlockKey, generation: u64, crcs: &[u32]) {
        if let Some(&existing) = self.map.get(&key) {
            if self.slots[existing as usize].generation >= generation {
                // A stale record: the slot is free, but its record must be cleared
                // before reuse (and when its key is removed).
                self.mark_record_present(slot, Some(key));
                return;
            }
        }
        self.free.retain(|&free| free != slot);
        self.unlist_stale(slot);
        self.slots[slot as usize].state = SlotState::Writing;
        self.commit(slot, key, generation, crcs);
    }

    /// Marks a slot whose record on disk is not in the index (torn, stale,
    /// or written by a put that failed) for clearing; `key`, when the record
    /// may be valid, is the block it names, so that a removal of that key
    /// clears it too.
    pub fn mark_record_present(&mut self, slot: u32, key: Option<BlockKey>) {
        self.unlist_stale(slot);
        let entry = &mut self.slots[slot as usize];
        entry.record_on_disk = true;
        if let Some(key) = key {
            entry.key = key;
        }
        self.list_stale(slot);
    }

    /// The slots outside the index (free or retired) whose records on disk
    /// may still name one of `keys`: what a removal must clear as well as
    /// the live slots it takes out, or a restart would bring an older copy
    /// back. Walks each key's list; each slot once.
    pub fn recorded_slots_of(&self, keys: &[BlockKey]) -> Vec<u32> {
        let mut slots = Vec::new();
        for key in keys {
            let mut slot = self.stale.get(key).copied().unwrap_or(NIL);
            while slot != NIL {
                slots.push(slot);
                slot = self.slots[slot as usize].stale_next;
            }
        }
        slots.sort_unstable();
        slots.dedup();
        slots
    }

    /// Lists `slot` under its key if it holds a stale record (and is not
    /// listed yet). Called after every change that may make it one.
    fn list_stale(&mut self, slot: u32) {
        let entry = &self.slots[slot as usize];
        if entry.stale_linked || !entry.holds_stale_record() {
            return;
        }
        let head = self.stale.insert(entry.key, slot).unwrap_or(NIL);
        if head != NIL {
            self.slots[head as usize].stale_prev = slot;
        }
        let entry = &mut self.slots[slot as usize];
        entry.stale_linked = true;
        entry.stale_prev = NIL;
        entry.stale_next = head;
    }

    /// Takes `slot` off its key's list. Called before every change of its
    /// key, state or record that may make it no longer hold a stale record.
    fn unlist_stale(&mut self, slot: u32) {
        let Slot {
            stale_linked,
            stale_prev,
            stale_next,
            key,
            ..
        } = self.slots[slot as usize];
        if !stale_linked {
            return;
        }
        if stale_prev != NIL {
            self.slots[stale_prev as usize].stale_next = stale_next;
        } else if stale_next != NIL {
            self.stale.insert(key, stale_next);
        } else {
            self.stale.remove(&key);
        }
        if stale_next != NIL {
            self.slots[stale_next as usize].stale_prev = stale_prev;
        }
        let entry = &mut self.slots[slot as usize];
        entry.stale_linked = false;
        entry.stale_prev = NIL;
        entry.stale_next = NIL;
    }

    /// The first live slot at or after `from`, looking at `budget` slots at
    /// most (a scrub's walk over the slots, a bounded step at a time).
    pub fn next_live(&self, from: u32, budget: u32) -> NextLive {
        let end = self.slot_count();
        let stop = from.saturating_add(budget).min(end);
        for slot in from..stop {
            let entry = &self.slots[slot as usize];
            if entry.state == SlotState::Live {
                return NextLive::Found {
                    slot,
                    key: entry.key,
                };
            }
        }
        if stop >= end {
            NextLive::End
        } else {
            NextLive::Searched { next: stop }
        }
    }

    /// The live slots from least to most recently used, each with the
    /// generation of its block: what `restore_use_order` takes after a
    /// restart.
    pub fn use_order(&self) -> Vec<(u32, u64)> {
        let mut order = Vec::with_capacity(self.map.len());
        let mut slot = self.oldest;
        while slot != NIL {
            let entry = &self.slots[slot as usize];
            order.push((slot, entry.generation));
            slot = entry.newer;
        }
        order
    }

    /// Puts the use order saved by an earlier process back (recovery links
    /// blocks in generation order, which forgets every load since they were
    /// stored). Each saved entry whose slot still holds the block of that
    /// generation becomes most recently used in turn; blocks stored after
    /// the save (generation `stored_after` or later) then go above them in
    /// generation order; the rest keep their places below. Returns how many
    /// saved entries were taken.
    pub fn restore_use_order(&mut self, saved: &[(u32, u64)], stored_after: u64) -> usize {
        let mut taken = 0;
        for &(slot, generation) in saved {
            let Some(entry) = self.slots.get(slot as usize) else {
                continue;
            };
            if entry.state == SlotState::Live && entry.generation == generation {
                self.touch(slot);
                taken += 1;
            }
        }
        let mut stored_since: Vec<(u64, u32)> = self
            .map
            .values()
            .map(|&slot| (self.slots[slot as usize].generation, slot))
            .filter(|&(generation, _)| generation >= stored_after)
            .collect();
        stored_since.sort_unstable();
        for (_, slot) in stored_since {
            self.touch(slot);
        }
        taken
    }

    /// Removes a key. Returns its slot, which must have its record invalidated.
    pub fn remove(&mut self, key: BlockKey) -> Option<u32> {
        let slot = self.map.remove(&key)?;
        self.retire(slot);
        Some(slot)
    }

    fn retire(&mut self, slot: u32) {
        self.unlink(slot);
        let entry = &mut self.slots[slot as usize];
        entry.state = SlotState::Retired;
        if entry.pins == 0 {
            self.release(slot);
        }
        self.list_stale(slot);
    }

    fn release(&mut self, slot: u32) {
        let entry = &mut self.slots[slot as usize];
        entry.state = SlotState::Free;
        self.free.push(slot);
    }

    fn link_newest(&mut self, slot: u32) {
        let entry = &mut self.slots[slot as usize];
        entry.older = self.newest;
        entry.newer = NIL;
        if self.newest != NIL {
            self.slots[self.newest as usize].newer = slot;
        }
        self.newest = slot;
        if self.oldest == NIL {
            self.oldest = slot;
        }
    }

    fn unlink(&mut self, slot: u32) {
        let Slot { newer, older, .. } = self.slots[slot as usize];
        let linked = newer != NIL || older != NIL || self.newest == slot;
        if !linked {
            return;
        }
        if newer != NIL {
            self.slots[newer as usize].older = older;
        } else {
            self.newest = older;
        }
        if older != NIL {
            self.slots[older as usize].newer = newer;
        } else {
            self.oldest = newer;
        }
        let entry = &mut self.slots[slot as usize];
        entry.newer = NIL;
        entry.older = NIL;
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn put(table: &mut SlotTable, key: u128) -> Reservation {
        let reservation = table.reserve().expect("a slot");
        table.commit(reservation.slot, BlockKey(key), key as u64, &[key as u32]);
        reservation
    }

    #[test]
    fn least_recently_used_is_evicted_first() {
        let mut table = SlotTable::new(3, 1);
        for key in 1..=3 {
            put(&mut table, key);
        }
        table.touch(table.lookup(BlockKey(1)).expect("present"));
        let reservation = put(&mut table, 4);
        assert_eq!(reservation.evicted, Some(BlockKey(2)));
        assert!(reservation.needs_invalidation);
        assert!(table.lookup(BlockKey(2)).is_none());
        assert!(table.lookup(BlockKey(1)).is_some());
    }

    /// A table as a restart rebuilds it from `table`'s live records: in
    /// generation order.
    fn recovered(table: &SlotTable) -> SlotTable {
        let mut live: Vec<(u64, u32, BlockKey)> = table
            .map
            .iter()
            .map(|(&key, &slot)| (table.slots[slot as usize].generation, slot, key))
            .collect();
        live.sort_unstable();
        let mut rebuilt = SlotTable::new(table.slot_count(), 1);
        for (generation, slot, key) in live {
            rebuilt.recover(slot, key, generation, &[0]);
        }
        rebuilt
    }

    /// 0: a store of `key` (evicting when full), 1: its removal, 2: a load.
    fn apply(table: &mut SlotTable, generation: &mut u64, op: u8, key: u128) {
        match op {
            0 => {
                let reservation = table.reserve().expect("nothing pinned: a slot");
                *generation += 1;
                table.commit(reservation.slot, BlockKey(key), *generation, &[0]);
            }
            1 => {
                table.remove(BlockKey(key));
            }
            _ => {
                if let Some(slot) = table.lookup(BlockKey(key)) {
                    table.touch(slot);
                }
            }
        }
    }

    proptest! {
        /// A walk with `next_live`, however small its steps, meets every
        /// live block once, in slot order, and ends.
        #[test]
        fn a_walk_over_the_slots_meets_every_live_block_once(
            operations in prop::collection::vec((0u8..3, 0u128..40), 0..200),
            budget in 1u32..20,
        ) {
            let mut table = SlotTable::new(32, 1);
            let mut generation = 0;
            for (op, key) in operations {
                apply(&mut table, &mut generation, op, key);
            }
            let mut met = Vec::new();
            let mut from = 0;
            for _ in 0..=64 {
                match table.next_live(from, budget) {
                    NextLive::Found { slot, key } => {
                        prop_assert_eq!(table.lookup(key), Some(slot));
                        met.push(slot);
                        from = slot + 1;
                    }
                    NextLive::Searched { next } => {
                        prop_assert!(next > from);
                        from = next;
                    }
                    NextLive::End => break,
                }
            }
            prop_assert_eq!(table.next_live(from, budget), NextLive::End, "ends");
            let mut live: Vec<u32> = table.map.values().copied().collect();
            live.sort_unstable();
            prop_assert_eq!(met, live);
        }

        /// After a restart, the saved use order comes back exactly; blocks
        /// stored (or removed, or evicted) after the save take the places a
        /// table that never restarted gives them.
        #[test]
        fn a_restored_use_order_is_the_saved_one_with_later_stores_above_it(
            before in prop::collection::vec((0u8..3, 0u128..10), 1..200),
            after in prop::collection::vec((0u8..2, 0u128..10), 0..40),
        ) {
            let mut table = SlotTable::new(6, 1);
            let mut generation = 0;
            for (op, key) in before {
                apply(&mut table, &mut generation, op, key);
            }
            let saved = table.use_order();
            let stored_after = generation + 1;
            let mut restarted = recovered(&table);
            prop_assert_eq!(restarted.restore_use_order(&saved, stored_after), saved.len());
            prop_assert_eq!(restarted.use_order(), saved.clone());
            // Stores and removals after the save (a crash later: the save is
            // stale by then).
            for (op, key) in after {
                apply(&mut table, &mut generation, op, key);
            }
            let mut restarted = recovered(&table);
            restarted.restore_use_order(&saved, stored_after);
            prop_assert_eq!(restarted.use_order(), table.use_order());
        }
    }

    #[test]
    fn pinned_slots_are_not_evicted() {
        let mut table = SlotTable::new(2, 1);
        put(&mut table, 1);
        put(&mut table, 2);
        let pinned = [1u128, 2].map(|key| table.lookup(BlockKey(key)).expect("present"));
        pinned.iter().for_each(|&slot| table.pin(slot));
        assert!(table.reserve().is_none(), "all pinned: no slot");
        table.unpin(pinned[1]);
        assert_eq!(table.reserve().map(|r| r.evicted), Some(Some(BlockKey(2))));
    }

    #[test]
    fn replaced_pinned_slot_is_freed_when_unpinned() {
        let mut table = SlotTable::new(2, 1);
        put(&mut table, 7);
        let old = table.lookup(BlockKey(7)).expect("present");
        table.pin(old);
        put(&mut table, 7);
        assert_ne!(table.lookup(BlockKey(7)), Some(old));
        table.unpin(old);
        let reservation = table.reserve().expect("the old slot is free again");
        assert_eq!(reservation.slot, old);
        assert_eq!(reservation.evicted, None);
        assert!(
            reservation.needs_invalidation,
            "its stale record must be cleared first"
        );
    }

    /// Every slot's stale record found by a pass over all slots: what the
    /// per-key lists must say.
    fn stale_by_scan(table: &SlotTable, key: BlockKey) -> Vec<u32> {
        (0..table.slot_count())
            .filter(|&slot| {
                let entry = &table.slots[slot as usize];
                entry.holds_stale_record() && entry.key == key
            })
            .collect()
    }

    proptest! {
        /// The per-key lists of stale records say what a pass over every
        /// slot says, through puts (committed, replacing, evicting, failed
        /// before or after their record), removals, pins and clearings.
        #[test]
        fn stale_lists_match_a_scan(operations in prop::collection::vec((0u8..7, 0u128..6), 1..300)) {
            let mut table = SlotTable::new(6, 1);
            let mut pinned: Vec<u32> = Vec::new();
            let mut generation = 0;
            for (operation, key) in operations {
                match operation {
                    0 | 1 | 2 => {
                        let Some(reservation) = table.reserve() else { continue };
                        if reservation.needs_invalidation && operation != 2 {
                            table.mark_record_cleared(reservation.slot);
                        }
                        if operation == 2 {
                            // Failed after its record was written.
                            table.mark_record_present(reservation.slot, Some(BlockKey(key)));
                            table.abandon(reservation.slot);
                        } else {
                            generation += 1;
                            table.commit(reservation.slot, BlockKey(key), generation, &[1]);
                        }
                    }
                    3 => {
                        table.remove(BlockKey(key));
                    }
                    4 => {
                        if let Some(slot) = table.lookup(BlockKey(key)) {
                            table.pin(slot);
                            pinned.push(slot);
                        }
                    }
                    5 => {
                        if let Some(slot) = pinned.pop() {
                            table.unpin(slot);
                        }
                    }
                    _ => {
                        let slots = table.recorded_slots_of(&[BlockKey(key)]);
                        if let Some(&slot) = slots.first() {
                            // A removal's clearing synced (as a put's would).
                            table.mark_record_cleared(slot);
                        }
                    }
                }
                for key in 0..6 {
                    prop_assert_eq!(table.recorded_slots_of(&[BlockKey(key)]), stale_by_scan(&table, BlockKey(key)));
                }
            }
        }

        /// Against a model: every key maps to exactly one live slot, no slot is shared,
        /// and the table never holds more than its capacity.
        #[test]
        fn table_matches_a_model(operations in prop::collection::vec((0u8..4, 0u128..12), 1..300)) {
            let mut table = SlotTable::new(5, 2);
            let mut model: std::collections::HashSet<u128> = Default::default();
            let mut generation = 0;
            for (operation, key) in operations {
                match operation {
                    0 | 1 => {
                        let reservation = table.reserve().expect("nothing pinned");
                        if let Some(evicted) = reservation.evicted {
                            prop_assert!(model.remove(&evicted.0));
                        }
                        generation += 1;
                        table.commit(reservation.slot, BlockKey(key), generation, &[1, 2]);
                        model.insert(key);
                    }
                    2 => {
                        prop_assert_eq!(table.remove(BlockKey(key)).is_some(), model.remove(&key));
                    }
                    _ => {
                        if let Some(slot) = table.lookup(BlockKey(key)) {
                            table.touch(slot);
                        }
                    }
                }
                prop_assert!(model.len() <= 5);
                prop_assert_eq!(table.live_count(), model.len());
                let mut slots: Vec<u32> = model.iter().map(|&k| table.lookup(BlockKey(k)).expect("in model")).collect();
                slots.sort_unstable();
                slots.dedup();
                prop_assert_eq!(slots.len(), model.len());
            }
        }
    }
}
