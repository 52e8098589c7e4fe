//! The swarm as kiln sees it through a manager: its nodes (state,
//! availability, address, labels) and the check that the endpoint kiln was
//! given can manage services at all.

use std::collections::BTreeMap;

use bollard::models::{LocalNodeState, NodeSpecAvailabilityEnum, NodeSpecRoleEnum, NodeState};

use crate::engine::{Endpoint, Engine};
use crate::error::{Result, SwarmError};

/// A node label naming the node's own engine endpoint (for exec sessions
/// and filesystem exports), e.g. `tcp://10.0.0.6:2376`: the manager cannot
/// reach a node's containers, so kiln connects to the node itself.
pub const LABEL_NODE_ENGINE: &str = "dev.kiln.engine";

/// A connection to a swarm manager.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub(crate) engine: Engine,
    /// The manager's own node id.
    pub node_id: String,
}

/// Whether a node takes work, as the manager sees it right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NodeHealth {
    /// Heartbeats arrive.
    Ready,
    /// Missed heartbeats: its tasks are not running as far as kiln can tell.
    Down,
    Disconnected,
    Unknown,
}

/// Whether the scheduler may place tasks on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Availability {
    Active,
    Pause,
    Drain,
}

/// One swarm node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub id: String,
    pub hostname: String,
    /// The address the node reports (where its host-mode ports are published).
    pub addr: String,
    pub health: NodeHealth,
    pub availability: Availability,
    pub manager: bool,
    pub labels: BTreeMap<String, String>,
    /// CPUs and memory the node offers the scheduler.
    pub nano_cpus: i64,
    pub memory_bytes: i64,
}

impl Node {
    /// Whether new servers may be placed here.
    pub fn schedulable(&self) -> bool {
        self.health == NodeHealth::Ready && self.availability == Availability::Active
    }

    /// The node's engine endpoint from its [`LABEL_NODE_ENGINE`] label.
    pub fn engine_endpoint(&self) -> Option<&str> {
        self.labels.get(LABEL_NODE_ENGINE).map(String::as_str)
    }
}

impl Cluster {
    /// Connects to a manager. Clear errors for an unreachable engine, an API
    /// older than 1.41, and an engine that is not a manager of an active swarm.
    pub async fn connect(endpoint: &Endpoint) -> Result<Cluster> {
        Cluster::from_engine(Engine::connect(endpoint).await?).await
    }

    /// Checks that a connected engine is a swarm manager.
    pub async fn from_engine(engine: Engine) -> Result<Cluster> {
        let info = engine.docker.info().await.map_err(engine.api("info"))?;
        let swarm = info.swarm.unwrap_or_default();
        let state = swarm.local_node_state.unwrap_or(LocalNodeState::EMPTY);
        if state != LocalNodeState::ACTIVE || swarm.control_available != Some(true) {
            let state = match (state, swarm.control_available) {
                (LocalNodeState::ACTIVE, _) => "worker".to_string(),
                (LocalNodeState::EMPTY | LocalNodeState::INACTIVE, _) => "not in a swarm".into(),
                (s, _) => s.to_string(),
            };
            return Err(SwarmError::NotManager {
                endpoint: engine.endpoint.clone(),
                state,
            });
        }
        Ok(Cluster {
            node_id: swarm.node_id.unwrap_or_default(),
            engine,
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Every node, in id order.
    pub async fn nodes(&self) -> Result<Vec<Node>> {
        let listed = self
            .engine
            .docker
            .list_nodes(None)
            .await
            .map_err(self.engine.api("list nodes"))?;
        let mut nodes: Vec<Node> = listed.into_iter().map(node_from).collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }
}

fn node_from(n: bollard::models::Node) -> Node {
    let spec = n.spec.unwrap_or_default();
    let status = n.status.unwrap_or_default();
    let desc = n.description.unwrap_or_default();
    let res = desc.resources.unwrap_or_default();
    Node {
        id: n.id.unwrap_or_default(),
        hostname: desc.hostname.unwrap_or_default(),
        addr: status.addr.unwrap_or_default(),
        health: match status.state {
            Some(NodeState::READY) => NodeHealth::Ready,
            Some(NodeState::DOWN) => NodeHealth::Down,
            Some(NodeState::DISCONNECTED) => NodeHealth::Disconnected,
            _ => NodeHealth::Unknown,
        },
        availability: match spec.availability {
            Some(NodeSpecAvailabilityEnum::PAUSE) => Availability::Pause,
            Some(NodeSpecAvailabilityEnum::DRAIN) => Availability::Drain,
            _ => Availability::Active,
        },
        manager: spec.role == Some(NodeSpecRoleEnum::MANAGER),
        labels: spec.labels.unwrap_or_default().into_iter().collect(),
        nano_cpus: res.nano_cpus.unwrap_or_default(),
        memory_bytes: res.memory_bytes.unwrap_or_default(),
    }
}
