//! Releases: each carried-out plan of an environment, as the state keeps
//! them. The planner reads them to pick rollback targets.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{PlanKind, RoleTarget};

/// How a release ended (or that it is still running, or was cut off).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Running,
    Succeeded,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Running => "running",
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Outcome> {
        match s {
            "running" => Some(Outcome::Running),
            "succeeded" => Some(Outcome::Succeeded),
            "failed" => Some(Outcome::Failed),
            _ => None,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One release: a plan carried out on an environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Release {
    pub env: String,
    /// 1, 2, 3... within the environment.
    pub id: i64,
    pub created: i64,
    pub finished: Option<i64>,
    pub actor: String,
    pub kind: PlanKind,
    pub plan_hash: String,
    pub summary: String,
    /// What each role runs after the release. Empty for a destroy, and for
    /// releases recorded before targets were kept (state schema < 4).
    pub targets: Vec<RoleTarget>,
    pub outcome: Outcome,
    pub detail: String,
}
