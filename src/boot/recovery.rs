//! Recovery at boot: the decision, before any data service starts, whether a blank data volume
//! gets the newest backup or an empty cluster. Safety rule 11: a blank volume never gets an empty
//! database while a restorable backup might exist and S3 cannot be read. The decision only reads
//! local facts; S3 is read only once it says [`Verdict::LookForBackups`] (a volume with data, or
//! one not formatted by this boot, is never even compared with S3).

use std::path::Path;

use serde::Serialize;

use super::volume::Marker;
use crate::config::OnBlankVolume;

/// What firstboot knows about the volume and the data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// The marker says this very boot formatted the volume.
    pub formatted_this_boot: bool,
    /// The marker's record of whether a cluster was ever on it (`None`: unknown, an older marker).
    pub held_cluster: Option<bool>,
    /// The PostgreSQL data directory is missing or empty.
    pub data_dir_empty: bool,
    /// A backup bucket is configured.
    pub bucket: bool,
}

impl Facts {
    pub fn read(marker: Option<&Marker>, boot_id: &str, data_dir: &Path, bucket: bool) -> Facts {
        let formatted_this_boot =
            !boot_id.is_empty() && marker.and_then(|m| m.formatted_boot.as_deref()) == Some(boot_id);
        let data_dir_empty = match std::fs::read_dir(data_dir) {
            Ok(mut d) => d.next().is_none(),
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        };
        Facts { formatted_this_boot, held_cluster: marker.and_then(|m| m.held_cluster), data_dir_empty, bucket }
    }
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", content = "why", rename_all = "kebab-case")]
pub enum Verdict {
    /// Today's path: the data as it is (initdb only into an empty directory).
    StartNormally(String),
    /// A blank volume: ask S3 for the newest restorable state.
    LookForBackups(String),
    /// A blank volume and `on-blank-volume = "refuse"`: nothing starts.
    Refuse(String),
}

/// The decision table (README: Recovery at boot).
pub fn decide(setting: OnBlankVolume, f: &Facts) -> Verdict {
    if !f.data_dir_empty {
        return Verdict::StartNormally("the PostgreSQL data directory holds data: it is used as it is".into());
    }
    let blank = f.formatted_this_boot || f.held_cluster == Some(false);
    if !blank {
        return Verdict::StartNormally(match f.held_cluster {
            Some(true) => "the volume held a cluster before (its marker says so): never restored over; an empty \
                           data directory is initialised as before"
                .into(),
            _ => "the volume was not formatted by this boot and its marker does not say it never held a cluster: \
                  never restored over"
                .into(),
        });
    }
    match (setting, f.bucket) {
        (OnBlankVolume::Empty, _) => {
            Verdict::StartNormally("a blank volume, and recovery.on-blank-volume = \"empty\": an empty cluster".into())
        }
        (OnBlankVolume::Refuse, _) => Verdict::Refuse(
            "a blank volume, and recovery.on-blank-volume = \"refuse\": nothing is started. Restore by hand, or \
             set on-blank-volume to \"restore-latest\" or \"empty\" and `systemctl restart caretaker-firstboot`"
                .into(),
        ),
        (OnBlankVolume::RestoreLatest, false) => {
            Verdict::StartNormally("a blank volume, and no backup bucket is configured: an empty cluster".into())
        }
        (OnBlankVolume::RestoreLatest, true) => Verdict::LookForBackups(
            "a blank volume (formatted by this boot, or never holding a cluster) and a backup bucket: restoring the \
             newest backup before anything starts"
                .into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(formatted_this_boot: bool, held_cluster: Option<bool>, data_dir_empty: bool, bucket: bool) -> Facts {
        Facts { formatted_this_boot, held_cluster, data_dir_empty, bucket }
    }

    fn kind(v: &Verdict) -> &'static str {
        match v {
            Verdict::StartNormally(_) => "normal",
            Verdict::LookForBackups(_) => "look",
            Verdict::Refuse(_) => "refuse",
        }
    }

    #[test]
    fn only_a_blank_volume_with_an_empty_data_directory_ever_looks_at_s3() {
        use OnBlankVolume::*;
        // (formatted this boot, held a cluster, data dir empty, bucket) × setting → verdict
        let table = [
            // A fresh volume: the setting decides.
            ((true, Some(false), true, true), RestoreLatest, "look"),
            ((true, Some(false), true, true), Empty, "normal"),
            ((true, Some(false), true, true), Refuse, "refuse"),
            ((true, Some(false), true, false), RestoreLatest, "normal"),
            // Formatted on an earlier boot whose restore never finished: still blank.
            ((false, Some(false), true, true), RestoreLatest, "look"),
            // Data in the directory: never, whatever the marker says.
            ((true, Some(false), false, true), RestoreLatest, "normal"),
            ((false, Some(false), false, true), Refuse, "normal"),
            // A volume that held a cluster, or an old marker that does not say: never restored over.
            ((false, Some(true), true, true), RestoreLatest, "normal"),
            ((false, None, true, true), RestoreLatest, "normal"),
            ((false, None, true, true), Refuse, "normal"),
        ];
        for ((f, h, e, b), setting, want) in table {
            let v = decide(setting, &facts(f, h, e, b));
            assert_eq!(kind(&v), want, "{:?} {setting:?} → {v:?}", (f, h, e, b));
        }
    }

    #[test]
    fn facts_come_from_the_marker_the_boot_id_and_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let m = Marker {
            schema: 1,
            volume_id: None,
            filesystem_uuid: "u".into(),
            first_formatted_at: "t".into(),
            instances: vec![],
            formatted_boot: Some("boot-a".into()),
            held_cluster: Some(false),
        };
        let missing = dir.path().join("postgres");
        assert_eq!(Facts::read(Some(&m), "boot-a", &missing, true), facts(true, Some(false), true, true));
        assert!(!Facts::read(Some(&m), "boot-b", &missing, true).formatted_this_boot);
        assert!(!Facts::read(Some(&m), "", &missing, true).formatted_this_boot, "an unreadable boot id is no match");
        std::fs::create_dir(&missing).unwrap();
        assert!(Facts::read(Some(&m), "boot-a", &missing, true).data_dir_empty);
        std::fs::write(missing.join("PG_VERSION"), "16").unwrap();
        assert!(!Facts::read(Some(&m), "boot-a", &missing, true).data_dir_empty);
        assert_eq!(Facts::read(None, "boot-a", &missing, false).held_cluster, None);
    }
}
