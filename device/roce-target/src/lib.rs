//! roce-target: the remote RDMA peer of the guest's soft-RoCE driver (rxe).
//!
//! A vhost-user-net backend ([`backend`]) carries Ethernet frames between QEMU's
//! virtio-net device and an RC engine ([`engine`]) that answers ARP for the target's
//! address and speaks RoCEv2 (IBTA 9.7 reliable connected service over UDP 4791, Annex
//! A17) as requester and responder. The engine only sees frames through the small
//! [`engine::Link`] trait, so tests join two engines back to back without any VM.

pub mod backend;
pub mod control;
pub mod engine;
pub mod frame;
pub mod headers;
pub mod memory;
pub mod pcap;
pub mod proxy;

pub use engine::{Engine, EngineConfig, EngineError, Link};
