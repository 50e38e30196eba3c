//! The one answer to "which AWS region?": `aws.region` when configured, else what this instance
//! said about itself (the instance.env firstboot wrote, or IMDS). Every client is built with it.

use std::fmt;

use crate::config::AwsConfig;

/// Where a region came from (said in logs and by `caretaker doctor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionSource {
    Config,
    InstanceEnv,
    Imds,
}

impl fmt::Display for RegionSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RegionSource::Config => "aws.region",
            RegionSource::InstanceEnv => "from /run/caretaker/instance.env",
            RegionSource::Imds => "from IMDS",
        })
    }
}

/// A region and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub name: String,
    pub source: RegionSource,
}

/// No region anywhere.
#[derive(Debug, thiserror::Error)]
#[error("no AWS region: set aws.region (or run caretaker firstboot){}", imds.as_deref().map(|e| format!("; IMDS: {e}")).unwrap_or_default())]
pub struct NoRegion {
    /// Why IMDS did not say, when it was asked.
    pub imds: Option<String>,
}

/// The rule: the configured region wins; else the first of `found`, in order, that names one.
pub fn pick(
    configured: Option<&str>,
    found: impl IntoIterator<Item = (RegionSource, Option<String>)>,
) -> Option<Region> {
    if let Some(r) = configured {
        return Some(Region { name: r.to_string(), source: RegionSource::Config });
    }
    found.into_iter().find_map(|(source, r)| r.filter(|r| !r.is_empty()).map(|name| Region { name, source }))
}

/// The region without asking the network: `aws.region`, else instance.env.
pub fn local(aws: &AwsConfig) -> Result<Region, NoRegion> {
    pick(aws.region.as_deref(), [(RegionSource::InstanceEnv, crate::envfile::instance_var("REGION"))])
        .ok_or(NoRegion { imds: None })
}

/// The region, asking IMDS (within `aws.imds-deadline`) only when nothing local names it.
pub async fn resolve(aws: &AwsConfig) -> Result<Region, NoRegion> {
    if let Ok(r) = local(aws) {
        return Ok(r);
    }
    let imds = super::imds::ImdsClient::new(&aws.imds_endpoint, aws.imds_deadline.get());
    match imds.identity_document().await {
        Ok(doc) => Ok(Region { name: doc.region, source: RegionSource::Imds }),
        Err(e) => Err(NoRegion { imds: Some(e.to_string()) }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configured_region_wins_then_the_first_found() {
        let found = || [(RegionSource::Imds, None), (RegionSource::InstanceEnv, Some("eu-west-1".to_string()))];
        assert_eq!(pick(Some("us-east-2"), found()).unwrap().source, RegionSource::Config);
        let r = pick(None, found()).unwrap();
        assert_eq!((r.name.as_str(), r.source), ("eu-west-1", RegionSource::InstanceEnv));
        assert!(pick(None, [(RegionSource::Imds, Some(String::new()))]).is_none());
    }
}
