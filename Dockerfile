# Ewii images: one static binary each, non-root (uid 65532), nothing else. Three targets:
#
#   client       the Ewii Client, unprivileged: the default deployment (the last stage, so a
#                build without --target makes it)
#   client-ebpf  the Client built with the `ebpf` feature; run it with only BPF and NET_ADMIN
#                added (docs/ebpf.md). Without them it runs as `client` does.
#   hub          the Ewii Hub (docs/operator-guide.md)
#
# Online:   podman build --target client -t ewii-client .
# Offline:  podman build --build-context builder=dist --build-arg RUNTIME_BASE=scratch --target client .
#           When the builder stage cannot reach the crate registry, dist/ replaces it: the files
#           it makes (/ewii-client, /ewii-client-ebpf, /ewii-hub, /state) built on the host with
#           the same command line (scripts/test prepares it), so both paths give the same layers.
#
# Run the Client as the customer page promises (docs/deploy.md):
#   podman run --user 65532:65532 --cap-drop=ALL --read-only --security-opt no-new-privileges \
#     -v ewii-state:/var/lib/ewii -v ./client.toml:/etc/ewii/client.toml:ro ewii-client
ARG RUNTIME_BASE=gcr.io/distroless/static-debian12:nonroot

FROM rust:1.95-bookworm AS builder
RUN apt-get update && apt-get install -y --no-install-recommends clang libbpf-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
ENV RUSTFLAGS='-C target-feature=+crt-static'
RUN cargo build --release --locked --target x86_64-unknown-linux-gnu -p ewii --bin ewii-client --bin ewii-hub \
 && cp target/x86_64-unknown-linux-gnu/release/ewii-client target/x86_64-unknown-linux-gnu/release/ewii-hub / \
 && cargo build --release --locked --target x86_64-unknown-linux-gnu -p ewii --features ebpf --bin ewii-client \
 && cp target/x86_64-unknown-linux-gnu/release/ewii-client /ewii-client-ebpf \
 && mkdir -p /state

FROM ${RUNTIME_BASE} AS hub
COPY --from=builder /ewii-hub /usr/local/bin/ewii-hub
COPY --from=builder --chown=65532:65532 /state /var/lib/ewii-hub
USER 65532:65532
ENV EWII_HUB_STATE_DIR=/var/lib/ewii-hub
EXPOSE 443/udp
ENTRYPOINT ["/usr/local/bin/ewii-hub"]
CMD ["run", "--config", "/etc/ewii/hub.toml"]

# Both Client targets: the same user, state volume, environment and health check.
FROM ${RUNTIME_BASE} AS client-base
COPY --from=builder --chown=65532:65532 /state /var/lib/ewii
USER 65532:65532
ENV EWII_STATE_DIR=/var/lib/ewii EWII_CONFIG=/etc/ewii/client.toml
HEALTHCHECK --interval=30s --timeout=5s CMD ["/usr/local/bin/ewii-client", "health"]
ENTRYPOINT ["/usr/local/bin/ewii-client"]
CMD ["run"]

FROM client-base AS client-ebpf
COPY --from=builder /ewii-client-ebpf /usr/local/bin/ewii-client

FROM client-base AS client
COPY --from=builder /ewii-client /usr/local/bin/ewii-client
