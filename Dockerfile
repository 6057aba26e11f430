# Larder's service binaries in one image: ingest-api, chunker-worker,
# compressor-worker and gc-scheduler (compose.yaml picks one per service
# with `command`). Two stages: the workspace is built in the Rust image,
# and the binaries run on Debian slim, as an unprivileged user. A third
# target, `garage-init`, is the one-shot job that sets up Garage's layout,
# bucket and key for compose.yaml.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# Only the service crates: the client, the tests and the fuzz targets are
# not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        -p ingest-api -p chunker-worker -p compressor-worker -p gc-scheduler \
    && mkdir -p /out \
    && cp target/release/ingest-api target/release/chunker-worker \
          target/release/compressor-worker target/release/gc-scheduler /out/

FROM debian:bookworm-slim AS larder
# curl: the health checks ask each service's /healthz. ca-certificates: the
# system's roots, which TLS to S3, PostgreSQL and RabbitMQ trust (a private
# CA goes in [storage] ca-file, [queue] ca-file or the URL's sslrootcert).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/larder --create-home larder
COPY --from=build /out/ /usr/local/bin/
USER larder
WORKDIR /var/lib/larder
ENV LARDER_LISTEN=[::]:8080
EXPOSE 8080
CMD ["ingest-api", "--mode", "api"]

FROM dxflrs/garage:v2.5.0 AS garage

FROM debian:bookworm-slim AS garage-init
COPY --from=garage /garage /usr/local/bin/garage
COPY ops/compose/garage-init.sh /usr/local/bin/garage-init
CMD ["garage-init"]
