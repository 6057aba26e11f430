//! Objects in storage that no row names: chunk objects, packs, and staged
//! NARs.
//!
//! A pack (`packs/…`) is written before the transaction that records its
//! row and points chunks into it; one whose writer crashed or whose
//! transaction failed has no row, and is deleted once older than
//! `orphan-grace`.
//!
//! The rest of this paragraph is about the one-chunk objects of stores
//! written before packs, and of workers of such a version still running.
//! A compressor puts a chunk's object (`chunks/<2 hex>/<sha256>-<id>.zst`)
//! before it records the location in the row; if it dies in between and
//! the row is gone by the next attempt (GC claimed the chunk, or a revival
//! replaced it), or if anything else leaves a file under `chunks/`, no row
//! will ever point at the object. An object is referenced when a chunk row
//! records it as its location, or when a chunk row with the id in its name
//! exists (in any state: a pending chunk's object may be written before its
//! row says so, and a claimed chunk's object is level 3's to delete) and
//! has the hash in its name. Row ids are never
//! reused, so a deleted row never comes back to claim an old object. The
//! chunks of small NARs, which the chunker writes before their rows exist,
//! are named by content and upload id (`<sha256>-u<upload id>.zst`): such an
//! object is referenced while its upload is in the pipeline, and then only
//! as a row's recorded location. The upload leaves the pipeline in the
//! transaction that records the locations, so the uploads are looked up
//! first and the locations after: an object whose upload was no longer in
//! flight at the first query has its location recorded by the second, if
//! it ever will.
//! Objects younger than `orphan-grace` are left alone: a compressor may
//! have just written one for a row it is about to update.
//!
//! A staged NAR under `staging/` is named by an upload or a staged file; one
//! that neither names (a spool cut short by a crash, or a crash between
//! reaping a staged file's row and deleting its object) is deleted once
//! older than `stuck-upload-deadline`. A spooled object has no row until
//! the spool ends, and some object stores date an object from when its
//! upload began; an upload taking longer than that deadline counts as
//! stuck anyway. (A narinfo claims a staged file in the transaction that
//! records its upload, so there is no moment between the two.)

use std::time::SystemTime;

use futures::TryStreamExt;

use larder_config::GcConfig;
use larder_db::{ChunkId, Database, Timestamp, UploadId};
use larder_storage::pack::PACK_PREFIX;
use larder_storage::{ListedObject, ObjectKey, Storage};

use super::{delete_objects, GcError, GcReport};

/// The storage prefix of chunk objects.
const CHUNKS_PREFIX: &str = "chunks";

/// Whose a chunk object is, by its name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ChunkKeyOwner {
    /// The chunk row of this id (a compressor's object).
    Row(ChunkId),
    /// The upload of this id (a small NAR's chunk, written by the chunker).
    Upload(UploadId),
}

/// The chunk hash (lowercase hex) and the owner a chunk object's key
/// names, if it is one.
fn parse_chunk_key(key: &ObjectKey) -> Option<(&str, ChunkKeyOwner)> {
    let name = key.as_str().strip_prefix("chunks/")?;
    let (directory, file) = name.split_once('/')?;
    let (hash, owner) = file.strip_suffix(".zst")?.split_once('-')?;
    let is_hex = hash.len() == 64
        && hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !is_hex || directory.len() != 2 || !hash.starts_with(directory) {
        return None;
    }
    let owner = match owner.strip_prefix('u') {
        Some(upload) => ChunkKeyOwner::Upload(upload.parse().ok()?),
        None => ChunkKeyOwner::Row(ChunkId(owner.parse::<i64>().ok().filter(|id| *id > 0)?)),
    };
    Some((hash, owner))
}

/// What a sweep looks for: the objects under one prefix that no row names.
#[derive(Clone, Copy)]
pub(super) enum Sweep {
    /// `chunks/`: named by a chunk row; grace `orphan-grace`.
    Chunks,
    /// `packs/`: named by a pack row; grace `orphan-grace`, at least
    /// `PACK_GRACE` (a pack is written before the transaction that
    /// records it, and its name says nothing of its writer).
    Packs,
    /// `staging/`: named by an upload or a staged file; grace
    /// `stuck-upload-deadline` (a spooled NAR is written before the row
    /// that names it).
    Staging,
}

impl Sweep {
    fn prefix(self) -> &'static str {
        match self {
            Self::Chunks => CHUNKS_PREFIX,
            Self::Packs => PACK_PREFIX,
            Self::Staging => "staging",
        }
    }

    fn grace(self, config: &GcConfig) -> std::time::Duration {
        match self {
            Self::Chunks => config.orphan_grace.as_duration(),
            Self::Packs => super::packs::pack_grace(config),
            Self::Staging => config.stuck_upload_deadline.as_duration(),
        }
    }
}

