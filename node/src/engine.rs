//! The node's implementation of the dashboard's `Engine`: every API call becomes a read of the applied
//! state or a Raft command, so what the API acknowledges is committed.

use std::sync::Arc;

use async_trait::async_trait;
use campanile_cluster::{
    CallTask, Campaign, CampaignId, CampaignSpec, Cluster, ClusterError, Command, NewSubscriber,
    NodeId, Response, Subscriber, SubscriberId,
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
    /// The RTP pacer, whose streams, packets and lateness the metrics show.
    pub pacer: crate::media::pacer::PacerHandle,
    /// Hex of the admin API token.
    pub admin_token: String,
    pub drill: Option<String>,
    /// This node's data-centre label.
    pub datacenter: String,
    /// Places the public page's verification calls.
    pub verifier: std::sync::Arc<crate::verify::Verifier>,
    /// `http.public_url`, without a trailing slash; None when unset.
    pub public_url: Option<String>,
}

fn cluster_err(e: ClusterError) -> EngineError {
    EngineError::Unavailable(e.to_string())
}

impl NodeEngine {
    /// Commits `cmd`. Inside an API request it is wrapped in `Audited`, so the audit log says which
    /// token asked for it and what came of it.
    async fn write(&self, cmd: Command) -> Result<Response, EngineError> {
        let cmd = match campanile_dashboard::engine::current_actor() {
            Some(actor) => Command::Audited {
                at_ms: now_ms(),
                actor,
                tenant: None,
                command: Box::new(cmd),
            },
            None => cmd,
        };
        match self.cluster.write(cmd).await.map_err(cluster_err)? {
            Response::Refused(r) => Err(EngineError::from(r)),
            other => Ok(other),
        }
    }

    /// Leader, term and every member with what the cluster knows of it. The lag (log entries the
    /// member is behind the leader's last entry) is known only on the leader.
    fn cluster_view(&self) -> serde_json::Value {
        let status = self.cluster.status();
        let me = self.cluster.node_id().0;
        let registered: std::collections::BTreeMap<u64, campanile_cluster::NodeInfo> = self
            .cluster
            .read(|s| s.nodes().map(|n| (n.id.0, n.clone())).collect());
        let now = now_ms();
        let channels: std::collections::BTreeMap<u64, u32> = self
            .cluster
            .read(|s| s.channels_in_use().map(|(n, c)| (n.0, c)).collect());
        let heartbeats: std::collections::BTreeMap<u64, u64> = self
            .cluster
            .read(|s| s.heartbeats().map(|(n, t)| (n.0, t)).collect());
        let capacities: std::collections::BTreeMap<u64, u32> = self
            .cluster
            .read(|s| s.capacities().map(|(n, c)| (n.0, c)).collect());
        let leases: std::collections::BTreeMap<u64, usize> = self.cluster.read(|s| {
            let mut m = std::collections::BTreeMap::new();
            for (_, l) in s.leases().filter(|(_, l)| l.expires_ms > now) {
                *m.entry(l.node.0).or_insert(0) += 1;
            }
            m
        });
        let clocks = self.cluster.clock_offsets();
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
                let info = registered.get(&id);
                let lag = match (status.leader == Some(me), status.last_log_index, applied) {
                    (true, Some(last), Some(a)) => Some(last.saturating_sub(a)),
                    _ => None,
                };
                serde_json::json!({
                    "id": id,
                    "role": role,
                    "datacenter": info.map(|n| n.datacenter.clone())
                        .or_else(|| (id == me).then(|| self.datacenter.clone())),
                    "raft_addr": raft_addr,
                    "http_addr": info.map(|n| n.http_addr.clone()),
                    "applied_index": applied,
                    "lag": lag,
                    "leases": leases.get(&id).copied().unwrap_or(0),
                    "heartbeat_age_ms": heartbeats.get(&id).map(|t| now.saturating_sub(*t)),
                    "channels_in_use": channels.get(&id).copied(),
                    "capacity": capacities.get(&id).copied(),
                    "clock_offset_ms": clocks.get(&id).map(|c| c.offset_us as f64 / 1e3),
                })
            })
            .collect();
        serde_json::json!({
            "node": me,
            "leader": status.leader,
            "term": status.term,
            "last_log_index": status.last_log_index,
            "applied_index": status.applied_index,
            "snapshot_index": status.snapshot_index,
            "purged_index": status.purged_index,
            "members": members,
        })
    }

    /// Commits a lifecycle command for campaign `id` and answers the campaign as it is afterwards.
    async fn campaign_command(
        &self,
        id: CampaignId,
        cmd: impl FnOnce(u64, CampaignId) -> Command,
    ) -> Result<Campaign, EngineError> {
        self.write(cmd(now_ms(), id)).await?;
        self.campaign_now(id)
    }

    fn campaign_now(&self, id: CampaignId) -> Result<Campaign, EngineError> {
        self.cluster
            .read(|s| s.campaign(id).cloned())
            .ok_or_else(|| EngineError::NotFound(format!("campaign {id} does not exist")))
    }
}

