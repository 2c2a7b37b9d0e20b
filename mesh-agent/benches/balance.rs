//! Cost of one `Balancer::pick` (including dropping its guard) per algorithm, for 3, 16
//! and 256 healthy endpoints, with default breakers and outlier detection in place.
//!
//! Run: `cargo bench -p mesh-agent --bench balance -- --quick`

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use mesh_agent::balance::{Algorithm, EndpointSet, EndpointSpec, LbConfig, Locality, PickContext, build};
use mesh_agent::observe::labels::MeshName;
use mesh_agent::resilience::breaker::BreakerConfig;
use mesh_agent::resilience::clock::SystemClock;
use mesh_agent::resilience::outlier::OutlierConfig;
use mesh_agent::resilience::random::ThreadRandom;

fn set_of(n: u32) -> EndpointSet {
    let mut set = EndpointSet::new(
        MeshName::known("bench/service"),
        SystemClock::shared(),
        ThreadRandom::shared(),
        BreakerConfig::default(),
        OutlierConfig::default(),
    );
    set.update((0..n).map(|i| {
        let [_, b, c, d] = i.to_be_bytes();
        EndpointSpec {
            addr: SocketAddr::from(([10, b, c, d], 8080)),
            weight: 1 + i % 4,
            locality: Locality::new("eu", if i % 2 == 0 { "eu-a" } else { "eu-b" }),
            healthy: true,
        }
    }));
    set
}

fn pick(c: &mut Criterion) {
    let algorithms = [
        ("round_robin", Algorithm::RoundRobin),
        ("least_request", Algorithm::LeastRequest),
        ("weighted_round_robin", Algorithm::WeightedRoundRobin),
        ("ring_hash", Algorithm::RingHash),
        ("maglev", Algorithm::Maglev),
        ("random", Algorithm::Random),
    ];
    let mut group = c.benchmark_group("pick");
    for (name, algorithm) in algorithms {
        for n in [3u32, 16, 256] {
            let set = set_of(n);
            let balancer = build(&LbConfig::with_algorithm(algorithm), &set);
            let mut key = 0u64;
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| {
                    key = key.wrapping_add(1);
                    let ctx = PickContext { hash_key: Some(key), locality: None };
                    black_box(balancer.pick(black_box(&ctx)))
                })
            });
        }
    }
    // Locality-aware least request with a known caller: the tier lookup's extra cost.
    let me = Locality::new("eu", "eu-a");
    for n in [3u32, 16, 256] {
        let set = set_of(n);
        let config = LbConfig { locality_aware: true, ..LbConfig::with_algorithm(Algorithm::LeastRequest) };
        let balancer = build(&config, &set);
        group.bench_with_input(BenchmarkId::new("least_request_locality", n), &n, |b, _| {
            b.iter(|| {
                let ctx = PickContext { hash_key: None, locality: Some(&me) };
                black_box(balancer.pick(black_box(&ctx)))
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    targets = pick
}
criterion_main!(benches);
