# Larder's service binaries in one image: ingest-api, chunker-worker,
# compressor-worker and gc-scheduler (compose.yaml picks one per service
# with `command`). Two stages: the workspace is built in the Rust image,
# and the binaries run on Debian slim, as an unprivileged user. Two more
# targets: `debug-info`, the binaries' split debug info, and `garage-init`,
# the one-shot job that sets up Garage's layout, bucket and key for
# compose.yaml.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# Only the service crates: the client, the tests and the fuzz targets are
# not part of the image. ops/dist.sh builds the release profile and splits
# each binary's debug info into a file of its own: /out/bin is installed
# below, /out/debug is the `debug-info` target.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    CARGO_TARGET_DIR=/src/target bash ops/dist.sh /out \
        ingest-api chunker-worker compressor-worker gc-scheduler

FROM debian:bookworm-slim AS larder
# curl: the health checks ask each service's /healthz. ca-certificates: the
# system's roots, which TLS to S3, PostgreSQL and RabbitMQ trust (a private
# CA goes in [storage] ca-file, [queue] ca-file or the URL's sslrootcert).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/larder --create-home larder
COPY --from=build /out/bin/ /usr/local/bin/
USER larder
WORKDIR /var/lib/larder
ENV LARDER_LISTEN=[::]:8080
EXPOSE 8080
CMD ["ingest-api", "--mode", "api"]

# The binaries' debug info, not in the image: `docker build --target
# debug-info --output larder-debug .` right after the image's build writes
# it out (the build cache hands it the same build stage, so the files
# match the image's binaries). Mounted at /usr/lib/debug/usr/local/bin in
# a container, it gives backtraces the file and line of Larder's frames.
FROM scratch AS debug-info
COPY --from=build /out/debug/ /

FROM dxflrs/garage:v2.5.0 AS garage

FROM debian:bookworm-slim AS garage-init
COPY --from=garage /garage /usr/local/bin/garage
COPY ops/compose/garage-init.sh /usr/local/bin/garage-init
CMD ["garage-init"]
