//! Storage quotas and the server's room at the door: before a push's body
//! is read, how much it may still write, and how a refusal is worded.
//!
//! The authoritative check is the database's, made atomically when the
//! verified NAR is recorded (`larder_db`'s `quota` module); the checks
//! here come first so that a push that cannot fit is refused before its
//! body is read (Attic's `upload-path` declares its NarSize), and so that
//! a body of unknown size (Nix's `PUT nar/…`) is never allowed to write
//! more than the cache's room or the disk's. Refusals are 413
//! `QuotaExceeded` for the cache's quota and 507 `InsufficientStorage` when
//! the server itself has no room: its storage said so (`ENOSPC`,
//! `EDQUOT`, an S3 507), its database's disk is full, or local storage
//! would keep less than `[quota] min-free-space`.

use larder_api::byte_size::ByteSize;
use larder_api::cache_name::CacheName;
use larder_db::{Cache, DbError, QuotaStatus};
use larder_nix::StorePathHash;
use larder_storage::StorageError;

use crate::error::ApiError;
use crate::spool::SpoolError;
use crate::state::AppState;

/// Where a cache and the server stand before a push starts.
#[derive(Debug, Clone)]
pub struct Room {
    cache: CacheName,
    status: QuotaStatus,
    /// What local storage can take before its reserve; `None` where the
    /// backend cannot tell (S3).
    disk: Option<u64>,
}

/// `1.2 GiB (1288490189 bytes)`: readable, and exact.
fn bytes(count: u64) -> String {
    format!("{} ({count} bytes)", ByteSize::new(count).approximate())
}

impl Room {
    /// Reads the cache's quota and usage (one lookup, with the size of
    /// the path `keep` it may already hold) and the storage's free space.
    pub async fn measure(
        state: &AppState,
        cache: &Cache,
        keep: Option<&StorePathHash>,
    ) -> Result<Self, ApiError> {
        let status = state
            .database
            .quota_status(cache.id, keep)
            .await
            .map_err(|error| record_error(&cache.name, error))?
            .ok_or(ApiError::NoSuchCache)?;
        let available = state
            .storage
            .available_bytes()
            .await
            .map_err(storage_error)?;
        Ok(Self {
            cache: cache.name.clone(),
            status,
            disk: available
                .map(|available| available.saturating_sub(state.quota.min_free_space.bytes())),
        })
    }

    /// Refuses, before its body is read, an upload of a NAR of
    /// `nar_size` bytes: it adds them to the cache's usage and writes them
    /// to storage.
    pub fn admit_upload(&self, nar_size: u64) -> Result<(), ApiError> {
        self.admit(nar_size, nar_size)
    }

    /// Refuses a link of the path to a stored NAR of `nar_size` bytes:
    /// it adds them less the size of the object it replaces, and writes
    /// nothing.
    pub fn admit_link(&self, nar_size: u64) -> Result<(), ApiError> {
        self.admit(nar_size.saturating_sub(self.status.kept_bytes), 0)
    }

    fn admit(&self, growth: u64, written: u64) -> Result<(), ApiError> {
        if self.status.room().is_some_and(|room| growth > room) {
            return Err(self.quota_exceeded(&bytes(growth)));
        }
        if self.disk.is_some_and(|disk| written > disk) {
            return Err(self.out_of_room());
        }
        Ok(())
    }

    /// The most a body of unknown size may write: `limit`, and no more
    /// than the cache's room and the storage's. Refuses at once when there
    /// is no room at all.
    pub fn write_bound(&self, limit: u64) -> Result<u64, ApiError> {
        let bound = self.bound(limit);
        if bound == 0 {
            return Err(if self.status.room() == Some(0) {
                self.quota_exceeded("any more")
            } else {
                self.out_of_room()
            });
        }
        Ok(bound)
    }

    fn bound(&self, limit: u64) -> u64 {
        [Some(limit), self.status.room(), self.disk]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(limit)
    }

    /// What a spool bounded by [`Room::write_bound`] failed with, in the
    /// terms of the bound that stopped it: a body too large for the cache's
    /// room is over the quota, one too large for the disk's is out of
    /// room (only the server's `limit` is `PayloadTooLarge`), and storage
    /// that ran out of space is out of room.
    pub fn spool_error(&self, limit: u64, error: SpoolError) -> ApiError {
        match error {
            SpoolError::PastBound { bound } => {
                if bound >= limit {
                    SpoolError::PastBound { bound }.into()
                } else if self.status.room() == Some(bound) {
                    self.quota_exceeded(&format!("more than {}", bytes(bound)))
                } else {
                    self.out_of_room()
                }
            }
            SpoolError::Refused(ApiError::Internal(error)) => {
                match error.downcast::<StorageError>() {
                    Ok(storage) => storage_error(storage),
                    Err(other) => ApiError::Internal(other),
                }
            }
            SpoolError::Refused(other) => other,
        }
    }

