//! The Raft log outlives releases: a node of the next release must replay this release's log
//! (rolling upgrades). `fixtures/commands-v1.jsonl` holds one committed command of every kind, as
//! this release writes them. Every line must still parse and write back byte for byte, and every
//! kind of command must have a line. Changing a command's shape breaks this test; add a new variant
//! or a field with a serde default instead, and append its line to the fixture (never edit a line).
//!
//! Regenerate the lines of new variants with `CAMPANILE_APPEND_FIXTURE=1 cargo test -p
//! campanile-cluster --test log_format`.

use campanile_cluster::*;

/// One command of every kind. The match in `kind` makes the compiler ask for a new variant here.
fn one_of_each() -> Vec<Command> {
    let sub = NewSubscriber {
        tenant: campanile_cluster::default_tenant(),
        phone: PhoneNumber::from_e164_unchecked("+393471234567"),
        name: Some("Maria Rossi".into()),
        language: "it".into(),
        zone: Some("centro".into()),
        verified: true,
        consent: None,
    };
    vec![
        Command::CreateSubscriber {
            at_ms: 1,
            subscriber: sub.clone(),
        },
        Command::CreateSubscribers {
            at_ms: 1,
            subscribers: vec![sub],
        },
        Command::DeleteSubscriber {
            at_ms: 2,
            id: SubscriberId(1),
        },
        Command::CreateCampaign {
            at_ms: 3,
            created_by: None,
            spec: CampaignSpec {
                not_before_ms: None,
                deadline_ms: None,
                tenant: campanile_cluster::default_tenant(),
                title: "Allerta".into(),
                message: Message::Tts {
                    text: "Il fiume è in piena".into(),
                    language: "it".into(),
                },
                audience: Audience::Zones(vec!["centro".into()]),
                priority: Priority::Emergency,
                require_confirmation: true,
                retry: RetryPolicy::default_for(Priority::Emergency),
            },
        },
        Command::StartCampaign {
            at_ms: 4,
            id: CampaignId(1),
        },
        Command::CancelCampaign {
            at_ms: 5,
            id: CampaignId(1),
        },
        Command::PauseCampaign {
            at_ms: 15,
            id: CampaignId(1),
        },
        Command::ResumeCampaign {
            at_ms: 16,
            id: CampaignId(1),
        },
        Command::RecordAttempts {
            at_ms: 6,
            node: NodeId(2),
            events: vec![
                AttemptEvent::Started {
                    campaign: CampaignId(1),
                    subscriber: SubscriberId(1),
                    attempt: 1,
                    epoch: None,
                },
                AttemptEvent::Finished {
                    campaign: CampaignId(1),
                    subscriber: SubscriberId(1),
                    attempt: 1,
                    outcome: Outcome::HungUp { after_ms: 4200 },
                    next: Next::RetryAt(60_000),
                    epoch: None,
                },
                AttemptEvent::Finished {
                    campaign: CampaignId(1),
                    subscriber: SubscriberId(1),
                    attempt: 2,
                    outcome: Outcome::Confirmed,
                    next: Next::Final(FinalState::Confirmed),
                    epoch: None,
                },
            ],
        },
        Command::AddToken {
            token: ApiToken {
                scope: None,
                sha256: "ab".repeat(32),
                label: "admin token of node 1".into(),
                created_ms: 7,
            },
        },
        Command::RegisterNode {
            at_ms: 8,
            node: NodeInfo {
                id: NodeId(2),
                datacenter: "dc-centro".into(),
                raft_addr: "10.0.2.11:7000".into(),
                http_addr: "10.0.2.11:8080".into(),
                registered_ms: 8,
                started_ms: 8,
            },
        },
        Command::ReclaimTasks {
            at_ms: 9,
            from: NodeId(2),
        },
        Command::HandOverCalls {
            at_ms: 9,
            from: NodeId(2),
            moves: vec![(CampaignId(1), SubscriberId(1), NodeId(3))],
        },
        Command::ForgetNode {
            at_ms: 10,
            node: NodeId(2),
        },
        Command::RenewLeases {
            at_ms: 11,
            node: NodeId(2),
            lease_ms: 3000,
            channels_in_use: None,
            capacity: None,
        },
        Command::AssignLeases {
            at_ms: 12,
            lease_ms: 3000,
            grants: vec![(0, NodeId(1)), (255, NodeId(3))],
        },
        Command::ReleaseLeases {
            at_ms: 13,
            node: NodeId(1),
            partitions: vec![0],
        },
        Command::RecordAttempts {
            at_ms: 14,
            node: NodeId(3),
            events: vec![AttemptEvent::Started {
                campaign: CampaignId(1),
                subscriber: SubscriberId(2),
                attempt: 1,
                epoch: Some(4),
            }],
        },
        Command::CreateTenant {
            at_ms: 16,
            slug: "comune-di-pisa".into(),
            name: "Comune di Pisa".into(),
        },
        Command::CreateOperator {
            at_ms: 17,
            operator: Operator {
                totp_secret: None,
                username: "sindaco".into(),
                display_name: "Il Sindaco".into(),
                role: Role::Approver,
                tenants: vec!["comune-di-pisa".into()],
                password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo".into(),
                disabled: false,
                created_ms: 17,
                updated_ms: 17,
            },
        },
        Command::UpdateOperator {
            at_ms: 18,
            update: OperatorUpdate {
                totp: None,
                username: "sindaco".into(),
                role: None,
                tenants: None,
                password_hash: None,
                disabled: Some(true),
            },
        },
        Command::PutAudio {
            at_ms: 19,
            tenant: "comune-di-pisa".into(),
            wav: b"RIFF....WAVE".to_vec(),
        },
        Command::Audited {
            at_ms: 20,
            actor: "sindaco".into(),
            tenant: Some("comune-di-pisa".into()),
            command: Box::new(Command::CreateCampaign {
                at_ms: 20,
                created_by: None,
                spec: CampaignSpec {
                    not_before_ms: None,
                    deadline_ms: None,
                    tenant: "comune-di-pisa".into(),
                    title: "Registrazione".into(),
                    message: Message::Recording {
                        sha256: "ab".repeat(32),
                    },
                    audience: Audience::All,
                    priority: Priority::Urgent,
                    require_confirmation: false,
                    retry: RetryPolicy::default_for(Priority::Urgent),
                },
            }),
        },
        Command::CreateCampaign {
            at_ms: 30,
            created_by: Some("sindaco".into()),
            spec: CampaignSpec {
                tenant: campanile_cluster::default_tenant(),
                not_before_ms: None,
                deadline_ms: None,
                title: "Allerta a tutta la città".into(),
                message: Message::Tts {
                    text: "Evacuare".into(),
                    language: "it".into(),
                },
                audience: Audience::All,
                priority: Priority::Emergency,
                require_confirmation: true,
                retry: RetryPolicy::default_for(Priority::Emergency),
            },
        },
        Command::ApproveCampaign {
            at_ms: 31,
            id: CampaignId(2),
            by: "vicesindaco".into(),
        },
        Command::OverrideApproval {
            at_ms: 32,
            id: CampaignId(2),
            by: "sindaco".into(),
            reason: "frana in corso, nessun altro raggiungibile".into(),
        },
        Command::CreateSession {
            at_ms: 33,
            session: Session {
                token_sha256: "5f".repeat(32),
                username: "sindaco".into(),
                created_ms: 33,
                expires_ms: 43_200_033,
            },
        },
        Command::EndSession {
            at_ms: 34,
            token_sha256: "5f".repeat(32),
        },
        Command::UpdateSubscriber {
            at_ms: 35,
            id: SubscriberId(1),
            update: SubscriberUpdate {
                name: Some("Maria Bianchi".into()),
                language: "en".into(),
                zone: None,
            },
        },
        Command::RequestVerification {
            at_ms: 36,
            id: SubscriberId(1),
            verification: Verification {
                code_sha256: "7a".repeat(32),
                expires_ms: 600_036,
                tries_left: VERIFICATION_TRIES,
                purpose: VerificationPurpose::Register,
            },
        },
        Command::ConfirmVerification {
            at_ms: 37,
            id: SubscriberId(1),
            code_sha256: "7a".repeat(32),
        },
        Command::RenewLeases {
            at_ms: 41,
            node: NodeId(2),
            lease_ms: 3_000,
            channels_in_use: Some(12),
            capacity: None,
        },
        Command::CloseExpired { at_ms: 43 },
        Command::SetCallerId {
            at_ms: 42,
            tenant: "default".into(),
            caller_id: Some(CallerId {
                number: "+390502211".into(),
                display_name: "Comune di Pisa".into(),
            }),
        },
        Command::SetQuietHours {
            at_ms: 46,
            tenant: "default".into(),
            quiet_hours: Some(QuietHours {
                start_minute: 22 * 60,
                end_minute: 7 * 60,
            }),
        },
        Command::RevokeToken {
            at_ms: 38,
            sha256: "9c".repeat(32),
        },
    ]
}

