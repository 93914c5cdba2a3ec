# Ewii Client image: one static binary, non-root, nothing else.
#
# Online:   docker build -t ewii-client .
# Offline:  podman build --build-context builder=dist --build-arg RUNTIME_BASE=scratch .
#           (dist/ holds a host-built static ewii-client and ewii-hub and an empty state/ dir)
ARG RUNTIME_BASE=gcr.io/distroless/static-debian12:nonroot

FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
RUN RUSTFLAGS='-C target-feature=+crt-static' \
    cargo build --release --locked --target x86_64-unknown-linux-gnu -p ewii --bins \
 && cp target/x86_64-unknown-linux-gnu/release/ewii-client target/x86_64-unknown-linux-gnu/release/ewii-hub / \
 && mkdir -p /state

FROM ${RUNTIME_BASE}
COPY --from=builder /ewii-client /usr/local/bin/ewii-client
COPY --from=builder --chown=65532:65532 /state /var/lib/ewii
USER 65532:65532
ENV EWII_STATE_DIR=/var/lib/ewii EWII_CONFIG=/etc/ewii/client.toml
HEALTHCHECK --interval=30s --timeout=5s CMD ["/usr/local/bin/ewii-client", "health"]
ENTRYPOINT ["/usr/local/bin/ewii-client"]
CMD ["run"]
