# syntax=docker/dockerfile:1
# The control plane (and meshctl, for `kubectl exec` debugging). Build from the
# repository root:
#   docker build -f deploy/docker/mesh-control.Dockerfile -t mesh-control:0.1.0 .

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p control --bin mesh-control --bin meshctl \
    && install -D target/release/mesh-control /out/mesh-control \
    && install -D target/release/meshctl /out/meshctl

# glibc and CA roots, no shell, uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/mesh-control /usr/local/bin/mesh-control
COPY --from=build /out/meshctl /usr/local/bin/meshctl
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/mesh-control"]