fn kind(c: &Command) -> &'static str {
    match c {
        Command::CreateSubscriber { .. } => "create_subscriber",
        Command::CreateSubscribers { .. } => "create_subscribers",
        Command::DeleteSubscriber { .. } => "delete_subscriber",
        Command::CreateCampaign { .. } => "create_campaign",
        Command::StartCampaign { .. } => "start_campaign",
        Command::CancelCampaign { .. } => "cancel_campaign",
        Command::PauseCampaign { .. } => "pause_campaign",
        Command::ResumeCampaign { .. } => "resume_campaign",
        Command::RecordAttempts { .. } => "record_attempts",
        Command::AddToken { .. } => "add_token",
        Command::RegisterNode { .. } => "register_node",
        Command::ReclaimTasks { .. } => "reclaim_tasks",
        Command::HandOverCalls { .. } => "hand_over_calls",
        Command::ForgetNode { .. } => "forget_node",
        Command::RenewLeases { .. } => "renew_leases",
        Command::AssignLeases { .. } => "assign_leases",
        Command::ReleaseLeases { .. } => "release_leases",
        Command::CreateTenant { .. } => "create_tenant",
        Command::CreateOperator { .. } => "create_operator",
        Command::UpdateOperator { .. } => "update_operator",
        Command::PutAudio { .. } => "put_audio",
        Command::ApproveCampaign { .. } => "approve_campaign",
        Command::OverrideApproval { .. } => "override_approval",
        Command::CreateSession { .. } => "create_session",
        Command::EndSession { .. } => "end_session",
        Command::CloseExpired { .. } => "close_expired",
        Command::SetCallerId { .. } => "set_caller_id",
        Command::SetQuietHours { .. } => "set_quiet_hours",
        Command::RevokeToken { .. } => "revoke_token",
        Command::UpdateSubscriber { .. } => "update_subscriber",
        Command::RequestVerification { .. } => "request_verification",
        Command::ConfirmVerification { .. } => "confirm_verification",
        Command::Audited { .. } => "audited",
    }
}

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/commands-v1.jsonl"
);