/// The hex SHA-256 under which the cluster stores a token.
pub fn token_sha256(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
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

    async fn import_subscribers(
        &self,
        batch: Vec<NewSubscriber>,
    ) -> Result<Vec<campanile_cluster::Imported>, EngineError> {
        match self
            .write(Command::CreateSubscribers {
                at_ms: now_ms(),
                subscribers: batch,
            })
            .await?
        {
            Response::Imported(r) => Ok(r),
            other => Err(EngineError::Internal(format!(
                "unexpected response {other:?}"
            ))),
        }
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

    async fn create_campaign(
        &self,
        spec: CampaignSpec,
        created_by: Option<String>,
    ) -> Result<Campaign, EngineError> {
        let resp = self
            .write(Command::CreateCampaign {
                at_ms: now_ms(),
                created_by,
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
        self.campaign_command(id, |at_ms, id| Command::StartCampaign { at_ms, id })
            .await
    }

    async fn approve_campaign(&self, id: CampaignId, by: String) -> Result<Campaign, EngineError> {
        self.campaign_command(id, |at_ms, id| Command::ApproveCampaign { at_ms, id, by })
            .await
    }

    async fn override_approval(
        &self,
        id: CampaignId,
        by: String,
        reason: String,
    ) -> Result<Campaign, EngineError> {
        self.campaign_command(id, |at_ms, id| Command::OverrideApproval {
            at_ms,
            id,
            by,
            reason,
        })
        .await
    }

    async fn operators(&self) -> Result<Vec<campanile_cluster::Operator>, EngineError> {
        Ok(self.cluster.read(|s| s.operators().cloned().collect()))
    }

    async fn create_operator(
        &self,
        operator: campanile_cluster::Operator,
    ) -> Result<(), EngineError> {
        self.write(Command::CreateOperator {
            at_ms: now_ms(),
            operator,
        })
        .await
        .map(drop)
    }

    async fn update_operator(
        &self,
        update: campanile_cluster::OperatorUpdate,
    ) -> Result<(), EngineError> {
        self.write(Command::UpdateOperator {
            at_ms: now_ms(),
            update,
        })
        .await
        .map(drop)
    }

    async fn create_session(&self, session: campanile_cluster::Session) -> Result<(), EngineError> {
        self.write(Command::CreateSession {
            at_ms: now_ms(),
            session,
        })
        .await
        .map(drop)
    }

    async fn end_session(&self, token_sha256: String) -> Result<(), EngineError> {
        self.write(Command::EndSession {
            at_ms: now_ms(),
            token_sha256,
        })
        .await
        .map(drop)
    }

    async fn session(
        &self,
        token_sha256: &str,
    ) -> Option<(campanile_cluster::Session, campanile_cluster::Operator)> {
        let look = |s: &campanile_cluster::State| {
            s.session(token_sha256, now_ms())
                .map(|(a, b)| (a.clone(), b.clone()))
        };
        // A login made through another node may not be applied here yet: catch up once.
        if let Some(found) = self.cluster.read(look) {
            return Some(found);
        }
        self.linearize().await.ok()?;
        self.cluster.read(look)
    }

    async fn search_subscribers(
        &self,
        tenant: String,
        query: String,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<campanile_cluster::Subscriber>, usize), EngineError> {
        let q = query.trim().to_lowercase();
        Ok(self.cluster.read(|s| {
            let mut total = 0;
            let mut page = Vec::new();
            for sub in s.subscribers().filter(|x| x.tenant == tenant) {
                let hit = q.is_empty()
                    || sub.phone.as_str().contains(&q)
                    || sub
                        .name
                        .as_ref()
                        .is_some_and(|n| n.to_lowercase().contains(&q))
                    || sub
                        .zone
                        .as_ref()
                        .is_some_and(|z| z.to_lowercase().contains(&q));
                if hit {
                    if total >= offset && page.len() < limit {
                        page.push(sub.clone());
                    }
                    total += 1;
                }
            }
            (page, total)
        }))
    }

    async fn update_subscriber(
        &self,
        id: SubscriberId,
        update: campanile_cluster::SubscriberUpdate,
    ) -> Result<Subscriber, EngineError> {
        self.write(Command::UpdateSubscriber {
            at_ms: now_ms(),
            id,
            update,
        })
        .await?;
        self.subscriber(id).await
    }

    async fn start_verification(
        &self,
        tenant: String,
        phone: campanile_cluster::PhoneNumber,
        purpose: campanile_cluster::VerificationPurpose,
    ) -> Result<(), EngineError> {
        self.linearize().await?;
        let Some(sub) = self
            .cluster
            .read(|s| s.subscriber_by_phone(&tenant, &phone).cloned())
        else {
            tracing::info!(number = %phone.masked(), "verification asked for a number that is not registered; no call");
            return Ok(());
        };
        let code = crate::verify::new_code();
        self.write(Command::RequestVerification {
            at_ms: now_ms(),
            id: sub.id,
            verification: campanile_cluster::Verification {
                code_sha256: campanile_cluster::verification_hash(&tenant, &phone, &code),
                expires_ms: now_ms() + crate::verify::CODE_TTL.as_millis() as u64,
                tries_left: campanile_cluster::VERIFICATION_TRIES,
                purpose,
            },
        })
        .await?;
        let caller = self
            .cluster
            .read(|s| s.tenant(&tenant).and_then(|t| t.caller_id.clone()));
        self.verifier.call(
            phone.as_str().to_string(),
            code,
            sub.language.clone(),
            caller,
        );
        Ok(())
    }

    async fn confirm_verification(
        &self,
        tenant: String,
        phone: campanile_cluster::PhoneNumber,
        code: String,
    ) -> Result<campanile_cluster::VerificationPurpose, EngineError> {
        self.linearize().await?;
        let found = self.cluster.read(|s| {
            s.subscriber_by_phone(&tenant, &phone)
                .map(|sub| (sub.id, sub.verification.as_ref().map(|v| v.purpose)))
        });
        let Some((id, Some(purpose))) = found else {
            return Err(EngineError::Invalid(
                "no verification code is waiting for this number (or it expired); ask for a new call"
                    .into(),
            ));
        };
        // The citizen's own request: in the audit log as such (an erasure must be traceable).
        let cmd = Command::Audited {
            at_ms: now_ms(),
            actor: "citizen (public page)".into(),
            tenant: Some(tenant.clone()),
            command: Box::new(Command::ConfirmVerification {
                at_ms: now_ms(),
                id,
                code_sha256: campanile_cluster::verification_hash(&tenant, &phone, code.trim()),
            }),
        };
        match self.cluster.write(cmd).await.map_err(cluster_err)? {
            Response::Refused(r) => Err(EngineError::from(r)),
            _ => Ok(purpose),
        }
    }

    async fn preview(&self, text: String, language: String) -> Result<Vec<u8>, EngineError> {
        tokio::task::spawn_blocking(move || {
            let cache = crate::media::message::AudioCache::new(None);
            crate::media::message::prepare_tts_message(&text, &language, &language, &cache)
                .map(|audio| crate::media::wav::encode_wav_8k(&audio.samples))
        })
        .await
        .map_err(|e| EngineError::Internal(e.to_string()))?
        .map_err(|e| EngineError::Unavailable(format!("the preview cannot be made: {e}")))
    }

    async fn cancel_campaign(&self, id: CampaignId) -> Result<Campaign, EngineError> {
        self.campaign_command(id, |at_ms, id| Command::CancelCampaign { at_ms, id })
            .await
    }

    async fn pause_campaign(&self, id: CampaignId) -> Result<Campaign, EngineError> {
        self.campaign_command(id, |at_ms, id| Command::PauseCampaign { at_ms, id })
            .await
    }

    async fn resume_campaign(&self, id: CampaignId) -> Result<Campaign, EngineError> {
        self.campaign_command(id, |at_ms, id| Command::ResumeCampaign { at_ms, id })
            .await
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
        self.metrics.set_sip(self.endpoint.stats());
        self.metrics.set_rtp(&self.pacer);
        self.metrics.render(&self.cluster)
    }

    fn check_token(&self, presented: &str) -> bool {
        // This node's own admin token always works here (also before its registration is
        // committed); any token the cluster knows works on every node.
        constant_time_eq(presented.as_bytes(), self.admin_token.as_bytes())
            || self
                .cluster
                .read(|s| s.token(&token_sha256(presented)).is_some())
    }

    fn token_actor(&self, presented: &str) -> Option<String> {
        if constant_time_eq(presented.as_bytes(), self.admin_token.as_bytes()) {
            return Some(format!(
                "token:admin token of node {}",
                self.cluster.node_id().0
            ));
        }
        self.cluster.read(|s| {
            s.token(&token_sha256(presented))
                .map(|t| format!("token:{}", t.label))
        })
    }

    fn token_principal(
        &self,
        presented: &str,
    ) -> Option<(String, Option<campanile_cluster::TokenScope>)> {
        if constant_time_eq(presented.as_bytes(), self.admin_token.as_bytes()) {
            return self.token_actor(presented).map(|label| (label, None));
        }
        self.cluster.read(|s| {
            s.token(&token_sha256(presented))
                .map(|t| (format!("token:{}", t.label), t.scope.clone()))
        })
    }

    async fn tokens(&self) -> Result<Vec<campanile_cluster::ApiToken>, EngineError> {
        Ok(self.cluster.read(|s| s.tokens().cloned().collect()))
    }

    async fn add_token(&self, token: campanile_cluster::ApiToken) -> Result<(), EngineError> {
        self.write(Command::AddToken { token }).await.map(drop)
    }

    async fn revoke_token(&self, sha256: String) -> Result<(), EngineError> {
        self.write(Command::RevokeToken {
            at_ms: now_ms(),
            sha256,
        })
        .await
        .map(drop)
    }

    async fn set_caller_id(
        &self,
        tenant: String,
        caller_id: Option<campanile_cluster::CallerId>,
    ) -> Result<campanile_cluster::Tenant, EngineError> {
        self.write(Command::SetCallerId {
            at_ms: now_ms(),
            tenant: tenant.clone(),
            caller_id,
        })
        .await?;
        self.cluster
            .read(|s| s.tenant(&tenant).cloned())
            .ok_or_else(|| EngineError::NotFound(format!("tenant `{tenant}` does not exist")))
    }
    async fn set_quiet_hours(
        &self,
        tenant: String,
        quiet_hours: Option<campanile_cluster::QuietHours>,
    ) -> Result<campanile_cluster::Tenant, EngineError> {
        self.write(Command::SetQuietHours {
            at_ms: now_ms(),
            tenant: tenant.clone(),
            quiet_hours,
        })
        .await?;
        self.cluster
            .read(|s| s.tenant(&tenant).cloned())
            .ok_or_else(|| EngineError::NotFound(format!("tenant `{tenant}` does not exist")))
    }

    async fn tenants(&self) -> Result<Vec<campanile_cluster::Tenant>, EngineError> {
        Ok(self.cluster.read(|s| s.tenants().cloned().collect()))
    }

    async fn create_tenant(
        &self,
        slug: String,
        name: String,
    ) -> Result<campanile_cluster::Tenant, EngineError> {
        self.write(Command::CreateTenant {
            at_ms: now_ms(),
            slug: slug.clone(),
            name,
        })
        .await?;
        self.cluster
            .read(|s| s.tenant(&slug).cloned())
            .ok_or_else(|| EngineError::Internal(format!("tenant {slug} vanished")))
    }

    /// Decodes any common WAV to 8 kHz mono (refusing what cannot be decoded, by name) and stores that.
    async fn put_audio(&self, tenant: String, wav: Vec<u8>) -> Result<(String, u64), EngineError> {
        let samples = tokio::task::spawn_blocking(move || crate::media::wav::decode_to_8k(&wav))
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))?
            .map_err(|e| EngineError::Invalid(format!("the recording cannot be decoded: {e}")))?;
        if samples.is_empty() {
            return Err(EngineError::Invalid("the recording holds no audio".into()));
        }
        let duration_ms = samples.len() as u64 * 1000 / crate::media::wav::RATE as u64;
        let wav = crate::media::wav::encode_wav_8k(&samples);
        if wav.len() > campanile_cluster::MAX_AUDIO_BYTES {
            return Err(EngineError::Invalid(format!(
                "the recording lasts {} s; the limit is 600 s",
                duration_ms / 1000
            )));
        }
        match self
            .write(Command::PutAudio {
                at_ms: now_ms(),
                tenant,
                wav,
            })
            .await?
        {
            Response::AudioStored(sha) => Ok((sha, duration_ms)),
            other => Err(EngineError::Internal(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    async fn audit(
        &self,
        tenant: Option<String>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<campanile_cluster::AuditEntry>, EngineError> {
        Ok(self.cluster.read(|s| {
            s.audit()
                .iter()
                .skip(after.min(usize::MAX as u64) as usize)
                .filter(|e| tenant.is_none() || e.tenant == tenant)
                .take(limit)
                .cloned()
                .collect()
        }))
    }

    fn public_url(&self) -> Option<String> {
        self.public_url.clone()
    }

    fn drill_mode(&self) -> Option<String> {
        self.drill.clone()
    }

    async fn cluster(&self) -> Result<serde_json::Value, EngineError> {
        Ok(self.cluster_view())
    }

    async fn remove_member(&self, node: u64) -> Result<serde_json::Value, EngineError> {
        self.cluster
            .remove_member(NodeId(node))
            .await
            .map_err(|e| match e {
                ClusterError::Refused(m) => EngineError::Conflict(m),
                other => cluster_err(other),
            })?;
        self.write(Command::ForgetNode {
            at_ms: now_ms(),
            node: NodeId(node),
        })
        .await?;
        tracing::info!(node, "node removed from the cluster");
        Ok(self.cluster_view())
    }

    /// Streams the backup into an unnamed temporary file (mode 0600, gone when closed), so a
    /// million subscribers are never held serialised in memory.
    async fn backup(&self) -> Result<std::fs::File, EngineError> {
        let cluster = self.cluster.clone();
        let node = cluster.node_id().0;
        let write = move || -> std::io::Result<std::fs::File> {
            use std::io::{Seek, SeekFrom};
            let mut file = cluster.backup_to(tempfile::tempfile()?, |index, subscribers| {
                let header = crate::admin::BackupHeader {
                    format: crate::admin::BACKUP_FORMAT.into(),
                    taken_ms: now_ms(),
                    node,
                    applied_index: index,
                    subscribers,
                };
                let mut line = serde_json::to_vec(&header).unwrap_or_default();
                line.push(b'\n');
                line
            })?;
            file.seek(SeekFrom::Start(0))?;
            Ok(file)
        };
        tokio::task::spawn_blocking(write)
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))?
            .map_err(|e| EngineError::Internal(format!("cannot write the backup: {e}")))
    }

    async fn linearize(&self) -> Result<(), EngineError> {
        self.cluster.linearizable().await.map_err(cluster_err)
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
