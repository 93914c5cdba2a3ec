//! The Dialer: the only code in the Client that opens outbound TCP connections (P4).
//!
//! A destination arrives as an allow-list entry *name*. The name is looked up in the
//! install-time allow-list and nowhere else; a name that is not there is refused before any
//! socket exists. DNS names are resolved here, and every resolved address is checked again
//! (no wildcard, multicast or broadcast address is ever dialled).

use std::net::SocketAddr;
use std::time::Duration;

use ewii_common::policy::{AllowList, Decision, Host};
use tokio::net::TcpStream;

/// Why a destination was not connected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    /// The name is not in the allow-list; nothing was resolved or dialled.
    #[error("destination {0:?} is not in the allow-list")]
    NotAllowed(String),
    /// The entry's DNS name did not resolve to an acceptable address.
    #[error("cannot resolve {name}: {why}")]
    Resolve {
        /// Entry name.
        name: String,
        /// Resolver error or rejected addresses.
        why: String,
    },
    /// Every address of the entry refused or timed out.
    #[error("cannot connect to {name}: {why}")]
    Unreachable {
        /// Entry name.
        name: String,
        /// The last address tried.
        addr: SocketAddr,
        /// The last connect error.
        why: String,
    },
}

/// Opens TCP connections to allow-list entries, and only to them.
#[derive(Debug, Clone)]
pub struct Dialer {
    allow: AllowList,
    connect_timeout: Duration,
}

impl DialError {
    /// The address the dial tried last, when it got as far as a connect.
    pub fn address(&self) -> Option<SocketAddr> {
        match self {
            Self::Unreachable { addr, .. } => Some(*addr),
            _ => None,
        }
    }
}

impl Dialer {
    /// A dialer for `allow`.
    pub fn new(allow: AllowList, connect_timeout: Duration) -> Self {
        Self {
            allow,
            connect_timeout,
        }
    }

    /// The allow-list it enforces.
    pub fn allow_list(&self) -> &AllowList {
        &self.allow
    }

    /// Connects to entry `destination`; returns the stream and the address it reached.
    pub async fn dial(&self, destination: &str) -> Result<(TcpStream, SocketAddr), DialError> {
        let entry = match self.allow.decide(destination) {
            Decision::Allow(entry) => entry,
            Decision::Deny => return Err(DialError::NotAllowed(destination.to_owned())),
        };
        let name = entry.name.to_string();
        let addrs: Vec<SocketAddr> = match &entry.endpoint.host {
            Host::Ip(ip) => vec![SocketAddr::new(*ip, entry.endpoint.port)],
            Host::Dns(host) => {
                let resolved = tokio::net::lookup_host((host.as_str(), entry.endpoint.port))
                    .await
                    .map_err(|e| DialError::Resolve {
                        name: name.clone(),
                        why: e.to_string(),
                    })?;
                let mut refused = None;
                let ok: Vec<SocketAddr> = resolved
                    .filter_map(|a| match AllowList::check_resolved(host, a) {
                        Ok(a) => Some(a),
                        Err(e) => {
                            refused = Some(e);
                            None
                        }
                    })
                    .collect();
                if ok.is_empty() {
                    return Err(DialError::Resolve {
                        name,
                        why: refused.map_or_else(|| "no address".into(), |e| e.to_string()),
                    });
                }
                ok
            }
        };
        let mut last = None;
        for addr in addrs {
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    return Ok((stream, addr));
                }
                Ok(Err(e)) => last = Some((addr, format!("{addr}: {e}"))),
                Err(_) => last = Some((addr, format!("{addr}: connect timed out"))),
            }
        }
        // `addrs` is never empty here (an IP entry has one; a name with none returned above).
        let (addr, why) = last.unwrap_or_else(|| {
            (
                SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0),
                "no address".into(),
            )
        });
        Err(DialError::Unreachable { name, addr, why })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn p4_dials_only_allow_listed_names() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let allow = AllowList::from_pairs([("db", addr.as_str())]).unwrap();
        let dialer = Dialer::new(allow, Duration::from_secs(2));
        let (_s, reached) = dialer.dial("db").await.unwrap();
        assert_eq!(reached.to_string(), addr);
        assert!(listener.accept().await.is_ok());
        for other in ["DB", "db2", "", &addr, "127.0.0.1"] {
            assert_eq!(
                dialer.dial(other).await.unwrap_err(),
                DialError::NotAllowed(other.to_string())
            );
        }
        // No further connection reached the listener.
        let none = tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
        assert!(none.is_err(), "a refused name must not connect anywhere");
    }

    #[tokio::test]
    async fn closed_port_is_unreachable_not_a_panic() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let allow = AllowList::from_pairs([("db", addr.as_str())]).unwrap();
        let dialer = Dialer::new(allow, Duration::from_secs(2));
        assert!(matches!(
            dialer.dial("db").await,
            Err(DialError::Unreachable { .. })
        ));
    }
}