#[test]
fn every_logged_command_of_this_release_replays() {
    let text = std::fs::read_to_string(FIXTURE).unwrap_or_default();
    let mut seen = std::collections::BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let cmd: Command = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("fixture line {}: {e}\n{line}", n + 1));
        assert_eq!(
            serde_json::to_string(&cmd).unwrap(),
            line,
            "fixture line {} no longer writes back the same",
            n + 1
        );
        seen.insert(kind(&cmd));
    }
    // The library's kind is the tag the log carries.
    for c in one_of_each() {
        let tag = serde_json::to_value(&c).unwrap();
        let tag = tag.as_object().and_then(|o| o.keys().next()).unwrap();
        assert_eq!(c.kind(), tag);
        assert_eq!(c.kind(), kind(&c));
    }
    let missing: Vec<Command> = one_of_each()
        .into_iter()
        .filter(|c| !seen.contains(kind(c)))
        .collect();
    if !missing.is_empty() && std::env::var_os("CAMPANILE_APPEND_FIXTURE").is_some() {
        let mut out = text.clone();
        for c in &missing {
            out.push_str(&serde_json::to_string(c).unwrap());
            out.push('\n');
        }
        std::fs::write(FIXTURE, out).unwrap();
        return;
    }
    assert!(
        missing.is_empty(),
        "commands without a fixture line: {:?}; append them (see the module comment)",
        missing.iter().map(kind).collect::<Vec<_>>()
    );
}
