//! The engine side of kiln's `swarm` provider: everything kiln needs from a
//! Docker Swarm, through the Docker Engine API (`bollard`, API ≥ 1.41,
//! negotiated; never the docker CLI) and the OCI distribution API
//! (`oci-client`). It knows nothing of plans or state: a `Provider`
//! implementation calls it.
//!
//! - [`engine`]: endpoints (`unix://`, `tcp://` + TLS), version floor, timeouts.
//! - [`cluster`]: the manager connection and the nodes.
//! - [`registry`]: pushing a version from kiln's store by digest.
//! - [`server`]: servers as one-replica services, both ways; listing with
//!   tasks and addresses; waiting; removal; logs; config drift.
//! - [`node`]: per-node engines: exec sessions, filesystem export vs seal.
//! - [`balancer`]: the balancer's image, baked from kiln's own binary.
//! - [`front`]: the role balancers as services on the swarm, switched
//!   through their control channel.
//! - [`provider`]: [`Swarm`], kiln's `Provider` on all of the above.
//!
//! Everything is async (tokio); a synchronous caller owns a runtime and
//! blocks on these calls.

pub mod balancer;
pub mod cluster;
pub mod engine;
pub mod error;
pub mod front;
pub mod node;
pub mod provider;
pub mod registry;
pub mod server;

pub use cluster::{Availability, Cluster, Node, NodeHealth};
pub use engine::{Endpoint, Engine, TlsFiles};
pub use error::{Result, SwarmError};
pub use node::{ExecSessions, NodeEngine};
pub use provider::Swarm;
pub use registry::{Pushed, Registry, RegistryOptions};
pub use server::{
    config_drift, ConfigChange, LogChunk, PortMap, Restart, Server, ServerSpec, SpecField, Task,
    TaskPhase, VolumeMount,
};
