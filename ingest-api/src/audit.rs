//! Recording what a request changed in the audit log (`larder_db::audit`),
//! after the change committed.
//!
//! A record that cannot be written is logged as an error and the request
//! still succeeds: its change is made, and a client told otherwise would
//! retry a change that already happened. Pushes are not recorded here but
//! by the transaction that creates their object.

use larder_db::{AuditAction, Cache, NewAuditEvent, Timestamp};

use crate::access::Caller;
use crate::state::AppState;

/// Records `events`, each with `action`, by `caller` on `cache` (`None`
/// for token changes), one detail object each.
pub async fn record(
    state: &AppState,
    caller: &Caller,
    cache: Option<&Cache>,
    action: AuditAction,
    details: impl IntoIterator<Item = serde_json::Value>,
) {
    let actor = caller.actor();
    let events = details
        .into_iter()
        .map(|detail| NewAuditEvent {
            cache: cache.map(|cache| (cache.id, cache.name.clone())),
            actor: actor.clone(),
            action,
            detail,
        })
        .collect::<Vec<_>>();
    if let Err(error) = state
        .database
        .record_audit_events(&events, Timestamp::now())
        .await
    {
        tracing::error!(
            %action,
            events = events.len(),
            error = %error,
            "could not record a change in the audit log"
        );
    }
}
