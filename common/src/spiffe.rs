//! SPIFFE IDs (`spiffe://trust-domain/path`) in canonical form, and Ewii's identity layout.
//!
//! Parsing follows the SPIFFE ID specification §2: the scheme and the trust domain are folded
//! to lower case (they are case-insensitive), the path is kept as written and must be made of
//! non-empty segments of `A-Z a-z 0-9 . - _` other than `.` and `..`. No port, user info, query
//! or fragment. Two IDs are equal exactly when their canonical strings are.
//!
//! Ewii's identities inside a trust domain:
//! - `/hub`: the Hub;
//! - `/client/<name>`: an enrolled Client;
//! - `/workload/<name>`: an operator workload that calls a Hub service over TLS.

use std::fmt;
use std::str::FromStr;

/// Why a string is not an acceptable SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeIdError {
    /// It does not start with `spiffe://`.
    #[error("not a spiffe:// URI")]
    Scheme,
    /// The trust domain is empty or has characters outside `a-z 0-9 . - _`.
    #[error("invalid trust domain")]
    TrustDomain,
    /// A path segment is empty, `.`, `..`, or has characters outside `A-Z a-z 0-9 . - _`.
    #[error("invalid path")]
    Path,
    /// Longer than 2048 bytes.
    #[error("SPIFFE ID longer than 2048 bytes")]
    TooLong,
}

/// A SPIFFE ID in canonical form.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    /// Empty, or starting with `/`.
    path: String,
}

/// What an ID stands for in Ewii.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// `/hub`
    Hub,
    /// `/client/<name>`
    Client(String),
    /// `/workload/<name>`
    Workload(String),
    /// Anything else in the trust domain: never accepted by Ewii.
    Other,
}

impl SpiffeId {
    /// Builds an ID from a trust domain and a path (`""` or `/…`).
    pub fn new(trust_domain: &str, path: &str) -> Result<Self, SpiffeIdError> {
        format!("spiffe://{trust_domain}{path}").parse()
    }

    /// The Hub's ID in `trust_domain`.
    pub fn hub(trust_domain: &str) -> Result<Self, SpiffeIdError> {
        Self::new(trust_domain, "/hub")
    }

    /// The ID of Client `name` in `trust_domain`.
    pub fn client(trust_domain: &str, name: &str) -> Result<Self, SpiffeIdError> {
        valid_name(name)?;
        Self::new(trust_domain, &format!("/client/{name}"))
    }

    /// The ID of operator workload `name` in `trust_domain`.
    pub fn workload(trust_domain: &str, name: &str) -> Result<Self, SpiffeIdError> {
        valid_name(name)?;
        Self::new(trust_domain, &format!("/workload/{name}"))
    }

    /// The trust domain, lower case.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The path, `""` or starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Ewii's reading of the path.
    pub fn role(&self) -> Role {
        let segments: Vec<&str> = self.path.split('/').skip(1).collect();
        match segments.as_slice() {
            ["hub"] => Role::Hub,
            ["client", name] if valid_name(name).is_ok() => Role::Client((*name).to_owned()),
            ["workload", name] if valid_name(name).is_ok() => Role::Workload((*name).to_owned()),
            _ => Role::Other,
        }
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, SpiffeIdError> {
        if s.len() > 2048 {
            return Err(SpiffeIdError::TooLong);
        }
        let scheme = s.get(..9).ok_or(SpiffeIdError::Scheme)?;
        if !scheme.eq_ignore_ascii_case("spiffe://") {
            return Err(SpiffeIdError::Scheme);
        }
        let rest = &s[9..];
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let td = td.to_ascii_lowercase();
        let td_ok = !td.is_empty()
            && td
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
        if !td_ok {
            return Err(SpiffeIdError::TrustDomain);
        }
        if !path.is_empty() {
            for seg in path[1..].split('/') {
                let ok = !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
                if !ok {
                    return Err(SpiffeIdError::Path);
                }
            }
        }
        Ok(Self {
            trust_domain: td,
            path: path.to_owned(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

/// Client and workload names: 1–63 characters of `a-z 0-9 - _ .`, starting with a letter or
/// digit — the same alphabet as allow-list entry names.
pub fn valid_name(name: &str) -> Result<(), SpiffeIdError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SpiffeIdError::Path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_comparison() {
        let a: SpiffeId = "SPIFFE://Example.ORG/client/acme".parse().unwrap();
        let b: SpiffeId = "spiffe://example.org/client/acme".parse().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "spiffe://example.org/client/acme");
        assert_eq!(a.role(), Role::Client("acme".into()));
        let c: SpiffeId = "spiffe://example.org/client/Acme".parse().unwrap();
        assert_ne!(a, c, "paths are case-sensitive");
        assert_eq!(c.role(), Role::Other, "client names are lower case");
    }

    #[test]
    fn refuses_malformed_ids() {
        for bad in [
            "https://example.org/hub",
            "spiffe://",
            "spiffe:///hub",
            "spiffe://exa mple.org/hub",
            "spiffe://example.org:443/hub",
            "spiffe://user@example.org/hub",
            "spiffe://example.org/hub/",
            "spiffe://example.org//hub",
            "spiffe://example.org/./hub",
            "spiffe://example.org/../hub",
            "spiffe://example.org/hub?x=1",
            "spiffe://example.org/hub#x",
            "spiffe://example.org/h%75b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn roles() {
        let hub = SpiffeId::hub("example.org").unwrap();
        assert_eq!(hub.to_string(), "spiffe://example.org/hub");
        assert_eq!(hub.role(), Role::Hub);
        let w = SpiffeId::workload("example.org", "billing").unwrap();
        assert_eq!(w.role(), Role::Workload("billing".into()));
        let odd: SpiffeId = "spiffe://example.org/client/acme/extra".parse().unwrap();
        assert_eq!(odd.role(), Role::Other);
        assert!(SpiffeId::client("example.org", "a/b").is_err());
    }
}