/// Deletes the objects under the sweep's prefix that no row names and that
/// were written before its grace.
pub(super) async fn remove_orphans(
    sweep: Sweep,
    database: &Database,
    storage: &dyn Storage,
    config: &GcConfig,
    now: Timestamp,
    report: &mut GcReport,
) -> Result<(), GcError> {
    let written_before: SystemTime = now.saturating_sub(sweep.grace(config)).into();
    let prefix = ObjectKey::new(sweep.prefix())?;
    let mut listing = storage.list(&prefix);
    let mut page: Vec<ListedObject> = Vec::with_capacity(config.page_size as usize);
    loop {
        let next = listing.try_next().await?;
        let done = next.is_none();
        if let Some(object) = next {
            if object.last_modified < written_before {
                page.push(object);
            }
        }
        if page.len() >= config.page_size as usize || (done && !page.is_empty()) {
            let page = std::mem::take(&mut page);
            let orphans = match sweep {
                Sweep::Chunks => unreferenced_chunk_objects(database, page).await?,
                Sweep::Packs => unrecorded_packs(database, page).await?,
                Sweep::Staging => unreferenced_staged_objects(database, page).await?,
            };
            report.orphans_removed += orphans.len() as u64;
            report.bytes_freed += orphans.iter().map(|object| object.size).sum::<u64>();
            let keys = orphans.into_iter().map(|object| object.key).collect();
            delete_objects(storage, keys, config.delete_concurrency).await?;
        }
        if done {
            return Ok(());
        }
    }
}

/// The objects of `page` that no upload or staged file names.
async fn unreferenced_staged_objects(
    database: &Database,
    page: Vec<ListedObject>,
) -> Result<Vec<ListedObject>, GcError> {
    let keys: Vec<&str> = page.iter().map(|object| object.key.as_str()).collect();
    let named = database.staged_keys_in_use(&keys).await?;
    Ok(page
        .into_iter()
        .filter(|object| !named.contains(object.key.as_str()))
        .collect())
}

/// The objects of `page` that no pack row names.
async fn unrecorded_packs(
    database: &Database,
    page: Vec<ListedObject>,
) -> Result<Vec<ListedObject>, GcError> {
    let keys: Vec<&str> = page.iter().map(|object| object.key.as_str()).collect();
    let recorded = database.pack_keys_recorded(&keys).await?;
    Ok(page
        .into_iter()
        .filter(|object| !recorded.contains(object.key.as_str()))
        .collect())
}

/// The objects of `page` that no chunk row names and no upload in flight
/// owns. The uploads first (see the module documentation).
async fn unreferenced_chunk_objects(
    database: &Database,
    page: Vec<ListedObject>,
) -> Result<Vec<ListedObject>, GcError> {
    let owners: Vec<ChunkKeyOwner> = page
        .iter()
        .filter_map(|object| parse_chunk_key(&object.key))
        .map(|(_, owner)| owner)
        .collect();
    let uploads: Vec<UploadId> = owners
        .iter()
        .filter_map(|owner| match owner {
            ChunkKeyOwner::Upload(id) => Some(id.clone()),
            ChunkKeyOwner::Row(_) => None,
        })
        .collect();
    let in_flight = database.uploads_in_flight(&uploads).await?;
    let ids: Vec<ChunkId> = owners
        .iter()
        .filter_map(|owner| match owner {
            ChunkKeyOwner::Row(id) => Some(*id),
            ChunkKeyOwner::Upload(_) => None,
        })
        .collect();
    let rows = database.chunk_hashes(&ids).await?;
    let keys: Vec<&str> = page.iter().map(|object| object.key.as_str()).collect();
    let located = database.chunk_object_keys_in_use(&keys).await?;
    Ok(page
        .into_iter()
        .filter(|object| {
            let owned = parse_chunk_key(&object.key).is_some_and(|(hash, owner)| match owner {
                ChunkKeyOwner::Row(id) => rows.get(&id).is_some_and(|row| row.to_hex() == hash),
                ChunkKeyOwner::Upload(id) => in_flight.contains(&id),
            });
            !owned && !located.contains(object.key.as_str())
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use larder_nix::Sha256Hash;
    use larder_service::worker::chunk_object_key;

    #[test]
    fn chunk_keys_parse_back_and_strangers_do_not() {
        let hash = Sha256Hash::digest(b"bytes");
        let key = chunk_object_key(&hash, ChunkId(17));
        let hex = hash.to_hex();
        assert_eq!(
            parse_chunk_key(&key),
            Some((hex.as_str(), ChunkKeyOwner::Row(ChunkId(17))))
        );
        let upload = UploadId::random();
        // How a chunker of a version before packs named a small NAR's
        // chunk.
        let key = ObjectKey::new(format!("chunks/{}/{hex}-u{upload}.zst", &hex[..2]))
            .expect("a valid key");
        assert_eq!(
            parse_chunk_key(&key),
            Some((hex.as_str(), ChunkKeyOwner::Upload(upload)))
        );
        for stranger in [
            format!("chunks/{}/{hex}-17.zst.tmp-0011", &hex[..2]),
            format!("chunks/00/{hex}-17.zst"),
            format!("chunks/{}/{hex}.zst", &hex[..2]),
            format!("chunks/{}/{hex}-x.zst", &hex[..2]),
            format!("chunks/{}/{hex}-u17.zst", &hex[..2]),
            "chunks/ab/cd.zst".to_owned(),
        ] {
            let key = ObjectKey::new(stranger.as_str()).expect("valid key");
            assert_eq!(parse_chunk_key(&key), None, "{stranger}");
        }
    }
}
