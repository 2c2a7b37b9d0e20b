//! Service discovery on the agent: the control-plane stream ([`client`]), the
//! validated routing table of one snapshot ([`table`]) and the lock-free store the
//! data path resolves original destinations through ([`store`]).

pub mod client;
pub mod store;
pub mod table;

pub use store::RouteStore;