    fn quota_exceeded(&self, push: &str) -> ApiError {
        let Some(quota) = self.status.quota else {
            // `room()` is `None` without a quota, so nothing refuses then.
            return ApiError::internal(anyhow::anyhow!("a quota refusal without a quota"));
        };
        ApiError::QuotaExceeded(format!(
            "this push would take cache {} over its storage quota of {}: it holds {}, \
             of which {} in paths and {} in uploads in flight, and the push needs {}{}",
            self.cache,
            bytes(quota),
            bytes(self.status.usage.used()),
            ByteSize::new(self.status.usage.path_bytes).approximate(),
            ByteSize::new(self.status.usage.pending_bytes).approximate(),
            push,
            match self.status.policy {
                larder_api::v1::QuotaPolicy::Refuse => "",
                larder_api::v1::QuotaPolicy::EvictLru => {
                    " (more than evicting its other paths would free)"
                }
            }
        ))
    }

    fn out_of_room(&self) -> ApiError {
        ApiError::InsufficientStorage(
            "the server is out of storage room for this push; try again later".to_owned(),
        )
    }
}

/// A storage failure: 507 when it had no room, else internal.
pub fn storage_error(error: StorageError) -> ApiError {
    match error {
        StorageError::OutOfSpace { .. } => {
            tracing::warn!(error = %error, "storage is out of space");
            ApiError::InsufficientStorage(
                "the server's storage is full; try again later".to_owned(),
            )
        }
        other => ApiError::internal(other),
    }
}

/// A failure to record a push (an upload, a staged file or a link) in
/// cache `cache`: 413 over its quota, 404 when the cache was destroyed
/// meanwhile, 507 when the database's disk is full, else internal.
pub fn record_error(cache: &CacheName, error: DbError) -> ApiError {
    match error {
        DbError::QuotaExceeded {
            quota,
            used,
            requested,
        } => ApiError::QuotaExceeded(format!(
            "this push would take cache {cache} over its storage quota of {}: it holds {} \
             and the push needs {} more",
            bytes(quota),
            bytes(used),
            bytes(requested)
        )),
        DbError::NotFound { .. } => ApiError::NoSuchCache,
        error if error.is_disk_full() => {
            tracing::warn!(error = %error, "the database's disk is full");
            ApiError::InsufficientStorage(
                "the server's database is out of room; try again later".to_owned(),
            )
        }
        other => ApiError::internal(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use larder_api::v1::QuotaPolicy;
    use larder_db::CacheUsage;

    fn room(quota: Option<u64>, used: u64, disk: Option<u64>) -> Room {
        Room {
            cache: "tenant".parse().expect("a cache name"),
            status: QuotaStatus {
                quota,
                policy: QuotaPolicy::Refuse,
                usage: CacheUsage {
                    path_bytes: used,
                    pending_bytes: 0,
                },
                kept_bytes: 0,
            },
            disk,
        }
    }

    #[test]
    fn a_push_is_refused_by_the_first_limit_it_meets() {
        let room = room(Some(1000), 600, Some(10_000));
        assert!(room.admit_upload(400).is_ok());
        let error = room.admit_upload(401).expect_err("over the quota");
        assert!(matches!(error, ApiError::QuotaExceeded(_)), "{error}");
        let message = error.to_string();
        for part in ["tenant", "1000 bytes", "600 bytes", "401 bytes"] {
            assert!(message.contains(part), "{part}: {message}");
        }
        let full_disk = super::tests::room(None, 0, Some(10));
        assert!(matches!(
            full_disk.admit_upload(11),
            Err(ApiError::InsufficientStorage(_))
        ));
        // A link writes nothing to storage.
        assert!(full_disk.admit_link(11).is_ok());
    }

    #[test]
    fn a_body_of_unknown_size_is_bounded_by_the_smallest_room() {
        assert_eq!(
            room(Some(1000), 600, Some(10_000)).write_bound(5000).ok(),
            Some(400)
        );
        assert_eq!(room(None, 600, Some(300)).write_bound(5000).ok(), Some(300));
        assert_eq!(room(None, 0, None).write_bound(5000).ok(), Some(5000));
        assert!(matches!(
            room(Some(600), 600, None).write_bound(5000),
            Err(ApiError::QuotaExceeded(_))
        ));
        assert!(matches!(
            room(None, 0, Some(0)).write_bound(5000),
            Err(ApiError::InsufficientStorage(_))
        ));

        let by_quota = room(Some(1000), 600, Some(10_000));
        assert!(matches!(
            by_quota.spool_error(5000, SpoolError::PastBound { bound: 400 }),
            ApiError::QuotaExceeded(_)
        ));
        let by_disk = room(Some(1000), 0, Some(10));
        assert!(matches!(
            by_disk.spool_error(5000, SpoolError::PastBound { bound: 10 }),
            ApiError::InsufficientStorage(_)
        ));
        let by_limit = room(None, 0, None);
        assert!(matches!(
            by_limit.spool_error(5000, SpoolError::PastBound { bound: 5000 }),
            ApiError::PayloadTooLarge(_)
        ));
        // Other refusals keep their own terms, a ratio bomb included.
        let bomb = ApiError::PayloadTooLarge("past max-decompression-ratio".to_owned());
        assert!(matches!(
            by_quota.spool_error(5000, SpoolError::Refused(bomb)),
            ApiError::PayloadTooLarge(_)
        ));
        let full = ApiError::internal(StorageError::OutOfSpace {
            key: "staging/x".to_owned(),
            message: "No space left on device".to_owned(),
        });
        assert!(matches!(
            by_limit.spool_error(5000, SpoolError::Refused(full)),
            ApiError::InsufficientStorage(_)
        ));
    }
}
