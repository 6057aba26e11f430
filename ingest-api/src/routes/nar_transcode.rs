//! A NAR served under the file name its pusher gave it (issue #15).
//!
//! `nix copy --to` names the NAR file it uploads after its own compressed
//! bytes (`nar/<FileHash>.nar.xz`, `.nar.zst` or `.nar`) and keeps the
//! narinfo naming it in its cache for a month, so the pushing machine later
//! asks for that name. Larder stores the NAR as zstd frames and names it by
//! NAR hash; for a `.nar.zst` name the frames are sent as they are (a
//! concatenation of zstd frames is a zstd stream), for the other two they
//! are decompressed, and for `.nar.xz` compressed again to xz, in the
//! compression the pusher's narinfo says. Nix checks the NAR hash of what
//! it decompresses, not the file hash, so the bytes need not be the
//! pusher's own.
//!
//! Recompressing costs CPU in proportion to the NAR (xz at preset 1, tens of
//! MB/s per core), so at most one per core runs at once in a process; the
//! rest wait their turn. Only a pushing machine's own cached narinfos lead
//! here: everyone else reads Larder's narinfos, which name its own files.

use std::io::{self, Read, Write};
use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use futures::stream::Stream;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::io::{StreamReader, SyncIoBridge};

use larder_nix::nar_file::NarFileCompression;

/// How much decompressed or recompressed output goes out per buffer.
const OUTPUT_BUFFER: usize = 256 << 10;

/// The xz preset of a recompressed NAR: fast, as the client waits for it.
const XZ_PRESET: u32 = 1;

/// Buffers sent ahead of the client.
const OUTPUT_DEPTH: usize = 4;

/// Transcodings at once in this process: one per core.
fn transcodings() -> &'static Semaphore {
    static PERMITS: OnceLock<Semaphore> = OnceLock::new();
    PERMITS.get_or_init(|| {
        Semaphore::new(std::thread::available_parallelism().map_or(1, |cores| cores.get()))
    })
}

/// `frames` (a NAR's zstd frames, as [`super::nar_body::nar_body`] sends
/// them) as a `.nar` (decompressed) or `.nar.xz` body; any other target is
/// the frames decoded and sent as `.nar`. An error on the way (the frames'
/// own, or a frame that does not decode) ends the body with it, so that
/// the connection is dropped rather than completed short. Nothing starts
/// until the body is first polled (a `HEAD` never is).
pub fn transcode(
    frames: impl Stream<Item = io::Result<Bytes>> + Send + Unpin + 'static,
    to: NarFileCompression,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let mut waiting = Some(frames);
    let mut receiver = None;
    futures::stream::poll_fn(move |cx| {
        let receiver =
            receiver.get_or_insert_with(|| start(waiting.take().expect("started only once"), to));
        receiver.poll_recv(cx)
    })
}

/// Starts transcoding on a blocking thread once a permit is free; the
/// output arrives on the receiver.
fn start(
    frames: impl Stream<Item = io::Result<Bytes>> + Send + Unpin + 'static,
    to: NarFileCompression,
) -> mpsc::Receiver<io::Result<Bytes>> {
    let (sender, receiver) = mpsc::channel::<io::Result<Bytes>>(OUTPUT_DEPTH);
    // Made here, on the runtime: the bridge blocks on it from the
    // blocking thread.
    let input = SyncIoBridge::new(StreamReader::new(frames));
    tokio::spawn(async move {
        let Ok(_permit) = transcodings().acquire().await else {
            return;
        };
        let failure = sender.clone();
        let done = tokio::task::spawn_blocking(move || write_out(input, to, &sender)).await;
        let error = match done {
            Ok(Ok(())) => return,
            Ok(Err(error)) => error,
            Err(join_error) => io::Error::other(format!("transcoding a NAR failed: {join_error}")),
        };
        // The client may be gone already; then there is no one to tell.
        let _ = failure.send(Err(error)).await;
    });
    receiver
}

/// Decodes the frames from `input` and writes the NAR to `sender` in the
/// `to` form, on a blocking thread.
fn write_out(
    input: impl Read,
    to: NarFileCompression,
    sender: &mpsc::Sender<io::Result<Bytes>>,
) -> io::Result<()> {
    let mut nar = zstd::stream::read::Decoder::new(input)?;
    let mut out = ChannelWriter {
        sender,
        buffer: BytesMut::with_capacity(OUTPUT_BUFFER),
    };
    match to {
        NarFileCompression::Xz => {
            let mut encoder = liblzma::write::XzEncoder::new(out, XZ_PRESET);
            io::copy(&mut nar, &mut encoder)?;
            encoder.finish()?.flush()
        }
        NarFileCompression::None | NarFileCompression::Zstd => {
            io::copy(&mut nar, &mut out)?;
            out.flush()
        }
    }
}

/// Sends what is written to it in buffers of [`OUTPUT_BUFFER`]; a client
/// that hung up is a broken pipe, which stops the work.
struct ChannelWriter<'a> {
    sender: &'a mpsc::Sender<io::Result<Bytes>>,
    buffer: BytesMut,
}

impl Write for ChannelWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() >= OUTPUT_BUFFER {
            self.flush()?;
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let bytes = self.buffer.split().freeze();
        self.sender
            .blocking_send(Ok(bytes))
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;

    fn frames_of(nar: &[u8]) -> Vec<io::Result<Bytes>> {
        // Two frames, as chunks are, cut into pieces unlike the frames.
        let cut = nar.len() / 3;
        let mut stored = zstd::bulk::compress(&nar[..cut], 3).expect("zstd");
        stored.extend(zstd::bulk::compress(&nar[cut..], 3).expect("zstd"));
        stored
            .chunks(1000)
            .map(|piece| Ok(Bytes::copy_from_slice(piece)))
            .collect()
    }

    async fn collect(
        frames: Vec<io::Result<Bytes>>,
        to: NarFileCompression,
    ) -> io::Result<Vec<u8>> {
        let parts: Vec<Bytes> = transcode(futures::stream::iter(frames), to)
            .try_collect()
            .await?;
        Ok(parts.concat())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_become_the_nar_or_its_xz_and_errors_end_the_body() {
        let nar: Vec<u8> = (0..3_000_000_u32).map(|i| (i % 251) as u8).collect();
        let plain = collect(frames_of(&nar), NarFileCompression::None)
            .await
            .expect("decompressed");
        assert!(plain == nar, "the NAR");
        let xz = collect(frames_of(&nar), NarFileCompression::Xz)
            .await
            .expect("recompressed");
        let mut decoded = Vec::new();
        liblzma::read::XzDecoder::new(&xz[..])
            .read_to_end(&mut decoded)
            .expect("an xz stream");
        assert!(decoded == nar, "the NAR after xz");

        // The frames' source failing mid-way, or bytes that are no frame:
        // an error, never a short body that ends cleanly.
        let mut broken = frames_of(&nar);
        broken.truncate(broken.len() / 2);
        broken.push(Err(io::Error::other("storage went away")));
        assert!(collect(broken, NarFileCompression::None).await.is_err());
        let garbage = vec![Ok(Bytes::from_static(b"not a zstd frame at all"))];
        assert!(collect(garbage, NarFileCompression::Xz).await.is_err());
    }
}
