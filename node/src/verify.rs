//! Verification calls: a citizen who registers on the public page (or asks to be erased) gets one
//! call that reads a six-digit code, to type on the page. The call is placed from the node that
//! served the page, through the same trunk and caller ID as alerts, outside the campaign dialer (one
//! call, no retries: the citizen asks for a new one from the page). The code itself never reaches a
//! log or the cluster — only its hash, bound to the tenant and the number, is committed.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::call::{place_call, CallContext, CallSpec};
use crate::dialer::DialerConfig;

/// How long a code may be typed after the call.
pub const CODE_TTL: Duration = Duration::from_secs(10 * 60);

/// Places verification calls.
pub struct Verifier {
    ctx: CallContext,
    cfg: DialerConfig,
}

/// A fresh six-digit code from the operating system's random source.
pub fn new_code() -> String {
    use rand::RngCore;
    let n = rand::rngs::OsRng.next_u32() % 1_000_000;
    format!("{n:06}")
}

impl Verifier {
    pub fn new(cfg: DialerConfig, ctx: CallContext) -> Arc<Verifier> {
        Arc::new(Verifier { ctx, cfg })
    }

    /// Calls `phone` and reads `code` in `language`, in the background; the outcome goes to the log
    /// (number masked, code never).
    /// `caller` is the tenant's own caller ID, when it has one.
    pub fn call(
        self: &Arc<Self>,
        phone: String,
        code: String,
        language: String,
        caller: Option<campanile_cluster::CallerId>,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            let masked = campanile_cluster::mask_number(&phone);
            let audio = match tokio::task::spawn_blocking(move || {
                crate::media::message::prepare_code_message(&code, &language)
            })
            .await
            {
                Ok(Ok(a)) => a,
                Ok(Err(e)) => {
                    tracing::error!(number = %masked, error = %e, "cannot prepare a verification call");
                    return;
                }
                Err(e) => {
                    tracing::error!(number = %masked, error = %e, "verification audio task failed");
                    return;
                }
            };
            let spec = CallSpec {
                to: phone,
                trunk: me.cfg.trunk,
                trunk_host: me.cfg.trunk_host.clone(),
                from_user: caller
                    .as_ref()
                    .map_or_else(|| me.cfg.from_user.clone(), |c| c.number.clone()),
                display_name: caller
                    .as_ref()
                    .map_or_else(|| me.cfg.display_name.clone(), |c| c.display_name.clone()),
                audio,
                ring_timeout: me.cfg.ring_timeout,
                confirm_wait: Duration::from_millis(500),
                require_confirmation: false,
                allow_opt_out: false,
                max_replays: 0,
                timers: me.cfg.timers,
                credentials: me.cfg.credentials.clone(),
                outbound_proxy: me.cfg.outbound_proxy.clone(),
                detect_machines: false,
                listen_for_keys: false,
                reinvite_after: None,
            };
            // Nothing aborts a verification call but its end.
            let (_keep, abort) = watch::channel(false);
            let outcome = place_call(&me.ctx, &spec, abort).await;
            tracing::info!(number = %masked, outcome = %outcome, "verification call ended");
        });
    }
}
