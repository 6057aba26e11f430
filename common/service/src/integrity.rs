//! Acting on damage found in storage: chunks whose bytes are missing,
//! truncated or corrupt are withdrawn (their NARs stop being served in
//! every cache until a push of the same path heals them; the rows' side is
//! `db`'s `damage` module), with one log line and the metrics.
//!
//! Two finders call this: `gc-scheduler`'s scrub, which reads and checks
//! every stored chunk, and the read path, which calls
//! [`check_after_read_failure`] when a NAR download could not read a frame.
//! A read failure is only a hint: what decides is the object itself
//! ([`check_object`] asks storage for its size), so that a transient error,
//! or a read of a location that compaction has since moved, never
//! withdraws good data.

use std::sync::Arc;

use crate::metrics::larder;
use larder_db::{Chunk, DamagedChunk, Database, DbError, Withdrawal};
use larder_storage::{ObjectKey, Storage, StorageError};

/// At most this many NAR hashes are named in one log line; the rest are
/// counted.
const NARS_LOGGED: usize = 20;

/// Who found the damage: the label of `larder_damaged_chunks_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FoundBy {
    /// `gc-scheduler --scrub`, or its periodic pass.
    Scrub,
    /// A NAR download that could not read a frame.
    Read,
}

impl FoundBy {
    fn as_str(self) -> &'static str {
        match self {
            Self::Scrub => "scrub",
            Self::Read => "read",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IntegrityError {
    #[error("database")]
    Database(#[from] DbError),
    #[error("storage")]
    Storage(#[from] StorageError),
}

/// Marks `chunks` damaged (each only while still valid at the location
/// given), logs what was withdrawn with `reason`, and counts it.
pub async fn withdraw_damaged(
    database: &Database,
    chunks: &[DamagedChunk],
    found_by: FoundBy,
    reason: &str,
) -> Result<Withdrawal, DbError> {
    if chunks.is_empty() {
        return Ok(Withdrawal::default());
    }
    let withdrawal = database.mark_chunks_damaged(chunks).await?;
    log_withdrawal(&withdrawal, found_by, reason);
    Ok(withdrawal)
}

/// Logs and counts a withdrawal (nothing when it is empty).
pub fn log_withdrawal(withdrawal: &Withdrawal, found_by: FoundBy, reason: &str) {
    if withdrawal.is_empty() {
        return;
    }
    larder().damage_withdrawn(
        found_by.as_str(),
        withdrawal.chunks,
        withdrawal.nars.len() as u64,
    );
    let named: Vec<String> = withdrawal
        .nars
        .iter()
        .take(NARS_LOGGED)
        .map(ToString::to_string)
        .collect();
    tracing::error!(
        found_by = found_by.as_str(),
        chunks = withdrawal.chunks,
        nars = withdrawal.nars.len(),
        nar_hashes = named.join(" "),
        reason,
        "damaged chunks withdrawn: their NARs are not served until their paths are pushed again"
    );
}

/// Checks the object `key` against the chunks recorded in it, by its size:
/// gone, every valid chunk in it is damaged; shorter than a chunk's range,
/// that chunk is. Withdraws what it finds (see [`withdraw_damaged`]).
pub async fn check_object(
    database: &Database,
    storage: &dyn Storage,
    key: &ObjectKey,
    found_by: FoundBy,
) -> Result<Withdrawal, IntegrityError> {
    let size = storage.size(key).await?;
    let chunks = database.chunks_in_object(key.as_str()).await?;
    let damaged = beyond_the_end(&chunks, size);
    let reason = match size {
        None => format!("object {key} is missing from storage"),
        Some(size) => format!("object {key} is {size} bytes, shorter than its chunks' ranges"),
    };
    Ok(withdraw_damaged(database, &damaged, found_by, &reason).await?)
}

/// The chunks among `chunks` whose ranges do not fit in an object of
/// `size` bytes (all of them when it is gone).
fn beyond_the_end(chunks: &[Chunk], size: Option<u64>) -> Vec<DamagedChunk> {
    chunks
        .iter()
        .filter_map(|chunk| {
            let location = chunk.location.as_ref()?;
            let fits = size.is_some_and(|size| {
                location
                    .offset
                    .checked_add(location.length)
                    .is_some_and(|end| end <= size)
            });
            (!fits).then(|| DamagedChunk {
                id: chunk.id,
                location: location.clone(),
            })
        })
        .collect()
}

/// What the read path calls when reading a chunk frame failed with
/// `error`: when the error says the object is missing or too short, its
/// object is checked ([`check_object`]) on a task of its own, which
/// withdraws the NARs of the chunks found damaged, so that their narinfos
/// answer 404 and the next push of their paths heals them. Other errors
/// (a timeout, a storage server's 5xx) are not evidence of damage and are
/// left alone. Returns whether a check was started. Must be called inside
/// a Tokio runtime.
pub fn check_after_read_failure(
    database: &Database,
    storage: &Arc<dyn Storage>,
    error: &StorageError,
) -> bool {
    let Some(key) = damage_evidence(error) else {
        return false;
    };
    let database = database.clone();
    let storage = storage.clone();
    tokio::spawn(async move {
        if let Err(error) = check_object(&database, &*storage, &key, FoundBy::Read).await {
            tracing::warn!(
                %key,
                error = error_chain(&error),
                "could not check an object a NAR download failed to read"
            );
        }
    });
    true
}

/// The object a read error says is missing or too short, if it says so:
/// the errors worth a look at the object ([`check_object`]).
pub fn damage_evidence(error: &StorageError) -> Option<ObjectKey> {
    match error {
        StorageError::NotFound(key) => Some(key.clone()),
        StorageError::Io { key, source } if source.kind() == std::io::ErrorKind::UnexpectedEof => {
            ObjectKey::new(key.as_str()).ok()
        }
        _ => None,
    }
}

/// `error` and its sources on one line (this crate does not use anyhow).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use larder_db::{ChunkId, ChunkLocation, StoreState, Timestamp};
    use larder_nix::Sha256Hash;

    fn chunk(id: i64, offset: u64, length: u64) -> Chunk {
        Chunk {
            id: ChunkId(id),
            chunk_hash: Sha256Hash::digest(&id.to_le_bytes()),
            chunk_size: 100,
            state: StoreState::Valid,
            location: Some(ChunkLocation {
                object_key: "packs/ab/x.pack".to_owned(),
                offset,
                length,
            }),
            created_at: Timestamp::from_unix_millis(0),
        }
    }

    fn ids(damaged: &[DamagedChunk]) -> Vec<i64> {
        damaged.iter().map(|chunk| chunk.id.0).collect()
    }

    #[test]
    fn a_missing_object_takes_all_its_chunks() {
        let chunks = [chunk(1, 0, 10), chunk(2, 10, 10)];
        assert_eq!(ids(&beyond_the_end(&chunks, None)), [1, 2]);
    }

    #[test]
    fn a_short_object_takes_the_chunks_past_its_end() {
        let chunks = [chunk(1, 0, 10), chunk(2, 10, 10), chunk(3, 20, 10)];
        assert_eq!(ids(&beyond_the_end(&chunks, Some(30))), Vec::<i64>::new());
        assert_eq!(ids(&beyond_the_end(&chunks, Some(20))), [3]);
        assert_eq!(ids(&beyond_the_end(&chunks, Some(19))), [2, 3]);
        assert_eq!(ids(&beyond_the_end(&chunks, Some(0))), [1, 2, 3]);
    }

    #[test]
    fn only_a_missing_or_short_object_is_evidence_of_damage() {
        let key = ObjectKey::new("chunks/ab/x.zst").expect("a valid key");
        let io = |kind| StorageError::Io {
            key: key.to_string(),
            source: std::io::Error::new(kind, "reading"),
        };
        assert_eq!(
            damage_evidence(&StorageError::NotFound(key.clone())),
            Some(key.clone())
        );
        assert_eq!(
            damage_evidence(&io(std::io::ErrorKind::UnexpectedEof)),
            Some(key.clone())
        );
        assert_eq!(damage_evidence(&io(std::io::ErrorKind::TimedOut)), None);
        let unavailable = StorageError::Backend {
            operation: "GET",
            key: key.to_string(),
            message: "503 Slow Down".to_owned(),
        };
        assert_eq!(damage_evidence(&unavailable), None);
    }
}
