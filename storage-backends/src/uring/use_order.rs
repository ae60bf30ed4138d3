//! The use order a stopping gateway saves (`<namespace>/shard-<n>.use-order`),
//! so that eviction after a restart still takes what went cold, not what was
//! stored first: recovery from the header records alone knows only the order
//! blocks were stored in, and a prompt loaded every turn since it was stored
//! long ago would be the first to go. A hint, not a record: the file is
//! written whole and renamed into place, and one that is missing, torn or
//! stale (a crash after a later run) costs the order, never a block
//! (`format::encode_use_order`).

use std::path::PathBuf;

use super::format::{self, UseOrder};
use super::{io_error, ShardNamespace};
use crate::{IoOp, StoreError};

impl ShardNamespace {
    /// Restores the order saved at the last stop, if there is one that
    /// decodes. Returns the saved next generation (0 without), below which
    /// the shard must not number new blocks.
    pub(super) fn restore_use_order(&mut self) -> u64 {
        let path = &self.use_order_path;
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return 0,
            Err(error) => {
                tracing::warn!(
                    "{}: use order not restored ({error}); eviction starts from the order blocks were stored in",
                    path.display()
                );
                return 0;
            }
        };
        match format::decode_use_order(&bytes) {
            Ok(saved) => {
                let taken = self
                    .table
                    .restore_use_order(&saved.entries, saved.next_generation);
                if taken > 0 {
                    tracing::info!(
                        "namespace {:?}: use order of {taken} blocks restored from {}",
                        self.name,
                        path.display()
                    );
                }
                saved.next_generation
            }
            Err(problem) => {
                tracing::warn!(
                    "{}: use order not restored ({problem}); eviction starts from the order blocks were stored in",
                    path.display()
                );
                0
            }
        }
    }

    /// Writes the current use order next to the namespace's files (a new
    /// file renamed over the old, so a crash leaves one or the other).
    pub(super) fn save_use_order(&self, next_generation: u64) -> Result<(), StoreError> {
        let order = UseOrder {
            next_generation,
            entries: self.table.use_order(),
        };
        let bytes = format::encode_use_order(&order);
        let mut new_path = self.use_order_path.clone().into_os_string();
        new_path.push(".new");
        let new_path = PathBuf::from(new_path);
        std::fs::write(&new_path, &bytes)
            .map_err(|source| io_error(IoOp::Write, &new_path, 0, bytes.len() as u64, source))?;
        std::fs::rename(&new_path, &self.use_order_path).map_err(|source| {
            io_error(
                IoOp::Write,
                &self.use_order_path,
                0,
                bytes.len() as u64,
                source,
            )
        })
    }
}
