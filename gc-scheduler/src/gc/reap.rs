//! Reaping: uploads that ended or got stuck long ago, and staged files no
//! narinfo claimed, with the staged NARs they leave in storage.

use larder_config::GcConfig;
use larder_db::{Database, Timestamp, Upload, UploadPhase};
use larder_storage::{ObjectKey, Storage};

use super::{GcError, GcReport};

const FINISHED: [UploadPhase; 2] = [UploadPhase::Done, UploadPhase::Failed];

/// Uploads in flight not updated for `stuck-upload-deadline` are failed
/// (so they stop protecting their NAR) and deleted; uploads that ended
/// (`done`, `failed`) before `finished-upload-deadline` are deleted. Each
/// with its staged NAR, which goes first: a crash in between leaves a row
/// the next run reaps again.
pub(super) async fn reap_uploads(
    database: &Database,
    storage: &dyn Storage,
    config: &GcConfig,
    now: Timestamp,
    report: &mut GcReport,
) -> Result<(), GcError> {
    let stuck_before = now.saturating_sub(config.stuck_upload_deadline.as_duration());
    loop {
        let page = database
            .stuck_uploads(&crate::IN_FLIGHT, stuck_before, config.page_size)
            .await?;
        for upload in &page {
            let reason = format!(
                "the upload made no progress for {} (last in phase {}); push the path again",
                config.stuck_upload_deadline, upload.phase
            );
            if database.fail_upload(&upload.id, &reason, now).await? {
                tracing::warn!(upload = %upload.id, %reason, "reaping a stuck upload");
            }
            delete_upload(database, storage, upload, report).await?;
        }
        if page.len() < config.page_size as usize {
            break;
        }
    }
    let finished_before = now.saturating_sub(config.finished_upload_deadline.as_duration());
    loop {
        let page = database
            .stuck_uploads(&FINISHED, finished_before, config.page_size)
            .await?;
        for upload in &page {
            delete_upload(database, storage, upload, report).await?;
        }
        if page.len() < config.page_size as usize {
            return Ok(());
        }
    }
}

async fn delete_upload(
    database: &Database,
    storage: &dyn Storage,
    upload: &Upload,
    report: &mut GcReport,
) -> Result<(), GcError> {
    // A done upload's staged NAR is normally gone already; a crash between
    // its commit and the delete leaves it.
    if let Ok(key) = ObjectKey::new(upload.staged_key.as_str()) {
        storage.delete(&key).await?;
    }
    if database.delete_upload(&upload.id).await? {
        report.uploads_reaped += 1;
    }
    Ok(())
}

/// Staged files no narinfo claimed within `staged-file-deadline`: the row
/// is taken first (a narinfo claims a staged file by taking its row, so
/// only one of the two gets it), then the object deleted.
pub(super) async fn reap_staged_files(
    database: &Database,
    storage: &dyn Storage,
    config: &GcConfig,
    now: Timestamp,
    report: &mut GcReport,
) -> Result<(), GcError> {
    let created_before = now.saturating_sub(config.staged_file_deadline.as_duration());
    loop {
        let page = database
            .expired_staged_files(created_before, config.page_size)
            .await?;
        for file in &page {
            let Some(taken) = database
                .take_expired_staged_file(file.cache_id, &file.file_name, created_before)
                .await?
            else {
                continue;
            };
            if let Ok(key) = ObjectKey::new(taken.staged_key.as_str()) {
                storage.delete(&key).await?;
            }
            report.staged_files_reaped += 1;
        }
        if page.len() < config.page_size as usize {
            return Ok(());
        }
    }
}
