//! Building what a rig boots, cached by the hash of its inputs: QEMU, rdma-core, guest kernels, the initramfs, and checks of a user's own kernel.

pub mod byo;
pub mod cache;
pub mod image;
pub mod kernel;
pub mod qemu;
pub mod rdma_core;
pub mod recipe;
