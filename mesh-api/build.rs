//! Compiles `proto/` with protox (pure Rust, no `protoc` needed) and generates
//! the tonic clients and servers.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/mesh/v1/discovery.proto", "proto/mesh/v1/ca.proto", "proto/mesh/v1/federation.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Shared, reference-counted buffer: cloning a response is not a copy.
        .bytes(".mesh.v1.DiscoveryResponse.snapshot")
        .compile_fds(fds)?;
    Ok(())
}
