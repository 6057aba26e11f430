//! The closure of a cache's pins as SQL, for the statements that choose
//! what to delete: retention GC's ([`Database::delete_expired_objects`])
//! and quota eviction's choice of victims. Why a concurrent GC cannot miss
//! a pin is module `pins`'s; this module sits below both `pins` and
//! `quota`, since pinning locks the cache row through `quota`.
//!
//! [`Database::delete_expired_objects`]: super::Database::delete_expired_objects

use super::Backend;

/// SQL: the store path hashes the pins of cache `$cache_param` keep, the
/// roots of all their revisions and, transitively, every path the cache's
/// objects among them reference (base names `<hash>-<name>` in the JSON
/// list `path_references`, whose first 32 characters are the hash). The
/// set may name paths the cache does not hold (references it never got);
/// they match no object. `UNION` drops rows already found, so cycles (a
/// path referencing itself) end the recursion, and the work is bounded by
/// the cache's objects.
///
/// Expanding a JSON list is the one part the two dialects spell
/// differently (`json_each` against `json_array_elements_text`).
pub(crate) fn pinned_closure_sql(backend: Backend, cache_param: usize) -> String {
    let references = match backend {
        Backend::Sqlite => "json_each(parent.path_references) AS refs",
        Backend::Postgres => {
            "json_array_elements_text(CAST(parent.path_references AS json)) AS refs(value)"
        }
    };
    format!(
        "WITH RECURSIVE pinned(store_path_hash) AS (\
         SELECT pr.store_path_hash FROM pin_revisions pr JOIN pins p ON p.id = pr.pin_id \
         WHERE p.cache_id = ${cache_param} \
         UNION \
         SELECT substr(refs.value, 1, 32) FROM pinned JOIN objects parent \
         ON parent.cache_id = ${cache_param} AND parent.store_path_hash = pinned.store_path_hash, \
         {references}) \
         SELECT store_path_hash FROM pinned"
    )
}
