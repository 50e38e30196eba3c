//! Logging: structured journald entries when stderr is connected to the journal (`JOURNAL_STREAM`
//! set, as systemd does for services), human-readable lines on stderr otherwise. The level comes
//! from `CARETAKER_LOG` (an env-filter directive) or, failing that, the configuration, and can be
//! changed on reload.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::LogLevel;

/// Changes the level after start (config reload). A no-op when `CARETAKER_LOG` pins it.
pub struct LevelHandle {
    handle: Option<reload::Handle<EnvFilter, Registry>>,
}

impl LevelHandle {
    pub fn set(&self, level: LogLevel) {
        if let Some(h) = &self.handle
            && let Err(e) = h.reload(filter_for(level))
        {
            tracing::warn!("could not change the log level: {e}");
        }
    }
}

fn filter_for(level: LogLevel) -> EnvFilter {
    // Our own crate at the chosen level; the chatty libraries one step quieter unless asked.
    let deps = match level {
        LogLevel::Trace | LogLevel::Debug => "info",
        _ => "warn",
    };
    EnvFilter::new(format!("{deps},caretaker={}", level.as_str()))
}

/// Installs the global subscriber. Safe to call once per process.
pub fn init(level: LogLevel) -> LevelHandle {
    let (filter, pinned) = match std::env::var("CARETAKER_LOG") {
        Ok(directive) if !directive.trim().is_empty() => (EnvFilter::new(directive), true),
        _ => (filter_for(level), false),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let journald = if std::env::var_os("JOURNAL_STREAM").is_some() {
        tracing_journald::layer().ok().map(|l| l.with_syslog_identifier("caretaker".into()))
    } else {
        None
    };
    let fmt = if journald.is_none() {
        Some(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false).boxed())
    } else {
        None
    };
    let _ = tracing_subscriber::registry().with(filter).with(journald).with(fmt).try_init();
    LevelHandle { handle: if pinned { None } else { Some(handle) } }
}
