//! Alerts: one email when an incident starts, one when it ends, nothing in between; rate limited;
//! a failed send is retried later and never stops the daemon. Every email says what failed, what
//! caretaker did, what is safe, and the command to run next. Other parts of caretaker (supervise,
//! backups, updates) open and resolve incidents by a stable key.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::aws::ses::SesClient;
use crate::units::now_rfc3339;

/// What an alert says. Plain text; no secrets ever go in here.
#[derive(Debug, Clone)]
pub struct Alert {
    pub subject: String,
    pub what_failed: String,
    pub what_done: String,
    pub what_safe: String,
    pub next: String,
}

/// An open incident, as shown in status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Incident {
    pub key: String,
    pub subject: String,
    /// RFC 3339.
    pub since: String,
}

struct State {
    open: BTreeMap<String, Incident>,
    sent: VecDeque<Instant>,
    suppressed: u64,
}

/// Where emails go; `None` when `notify.sender` is unset (alerts are then only logged).
#[derive(Clone)]
pub struct Mailer {
    pub ses: SesClient,
    pub from: String,
    pub to: Vec<String>,
}

/// Whether the mailer is known yet: the daemon builds its alerts before anything can fail (so a
/// job that fails right after start still emails) and learns the mailer once the region and
/// credentials resolve; emails sent before then wait for it.
#[derive(Clone)]
enum MailerState {
    Pending,
    Ready(Option<Mailer>),
}

#[derive(Clone)]
pub struct Alerts {
    state: Arc<Mutex<State>>,
    mailer: Arc<tokio::sync::watch::Sender<MailerState>>,
    prefix: String,
    origin: String,
    max_per_hour: u32,
    retry: Duration,
}

impl Alerts {
    /// `origin` names the box in every email (instance id, host name).
    pub fn new(mailer: Option<Mailer>, prefix: &str, origin: &str, max_per_hour: u32) -> Self {
        Self::with_state(MailerState::Ready(mailer), prefix, origin, max_per_hour)
    }

    /// Alerts whose mailer is not known yet ([`Alerts::set_mailer`] gives it): incidents open
    /// and deduplicate at once, and their emails go out once the mailer is set.
    pub fn pending(prefix: &str, origin: &str, max_per_hour: u32) -> Self {
        Self::with_state(MailerState::Pending, prefix, origin, max_per_hour)
    }

    /// Gives pending alerts their mailer (`None`: emails are only logged); the emails waiting
    /// for it are sent now. Later calls replace it.
    pub fn set_mailer(&self, mailer: Option<Mailer>) {
        self.mailer.send_replace(MailerState::Ready(mailer));
    }

    fn with_state(mailer: MailerState, prefix: &str, origin: &str, max_per_hour: u32) -> Self {
        Alerts {
            state: Arc::new(Mutex::new(State { open: BTreeMap::new(), sent: VecDeque::new(), suppressed: 0 })),
            mailer: Arc::new(tokio::sync::watch::Sender::new(mailer)),
            prefix: prefix.to_string(),
            origin: origin.to_string(),
            max_per_hour,
            retry: Duration::from_secs(30),
        }
    }

    /// Shorter retry delay (tests).
    pub fn with_retry(mut self, retry: Duration) -> Self {
        self.retry = retry;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_open(&self, key: &str) -> bool {
        self.lock().open.contains_key(key)
    }

    pub fn incidents(&self) -> Vec<Incident> {
        self.lock().open.values().cloned().collect()
    }

    /// Opens incident `key` and emails once; a no-op while it is already open. Returns whether
    /// it was new.
    pub fn open(&self, key: &str, alert: Alert) -> bool {
        {
            let mut s = self.lock();
            if s.open.contains_key(key) {
                return false;
            }
            s.open
                .insert(key.into(), Incident { key: key.into(), subject: alert.subject.clone(), since: now_rfc3339() });
        }
        error!(incident = key, "{}: {}", alert.subject, alert.what_failed);
        let body = format!(
            "{}\n\nWhat failed:\n  {}\n\nWhat caretaker did:\n  {}\n\nWhat is safe:\n  {}\n\nWhat to run next:\n  {}\n\n-- \ncaretaker on {} · incident {} · {}\nYou get one email when this starts and one when it ends.\n",
            alert.subject,
            alert.what_failed,
            alert.what_done,
            alert.what_safe,
            alert.next,
            self.origin,
            key,
            now_rfc3339()
        );
        self.send(format!("{} {}: {}", self.prefix, self.origin, alert.subject), body);
        true
    }

    /// A one-off report (not an incident: nothing to resolve), e.g. what a restore at boot did.
    pub fn report(&self, subject: &str, body: &str) {
        info!("report: {subject}");
        let body = format!("{body}\n\n-- \ncaretaker on {} · {}\n", self.origin, now_rfc3339());
        self.send(format!("{} {}: {subject}", self.prefix, self.origin), body);
    }

    /// Closes incident `key` with a recovery email; a no-op when it is not open.
    pub fn resolve(&self, key: &str, what: &str) -> bool {
        let Some(incident) = self.lock().open.remove(key) else { return false };
        info!(incident = key, "resolved: {what}");
        let body = format!(
            "Resolved: {}\n\n{}\n\nThe incident was open since {}.\n\n-- \ncaretaker on {} · incident {} · {}\n",
            incident.subject,
            what,
            incident.since,
            self.origin,
            key,
            now_rfc3339()
        );
        self.send(format!("{} {}: resolved: {}", self.prefix, self.origin, incident.subject), body);
        true
    }

    fn send(&self, subject: String, body: String) {
        if let MailerState::Ready(None) = &*self.mailer.borrow() {
            info!("no notify.sender configured: alert logged only");
            return;
        }
        {
            let mut s = self.lock();
            let hour_ago = Instant::now().checked_sub(Duration::from_secs(3600));
            while let (Some(first), Some(h)) = (s.sent.front(), hour_ago) {
                if *first < h {
                    s.sent.pop_front();
                } else {
                    break;
                }
            }
            if s.sent.len() as u32 >= self.max_per_hour {
                s.suppressed += 1;
                warn!(subject, "email rate limit ({} per hour) reached: not sending", self.max_per_hour);
                return;
            }
            s.sent.push_back(Instant::now());
        }
        let retry = self.retry;
        let mut mailer = self.mailer.subscribe();
        tokio::spawn(async move {
            let mailer = match mailer.wait_for(|m| matches!(m, MailerState::Ready(_))).await.map(|m| m.clone()) {
                Ok(MailerState::Ready(Some(mailer))) => mailer,
                Ok(_) => {
                    info!(subject, "no notify.sender configured: alert logged only");
                    return;
                }
                Err(_) => return,
            };
            let mut delay = retry;
            for attempt in 1..=8 {
                match mailer.ses.send(&mailer.from, &mailer.to, &subject, &body).await {
                    Ok(id) => {
                        info!(subject, message_id = %id, "alert email sent");
                        return;
                    }
                    Err(e) => {
                        warn!(subject, attempt, "could not send the alert email, retrying in {delay:?}: {e}");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(3600));
                    }
                }
            }
            error!(subject, "gave up sending the alert email after 8 attempts");
        });
    }
}
