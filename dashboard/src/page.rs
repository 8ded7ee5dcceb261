//! The minimal console page: campaigns and their progress, and a loud banner in drill mode. Every
//! value is HTML-escaped; the full operator console is a later issue.

use axum::extract::State;
use axum::response::Html;
use campanile_cluster::CampaignState;

use crate::api::AppState;

/// Escapes text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:0;color:#1a1a1a;background:#f6f7f9}\
header{background:#0b3d91;color:#fff;padding:1rem 2rem}h1{margin:0;font-size:1.4rem}\
main{padding:1.5rem 2rem;max-width:70rem}.drill{background:#ffd400;color:#000;font-weight:700;padding:.8rem 2rem;border-bottom:3px solid #000}\
table{border-collapse:collapse;width:100%;background:#fff}th,td{text-align:left;padding:.5rem .7rem;border-bottom:1px solid #dde}\
.bar{background:#e3e6ea;border-radius:4px;height:.9rem;width:12rem}.bar>div{background:#1f7a3a;height:100%;border-radius:4px}\
.state-running{color:#b35c00;font-weight:600}.state-completed{color:#1f7a3a}.state-cancelled{color:#777}";

/// `GET /`: the campaign list.
pub async fn index(State(engine): State<AppState>) -> Html<String> {
    let mut rows = String::new();
    match engine.campaigns().await {
        Ok(mut list) => {
            list.sort_by_key(|c| std::cmp::Reverse(c.id));
            for c in &list {
                let k = c.counts;
                let pct = if k.targeted == 0 {
                    0.0
                } else {
                    100.0 * k.confirmed as f64 / k.targeted as f64
                };
                rows.push_str(&format!(
                    "<tr><td>{id}</td><td>{title}</td><td>{prio}</td><td class=\"state-{state}\">{state}</td>\
                     <td><div class=\"bar\" role=\"progressbar\" aria-valuenow=\"{pct:.0}\" aria-valuemin=\"0\" aria-valuemax=\"100\" \
                     aria-label=\"confirmed\"><div style=\"width:{pct:.1}%\"></div></div></td>\
                     <td>{conf} / {tgt} confirmed</td><td>{inflight} ringing · {pending} to retry · {exh} unreached · {inv} invalid</td></tr>",
                    id = c.id.0,
                    title = escape(&c.spec.title),
                    prio = c.spec.priority.as_str(),
                    state = c.state.as_str(),
                    conf = k.confirmed,
                    tgt = k.targeted,
                    inflight = k.in_flight,
                    pending = k.pending,
                    exh = k.exhausted,
                    inv = k.invalid,
                ));
            }
            if list.is_empty() {
                rows.push_str("<tr><td colspan=\"7\">No campaigns yet.</td></tr>");
            }
            let running = list.iter().any(|c| c.state == CampaignState::Running);
            return Html(render(engine.drill_mode(), &rows, running));
        }
        Err(e) => rows.push_str(&format!(
            "<tr><td colspan=\"7\">Cannot list campaigns: {}</td></tr>",
            escape(&e.to_string())
        )),
    }
    Html(render(engine.drill_mode(), &rows, false))
}

fn render(drill: Option<String>, rows: &str, refresh: bool) -> String {
    let banner = drill
        .map(|d| {
            format!(
                "<div class=\"drill\" role=\"alert\">DRILL MODE — {}</div>",
                escape(&d)
            )
        })
        .unwrap_or_default();
    let refresh = if refresh {
        "<meta http-equiv=\"refresh\" content=\"5\">"
    } else {
        ""
    };
    format!(
        "<!doctype html><html lang=\"it\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         {refresh}<title>Campanile</title><style>{STYLE}</style></head><body>{banner}<header><h1>Campanile — allerte vocali</h1></header>\
         <main><h2>Campaigns</h2><table><thead><tr><th>#</th><th>Title</th><th>Priority</th><th>State</th><th>Progress</th>\
         <th>Confirmed</th><th>Calls</th></tr></thead><tbody>{rows}</tbody></table></main></body></html>"
    )
}
