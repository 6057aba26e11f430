//! `nar_listings`: the `.ls` listing of each NAR, stored once when the
//! chunker cuts the NAR and served from here, so that answering `.ls`
//! never reads, decompresses or parses the NAR again.
//!
//! A listing is written before its NAR's chunk list is recorded (the NAR
//! cannot become valid before that), so a valid NAR either has its listing
//! or never will (stored before listings were, or over the chunker's
//! budget); the row goes with its NAR (`ON DELETE CASCADE`). It is kept as
//! one zstd frame of the JSON: listings are repetitive text, and a NAR of
//! 100,000 files has a JSON listing of about 10 MB.

use std::io::{self, BufWriter};

use super::error::{constraint_error, query_error, Result};
use super::row::blob_col;
use super::types::NarId;
use super::Database;
use larder_nix::nar::NarListing;

/// The zstd level listings are compressed with: JSON compresses well at a
/// low level, and the chunker's thread pays for it.
const LISTING_ZSTD_LEVEL: i32 = 3;

/// A NAR's `.ls` listing as stored: one zstd frame of its JSON.
#[derive(Clone, PartialEq, Eq)]
pub struct EncodedListing(Vec<u8>);

impl std::fmt::Debug for EncodedListing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EncodedListing({} bytes)", self.0.len())
    }
}

impl EncodedListing {
    /// Renders and compresses `listing`, streaming (the JSON is never held
    /// whole). CPU work: call it where blocking is fine.
    pub fn encode(listing: &NarListing) -> io::Result<Self> {
        let encoder = zstd::stream::Encoder::new(Vec::new(), LISTING_ZSTD_LEVEL)?;
        // The listing is written in many small pieces; batching them spares
        // the compressor as many calls.
        let mut buffered = BufWriter::new(encoder);
        listing.write_json(&mut buffered)?;
        let encoder = buffered.into_inner().map_err(|error| error.into_error())?;
        Ok(Self(encoder.finish()?))
    }

    /// The listing's JSON, the `.ls` file's contents. CPU work in
    /// proportion to the listing.
    pub fn decode(&self) -> io::Result<Vec<u8>> {
        zstd::stream::decode_all(self.0.as_slice())
    }

    /// The stored bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// [`Database::set_nar_listing`] on a connection or in a transaction.
pub(super) async fn set_nar_listing_on(
    connection: &mut sqlx::AnyConnection,
    nar_id: NarId,
    listing: &EncodedListing,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO nar_listings (nar_id, listing) VALUES ($1, $2) \
         ON CONFLICT (nar_id) DO UPDATE SET listing = excluded.listing",
    )
    .bind(nar_id.0)
    .bind(listing.as_bytes())
    .execute(connection)
    .await
    .map_err(constraint_error(
        "recording a NAR's listing",
        || format!("listing of NAR {nar_id}"),
        || format!("NAR {nar_id}"),
    ))?;
    Ok(())
}

impl Database {
    /// Records the listing of a NAR, replacing an earlier one (a job done
    /// again computes the same listing of the same bytes).
    /// [`super::DbError::NotFound`] when the NAR has gone.
    pub async fn set_nar_listing(&self, nar_id: NarId, listing: &EncodedListing) -> Result<()> {
        let mut connection = self.acquire().await?;
        set_nar_listing_on(&mut connection, nar_id, listing).await
    }

    /// The stored listing of a NAR, if it has one.
    pub async fn nar_listing(&self, nar_id: NarId) -> Result<Option<EncodedListing>> {
        let row = sqlx::query("SELECT listing FROM nar_listings WHERE nar_id = $1")
            .bind(nar_id.0)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("reading a NAR's listing"))?;
        row.map(|row| blob_col(&row, "listing").map(EncodedListing))
            .transpose()
    }
}
