//! Harness for the mesh's end-to-end tests: test hosts as network namespaces joined
//! by a bridge, workload cgroups, the real agent binary, in-namespace servers, and
//! workload clients run as separate processes inside enrolled cgroups.
//!
//! Everything created is owned by a guard that removes it on drop, panics included,
//! and every name carries the test process id so parallel tests never collide.

pub mod agent;
pub mod attacker;
pub mod bins;
pub mod capture;
pub mod cgroup;
pub mod cni;
pub mod control;
pub mod demo;
pub mod grpc;
pub mod load;
pub mod mesh;
pub mod netns;
pub mod nginx;
pub mod otlp;
pub mod pods;
pub mod privilege;
pub mod process;
pub mod servers;
pub mod wait;
pub mod websocket;

pub use agent::{Agent, AgentOptions, Pins};
pub use cgroup::Cgroup;
pub use control::Control;
pub use mesh::MeshLab;
pub use netns::{Host, Lab};
pub use privilege::{require_root, require_tool};
pub use wait::{eventually, wait_until};

/// Declares each named test twice, in modules `ebpf` and `iptables`: every e2e
/// behaviour must hold in both interception modes. Each test calls the function of
/// the same name (in the invoking module) with the mode; without root it fails
/// under `CI=true` and reports the skip otherwise (see [`require_root`]).
#[macro_export]
macro_rules! both_modes {
    ($($name:ident),* $(,)?) => {
        mod ebpf {
            $( #[test] fn $name() { if $crate::require_root(stringify!($name)) { super::$name("ebpf") } } )*
        }
        mod iptables {
            $( #[test] fn $name() { if $crate::require_root(stringify!($name)) { super::$name("iptables") } } )*
        }
    };
}
