# syntax=docker/dockerfile:1
# The windrow image: one binary, every role (`windrow bridge`, `windrow worker`, ...).
#   docker build -t windrow:dev .
# The Helm chart (helm/windrow) runs it as user 10001 with a read-only root
# filesystem; the worker's store is a volume at /var/lib/windrow.

# Build stage: the toolchain this workspace is built and tested with.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep the registry and target directory between builds;
# the binary is copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin windrow \
    && cp target/release/windrow /usr/local/bin/windrow

FROM debian:bookworm-slim
# ca-certificates: TLS to NATS and MQTT brokers with public certificates.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 windrow \
    && useradd --system --uid 10001 --gid windrow --home-dir /var/lib/windrow \
       --no-create-home --shell /usr/sbin/nologin windrow \
    && install -d -o windrow -g windrow /var/lib/windrow
COPY --from=build /usr/local/bin/windrow /usr/local/bin/windrow
USER 10001:10001
WORKDIR /var/lib/windrow
# Metrics, health and readiness: bridge 9464, worker 9465 (http_listen).
EXPOSE 9464 9465
ENTRYPOINT ["windrow"]
CMD ["--help"]
