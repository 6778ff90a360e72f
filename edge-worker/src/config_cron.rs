//! The Cron Trigger: fetch the configuration document from `CONFIG_URL`, validate it whole with
//! [`WorkerConfig::parse`], and write it to KV when it changed. A document that does not parse
//! or compile is refused and logged: KV keeps the last good one. Workers KV allows one write per
//! second per key and is eventually consistent (up to ~60 s across locations), which is why it
//! holds configuration only, never counters.

use worker::{console_error, console_log, event, Env, Fetch, ScheduleContext, ScheduledEvent};

use crate::config::{WorkerConfig, CONFIG_KEY};
use crate::runtime::CONFIG_KV;

#[event(scheduled)]
async fn scheduled(_event: ScheduledEvent, env: Env, _ctx: ScheduleContext) {
    match refresh(&env).await {
        Ok(message) => console_log!("tollgate: config refresh: {message}"),
        Err(message) => console_error!("tollgate: config refresh: {message}"),
    }
}

/// One refresh; the message says what happened.
pub async fn refresh(env: &Env) -> Result<String, String> {
    let url = env
        .var("CONFIG_URL")
        .map(|v| v.to_string())
        .map_err(|_| "CONFIG_URL is not set".to_string())?;
    let parsed = worker::Url::parse(&url).map_err(|e| format!("CONFIG_URL: {e}"))?;
    let mut response = Fetch::Url(parsed)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if response.status_code() != 200 {
        return Err(format!("GET {url}: status {}", response.status_code()));
    }
    let text = response
        .text()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    WorkerConfig::parse(&text).map_err(|e| format!("refused, keeping the last good one: {e}"))?;
    let kv = env.kv(CONFIG_KV).map_err(|e| e.to_string())?;
    let current = kv.get(CONFIG_KEY).text().await.map_err(|e| e.to_string())?;
    if current.as_deref() == Some(text.as_str()) {
        return Ok("unchanged".into());
    }
    kv.put(CONFIG_KEY, text)
        .map_err(|e| e.to_string())?
        .execute()
        .await
        .map_err(|e| e.to_string())?;
    Ok("stored a new document".into())
}
