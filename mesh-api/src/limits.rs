//! Bounds both ends of the control-plane API agree on, so a value one side accepts
//! is never one the other refuses or cannot hold.

/// Ring-hash virtual nodes per endpoint, at most: the ring holds this many points per
/// endpoint, so the bound keeps a service's ring in memory (4096 points x 16 bytes
/// per endpoint). The control plane refuses more (naming the annotation or field);
/// agents refuse a snapshot asking for more.
pub const MAX_VIRTUAL_NODES: u32 = 4096;

/// Encoded bytes a discovery message may take per endpoint it carries: a meshed
/// endpoint with a SPIFFE identity, node, agent address, workload name and locality
/// takes about 200.
pub const SNAPSHOT_BYTES_PER_ENDPOINT: usize = 512;

/// Encoded bytes a discovery message may take besides its endpoints (services,
/// addresses, ports, policies).
pub const SNAPSHOT_BASE_BYTES: usize = 4 * 1024 * 1024;

/// The largest discovery message an agent accepting `max_endpoints` endpoints
/// decodes: a snapshot within its endpoint limit is never cut off by the gRPC
/// message size (tonic's default of 4 MiB would stop near 20,000 endpoints).
pub fn snapshot_message_limit(max_endpoints: usize) -> usize {
    SNAPSHOT_BASE_BYTES.saturating_add(max_endpoints.saturating_mul(SNAPSHOT_BYTES_PER_ENDPOINT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_limit_grows_with_the_endpoint_limit() {
        assert_eq!(snapshot_message_limit(0), SNAPSHOT_BASE_BYTES);
        assert!(snapshot_message_limit(100_000) > 50 * 1000 * 1000);
        assert_eq!(snapshot_message_limit(usize::MAX), usize::MAX);
    }
}
