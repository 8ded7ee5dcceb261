//! The node's implementation of the dashboard's `Engine`: every API call becomes a read of the applied
//! state or a Raft command, so what the API acknowledges is committed.

use std::sync::Arc;

use async_trait::async_trait;
use campanile_cluster::{
    CallTask, Campaign, CampaignId, CampaignSpec, Cluster, ClusterError, Command, NewSubscriber,
    Refusal, Response, Subscriber, SubscriberId,
};
use campanile_dashboard::{Engine, EngineError, Health};

use crate::dialer::now_ms;
use crate::metrics::Metrics;
use crate::sip::endpoint::Endpoint;

/// Everything the HTTP surface may touch.
pub struct NodeEngine {
    pub cluster: Cluster,
    pub metrics: Metrics,
    pub endpoint: Endpoint,
    /// Hex of the admin API token.
    pub admin_token: String,
    pub drill: Option<String>,
    /// This node's data-centre label.
    pub datacenter: String,
}

fn cluster_err(e: ClusterError) -> EngineError {
    EngineError::Unavailable(e.to_string())
}

fn refusal(r: Refusal) -> EngineError {
    match r {
        Refusal::DuplicatePhone(..) => EngineError::Conflict(r.to_string()),
        Refusal::UnknownSubscriber(_) | Refusal::UnknownCampaign(_) => {
            EngineError::NotFound(r.to_string())
        }
        Refusal::WrongCampaignState { .. } => EngineError::Conflict(r.to_string()),
    }
}

impl NodeEngine {
    async fn write(&self, cmd: Command) -> Result<Response, EngineError> {
        match self.cluster.write(cmd).await.map_err(cluster_err)? {
            Response::Refused(r) => Err(refusal(r)),
            other => Ok(other),
        }
    }

    fn campaign_now(&self, id: CampaignId) -> Result<Campaign, EngineError> {
        self.cluster
            .read(|s| s.campaign(id).cloned())
            .ok_or_else(|| EngineError::NotFound(format!("campaign {id} does not exist")))
    }
}

/// Compares two strings in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[async_trait]
impl Engine for NodeEngine {
    async fn create_subscriber(&self, s: NewSubscriber) -> Result<Subscriber, EngineError> {
        let resp = self
            .write(Command::CreateSubscriber {
                at_ms: now_ms(),
                subscriber: s,
            })
            .await?;
        let Response::SubscriberCreated(id) = resp else {
            return Err(EngineError::Internal(format!(
                "unexpected response {resp:?}"
            )));
        };
        self.subscriber(id).await
    }

    async fn subscriber(&self, id: SubscriberId) -> Result<Subscriber, EngineError> {
        self.cluster
            .read(|s| s.subscriber(id).cloned())
            .ok_or_else(|| EngineError::NotFound(format!("subscriber {id} does not exist")))
    }

    async fn delete_subscriber(&self, id: SubscriberId) -> Result<(), EngineError> {
        self.write(Command::DeleteSubscriber {
            at_ms: now_ms(),
            id,
        })
        .await
        .map(|_| ())
    }

    async fn create_campaign(&self, spec: CampaignSpec) -> Result<Campaign, EngineError> {
        let resp = self
            .write(Command::CreateCampaign {
                at_ms: now_ms(),
                spec,
            })
            .await?;
        let Response::CampaignCreated(id) = resp else {
            return Err(EngineError::Internal(format!(
                "unexpected response {resp:?}"
            )));
        };
        self.campaign_now(id)
    }

    async fn start_campaign(&self, id: CampaignId) -> Result<Campaign, EngineError> {
        self.write(Command::StartCampaign {
            at_ms: now_ms(),
            id,
        })
        .await?;
        self.campaign_now(id)
    }

    async fn cancel_campaign(&self, id: CampaignId) -> Result<Campaign, EngineError> {
        self.write(Command::CancelCampaign {
            at_ms: now_ms(),
            id,
        })
        .await?;
        self.campaign_now(id)
    }

    async fn campaign(&self, id: CampaignId) -> Result<Campaign, EngineError> {
        self.campaign_now(id)
    }

    async fn campaigns(&self) -> Result<Vec<Campaign>, EngineError> {
        Ok(self.cluster.read(|s| s.campaigns().cloned().collect()))
    }

    async fn tasks(&self, id: CampaignId) -> Result<Vec<CallTask>, EngineError> {
        self.campaign_now(id)?;
        Ok(self.cluster.read(|s| s.tasks(id).cloned().collect()))
    }

    fn metrics_text(&self) -> String {
        self.metrics.set_sip_malformed(
            self.endpoint
                .stats()
                .dropped_malformed
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        self.metrics.render(&self.cluster)
    }

    fn check_token(&self, presented: &str) -> bool {
        constant_time_eq(presented.as_bytes(), self.admin_token.as_bytes())
    }

    fn drill_mode(&self) -> Option<String> {
        self.drill.clone()
    }

    async fn cluster(&self) -> Result<serde_json::Value, EngineError> {
        let status = self.cluster.status();
        let me = self.cluster.node_id().0;
        let members: Vec<serde_json::Value> = self
            .cluster
            .members()
            .into_iter()
            .map(|(id, raft_addr, voter, applied)| {
                let role = if Some(id) == status.leader {
                    "leader"
                } else if voter {
                    "follower"
                } else {
                    "learner"
                };
                serde_json::json!({
                    "id": id,
                    "role": role,
                    "raft_addr": raft_addr,
                    "applied_index": applied,
                    "datacenter": (id == me).then(|| self.datacenter.clone()),
                })
            })
            .collect();
        Ok(serde_json::json!({
            "node": me,
            "leader": status.leader,
            "term": status.term,
            "members": members,
        }))
    }

    async fn health(&self) -> Health {
        let status = self.cluster.status();
        let leader = status.leader.is_some();
        Health {
            ok: leader,
            detail: if leader {
                format!(
                    "leader {:?}, applied index {}",
                    status.leader, status.applied_index
                )
            } else {
                "no Raft leader: writes are not possible".to_string()
            },
        }
    }
}

/// Shared handle used by `up` and `demo`.
pub type SharedEngine = Arc<NodeEngine>;
