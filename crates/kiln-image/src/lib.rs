//! kiln's image layer: baking golden images from a project's recipes,
//! storing them as OCI images in a content-addressed store, sealing every
//! version and verifying roots against their seals.
//!
//! Invariants:
//! - a version exists only once its record is written; everything it
//!   refers to (blobs, unpacked root) was written before, atomically;
//! - the same inputs give the same manifest digest, byte for byte;
//! - build scripts only ever run inside a sandbox over the image's root.

mod error;
pub mod layer;
pub mod seal;
pub mod store;

pub use error::{ImageError, Result};
pub use store::{Digest, Store, VersionRecord};
pub use user::{resolve_user, UserError};
pub mod bake;
pub mod leak;
pub mod ops;
pub mod policy;
pub mod repair;
pub mod sbom;
pub mod scan;
pub mod sign;
mod source;
pub mod user;
