//! Maintenance holds: while a job deliberately stops or restarts a unit (an update restarts the
//! API, a restore stops it), the supervisor must neither restart it behind the job's back nor
//! count its downtime as an incident. A job takes a [`Hold`] on the unit; the unit's watch keeps
//! probing (status stays truthful) but does not act until the hold is dropped.
//!
//! Holds are process-wide: there is one daemon per process and one mutating job at a time.

use std::collections::BTreeMap;
use std::sync::Mutex;

static HOLDS: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());

/// Released on drop (also when the job's future is cancelled or panics).
#[must_use = "the hold ends when this is dropped"]
#[derive(Debug)]
pub struct Hold {
    unit: String,
}

/// Pauses supervision of `unit` until the returned hold is dropped; `reason` shows in status.
pub fn hold(unit: &str, reason: &str) -> Hold {
    HOLDS.lock().unwrap_or_else(|p| p.into_inner()).insert(unit.to_string(), reason.to_string());
    tracing::info!(unit, "supervision of {unit} paused: {reason}");
    Hold { unit: unit.to_string() }
}

/// Why `unit` is held, if it is.
pub fn held(unit: &str) -> Option<String> {
    HOLDS.lock().unwrap_or_else(|p| p.into_inner()).get(unit).cloned()
}

impl Drop for Hold {
    fn drop(&mut self) {
        HOLDS.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.unit);
        tracing::info!(unit = %self.unit, "supervision of {} resumed", self.unit);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_hold_lasts_until_dropped() {
        assert_eq!(super::held("maint-test.service"), None);
        let h = super::hold("maint-test.service", "update to v2");
        assert_eq!(super::held("maint-test.service").as_deref(), Some("update to v2"));
        drop(h);
        assert_eq!(super::held("maint-test.service"), None);
    }
}
