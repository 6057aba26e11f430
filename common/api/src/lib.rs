//! The contract between Larder's client and its server: what both sides
//! of the HTTP API read and write, so the two cannot drift. No IO.
//!
//! - [`v1`] — the API's wire types (`/_api/v1/…`), Attic-compatible, with
//!   Larder's additions.
//! - [`upload_info`] — an Attic upload's metadata, checked field by field.
//! - [`cache_name`] — cache names and the patterns tokens grant by.
//! - [`pin`] — pin names and keep policies.
//! - [`duration`], [`byte_size`], [`time`] — the value grammars both sides
//!   read: human durations, byte sizes with explicit units, RFC 3339 times.

pub mod byte_size;
pub mod cache_name;
pub mod duration;
pub mod pin;
pub mod time;
pub mod upload_info;
pub mod v1;
