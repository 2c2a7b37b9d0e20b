# syntax=docker/dockerfile:1
# The node agent. Build from the repository root:
#   docker build -f deploy/docker/mesh-agent.Dockerfile -t mesh-agent:0.1.0 .
# The eBPF object is committed (mesh-agent/ebpf/mesh-ebpf.o), so a stable
# toolchain builds the agent; no nightly or bpf-linker here.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p mesh-agent --bin mesh-agent -p mesh-cni --bin mesh-cni \
    && install -D target/release/mesh-agent /out/mesh-agent \
    && install -D target/release/mesh-cni /out/mesh-cni

FROM debian:bookworm-slim
# iptables (nft backend) for iptables mode and the pod-level init container; bash is
# in the base image and serves the sidecar's exec probes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/mesh-agent /usr/local/bin/mesh-agent
# The CNI plugin; the DaemonSet's mesh-cni-install container copies it onto the node.
COPY --from=build /out/mesh-cni /usr/local/bin/mesh-cni
# Root: the capabilities the manifests grant (BPF, NET_ADMIN) only take effect for root.
ENTRYPOINT ["/usr/local/bin/mesh-agent"]
CMD ["run"]
