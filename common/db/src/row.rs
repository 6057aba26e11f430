//! Reading columns out of `AnyRow`s and turning Rust values into bindable
//! ones, with the conversions both backends need.
//!
//! `Any` exposes only a few primitive types, so every richer value crosses
//! the boundary here: unsigned sizes as checked `i64`, lists as JSON text,
//! validated newtypes through their parsers. A value that fails to convert
//! on the way out is [`DbError::Corrupt`], never a panic.

use std::fmt::Display;
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::error::{DbError, Result};
use super::types::{StoreState, Timestamp};
use larder_nix::{NarHash, Sha256Hash, StorePathHash};

pub(crate) fn i64_col(row: &AnyRow, column: &'static str) -> Result<i64> {
    row.try_get::<i64, _>(column)
        .map_err(|source| decode_error(column, source))
}

pub(crate) fn opt_i64_col(row: &AnyRow, column: &'static str) -> Result<Option<i64>> {
    row.try_get::<Option<i64>, _>(column)
        .map_err(|source| decode_error(column, source))
}

pub(crate) fn u64_col(row: &AnyRow, column: &'static str) -> Result<u64> {
    let value = i64_col(row, column)?;
    u64::try_from(value).map_err(|_| corrupt(column, format!("negative value {value}")))
}

pub(crate) fn opt_u64_col(row: &AnyRow, column: &'static str) -> Result<Option<u64>> {
    opt_i64_col(row, column)?
        .map(|value| {
            u64::try_from(value).map_err(|_| corrupt(column, format!("negative value {value}")))
        })
        .transpose()
}

pub(crate) fn f64_col(row: &AnyRow, column: &'static str) -> Result<f64> {
    row.try_get::<f64, _>(column)
        .map_err(|source| decode_error(column, source))
}

pub(crate) fn u32_col(row: &AnyRow, column: &'static str) -> Result<u32> {
    let value = i64_col(row, column)?;
    u32::try_from(value).map_err(|_| corrupt(column, format!("value {value} out of range")))
}

pub(crate) fn opt_u32_col(row: &AnyRow, column: &'static str) -> Result<Option<u32>> {
    opt_i64_col(row, column)?
        .map(|value| {
            u32::try_from(value).map_err(|_| corrupt(column, format!("value {value} out of range")))
        })
        .transpose()
}

pub(crate) fn i32_col(row: &AnyRow, column: &'static str) -> Result<i32> {
    let value = i64_col(row, column)?;
    i32::try_from(value).map_err(|_| corrupt(column, format!("value {value} out of range")))
}

pub(crate) fn time_col(row: &AnyRow, column: &'static str) -> Result<Timestamp> {
    i64_col(row, column).map(Timestamp::from_unix_millis)
}

pub(crate) fn opt_time_col(row: &AnyRow, column: &'static str) -> Result<Option<Timestamp>> {
    Ok(opt_i64_col(row, column)?.map(Timestamp::from_unix_millis))
}

/// PostgreSQL returns `BOOLEAN` columns as booleans; SQLite has no boolean
/// type and returns the stored 0 or 1 as an integer.
pub(crate) fn bool_col(row: &AnyRow, column: &'static str) -> Result<bool> {
    match row.try_get::<bool, _>(column) {
        Ok(value) => Ok(value),
        Err(_) => match i64_col(row, column)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(corrupt(column, format!("{other} is not a boolean"))),
        },
    }
}

pub(crate) fn string_col(row: &AnyRow, column: &'static str) -> Result<String> {
    row.try_get::<String, _>(column)
        .map_err(|source| decode_error(column, source))
}

pub(crate) fn opt_string_col(row: &AnyRow, column: &'static str) -> Result<Option<String>> {
    row.try_get::<Option<String>, _>(column)
        .map_err(|source| decode_error(column, source))
}

pub(crate) fn blob_col(row: &AnyRow, column: &'static str) -> Result<Vec<u8>> {
    row.try_get::<Vec<u8>, _>(column)
        .map_err(|source| decode_error(column, source))
}

/// A column holding text that a validated type parses.
pub(crate) fn parsed_col<T>(row: &AnyRow, column: &'static str) -> Result<T>
where
    T: FromStr,
    T::Err: Display,
{
    let text = string_col(row, column)?;
    text.parse()
        .map_err(|error: T::Err| corrupt(column, error.to_string()))
}

pub(crate) fn json_col<T: DeserializeOwned>(row: &AnyRow, column: &'static str) -> Result<T> {
    let text = string_col(row, column)?;
    serde_json::from_str(&text).map_err(|error| corrupt(column, error.to_string()))
}

pub(crate) fn state_col(row: &AnyRow, column: &'static str) -> Result<StoreState> {
    parsed_col(row, column)
}

pub(crate) fn store_path_hash_col(row: &AnyRow, column: &'static str) -> Result<StorePathHash> {
    let text = string_col(row, column)?;
    StorePathHash::parse(&text).map_err(|error| corrupt(column, error.to_string()))
}

pub(crate) fn nar_hash_col(row: &AnyRow, column: &'static str) -> Result<NarHash> {
    let text = string_col(row, column)?;
    NarHash::parse(&text).map_err(|error| corrupt(column, error.to_string()))
}

/// Chunk hashes are stored as 64 bare hex digits.
pub(crate) fn chunk_hash_col(row: &AnyRow, column: &'static str) -> Result<Sha256Hash> {
    let text = string_col(row, column)?;
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(&text, &mut bytes)
        .map_err(|error| corrupt(column, format!("{text:?}: {error}")))?;
    Ok(Sha256Hash::from_bytes(bytes))
}

/// Serialises a list or object for a JSON text column.
pub(crate) fn to_json<T: Serialize + ?Sized>(what: &'static str, value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|error| DbError::InvalidInput {
        what,
        reason: error.to_string(),
    })
}

/// An unsigned quantity as the signed 64-bit integer both backends store.
pub(crate) fn to_i64(what: &'static str, value: u64) -> Result<i64> {
    i64::try_from(value).map_err(|_| DbError::InvalidInput {
        what,
        reason: format!("{value} is larger than {}", i64::MAX),
    })
}

fn decode_error(column: &'static str, source: sqlx::Error) -> DbError {
    DbError::Corrupt {
        column,
        reason: source.to_string(),
    }
}

pub(crate) fn corrupt(column: &'static str, reason: String) -> DbError {
    DbError::Corrupt { column, reason }
}
