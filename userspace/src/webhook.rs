//! Signed webhooks (Standard Webhooks, <https://www.standardwebhooks.com>): the Hub tells a
//! customer that its Client was revoked.
//!
//! Signatures are asymmetric (`v1a`, Ed25519), so the customer holds only a public key
//! (`whpk_…`) and no shared secret. The signed content is `{webhook-id}.{webhook-timestamp}.{body}`;
//! the `webhook-signature` header is `v1a,<base64 signature>` (several may be given,
//! space-separated, during a key rotation).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::identity::{store, IdentityError};

/// Default tolerance for `webhook-timestamp`, seconds either way (the spec's recommendation).
pub const TOLERANCE_SECS: i64 = 300;

/// Why a delivery does not verify, or a target is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WebhookError {
    /// The public key is not `whpk_` + base64 of 32 bytes.
    #[error("public key must be whpk_<base64 of 32 bytes>")]
    BadKey,
    /// The timestamp header is not an integer.
    #[error("webhook-timestamp is not a Unix time in seconds")]
    BadTimestamp,
    /// The timestamp is outside the tolerance window (a replay, or a badly skewed clock).
    #[error("webhook-timestamp is {0} s away from now (tolerance {TOLERANCE_SECS} s)")]
    Stale(i64),
    /// No `v1a` signature in the header verifies.
    #[error("no v1a signature verifies over this id, timestamp and body")]
    BadSignature,
    /// The URL is not http(s) with a host.
    #[error("webhook URL {0:?} is not an http(s) URL with a host")]
    BadUrl(String),
    /// The target resolves to loopback, link-local, unspecified or multicast.
    #[error(
        "webhook target {0} is not a public address (refused unless danger_allow_private_targets)"
    )]
    PrivateTarget(IpAddr),
    /// The target is an address of the Hub's own host: a delivery would reach the Hub's own
    /// listeners (its service listeners: another customer's destinations) from inside, past any
    /// firewall in front of them.
    #[error(
        "webhook target {0} is an address of the Hub's own host (refused unless danger_allow_private_targets)"
    )]
    OwnAddress(IpAddr),
    /// The host did not resolve.
    #[error("webhook host {0} does not resolve")]
    Resolve(String),
    /// A delivery with this id was verified before (a retry already handled, or a replay).
    #[error("delivery {0:?} was verified before (a retry already handled, or a replay)")]
    Seen(String),
    /// The file of verified ids could not be read or written.
    #[error("{0}")]
    SeenFile(String),
    /// A genuine delivery, about a Client that is not one of the receiver's: the Hub signs
    /// every customer's notices with one key, so another customer could pass one of its own on.
    #[error("the delivery is about {0}, which is not one of this receiver's Clients")]
    NotOurs(String),
}

/// Checks that a verified delivery's body is about one of `clients` (SPIFFE IDs): its
/// `data.client`. With none given, any.
pub fn check_client(body: &[u8], clients: &[String]) -> Result<(), WebhookError> {
    if clients.is_empty() {
        return Ok(());
    }
    let about = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["data"]["client"].as_str().map(str::to_owned));
    match about {
        Some(id) if clients.contains(&id) => Ok(()),
        Some(id) => Err(WebhookError::NotOurs(ewii_common::text::from_peer(
            id.as_bytes(),
        ))),
        None => Err(WebhookError::NotOurs("no client".into())),
    }
}

/// Records `id` as verified in the file at `path` (one `<unix seconds> <id>` line each), unless
/// it is there already: then [`WebhookError::Seen`]. Lines older than twice the timestamp
/// tolerance are dropped (a delivery that old fails the timestamp check anyway), so the file
/// stays small. An exclusive lock on `<path>.lock` serialises concurrent verifications, and
/// the file is replaced whole (written aside, then renamed): a crash never leaves it emptied.
pub fn check_and_record_seen(path: &Path, id: &str, now_secs: i64) -> Result<(), WebhookError> {
    let io = |e: std::io::Error| WebhookError::SeenFile(format!("{}: {e}", path.display()));
    if id.is_empty() || id.chars().any(char::is_whitespace) {
        return Err(WebhookError::SeenFile(format!(
            "webhook-id {id:?} is not one word"
        )));
    }
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(io)?;
    lock.lock().map_err(io)?;
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io(e)),
    };
    let horizon = now_secs.saturating_sub(2 * TOLERANCE_SECS);
    let mut kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.split_once(' ')
                .and_then(|(t, _)| t.parse::<i64>().ok())
                .is_some_and(|t| t >= horizon)
        })
        .collect();
    if kept
        .iter()
        .any(|l| l.split_once(' ').map(|(_, i)| i) == Some(id))
    {
        return Err(WebhookError::Seen(id.to_owned()));
    }
    let line = format!("{now_secs} {id}");
    kept.push(&line);
    store::write_durable(path, (kept.join("\n") + "\n").as_bytes(), 0o644)
        .map_err(|e| WebhookError::SeenFile(e.to_string()))
}

/// The Hub's webhook signing key (Ed25519), kept as `webhook.key` (0600) in its state dir.
pub struct WebhookKey(SigningKey);

impl std::fmt::Debug for WebhookKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("WebhookKey").field(&self.public()).finish()
    }
}

/// File name of the signing key inside the Hub state directory.
pub const KEY_FILE: &str = "webhook.key";

impl WebhookKey {
    /// Loads `webhook.key` from `dir`, creating it on first use. Two processes that create it
    /// at once (a Hub starting beside `ewii-hub token --webhook`, as a provisioning script may
    /// run them) end with the same key: each writes its own aside and links it into place,
    /// which only the first link does; the other reads that one. Otherwise each kept a key of
    /// its own, and a customer configured with the command's could not verify the running
    /// Hub's deliveries.
    pub fn load_or_create(dir: &Path) -> Result<Self, IdentityError> {
        let path = dir.join(KEY_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let seed = text
                    .trim()
                    .strip_prefix("whsk_")
                    .and_then(|b| B64.decode(b).ok())
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .ok_or_else(|| IdentityError::Pem(path.clone()))?;
                Ok(Self(SigningKey::from_bytes(&seed)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
                let text = format!("whsk_{}\n", B64.encode(key.to_bytes()));
                let aside = dir.join(format!(
                    ".{KEY_FILE}.{}.{:08x}",
                    std::process::id(),
                    rand::random::<u32>()
                ));
                store::write_file(&aside, text.as_bytes(), 0o600)?;
                let placed = match std::fs::hard_link(&aside, &path) {
                    Ok(()) => {
                        let _ = std::fs::remove_file(&aside);
                        Ok(())
                    }
                    // Another process made it first: theirs is the key.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        let _ = std::fs::remove_file(&aside);
                        return Self::load_or_create(dir);
                    }
                    // A file system without hard links: moved into place, as before (the
                    // race above stays possible there).
                    Err(_) => std::fs::rename(&aside, &path).inspect_err(|_| {
                        let _ = std::fs::remove_file(&aside);
                    }),
                };
                placed
                    .and_then(|()| std::fs::File::open(dir)?.sync_all())
                    .map_err(|source| IdentityError::Io { path, source })?;
                Ok(Self(key))
            }
            Err(source) => Err(IdentityError::Io { path, source }),
        }
    }

    /// The public key as the customer configures it: `whpk_<base64>`.
    pub fn public(&self) -> String {
        format!("whpk_{}", B64.encode(self.0.verifying_key().to_bytes()))
    }

    /// The `webhook-signature` header value for this delivery.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let sig = self.0.sign(&signed_content(id, timestamp, body));
        format!("v1a,{}", B64.encode(sig.to_bytes()))
    }
}

fn signed_content(id: &str, timestamp: impl std::fmt::Display, body: &[u8]) -> Vec<u8> {
    let mut msg = format!("{id}.{timestamp}.").into_bytes();
    msg.extend_from_slice(body);
    msg
}

/// Verifies a received delivery, as a customer does.
pub fn verify(
    public_key: &str,
    id: &str,
    timestamp: &str,
    signature_header: &str,
    body: &[u8],
    now_secs: i64,
) -> Result<(), WebhookError> {
    let key = public_key
        .strip_prefix("whpk_")
        .and_then(|b| B64.decode(b).ok())
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .and_then(|b| VerifyingKey::from_bytes(&b).ok())
        .ok_or(WebhookError::BadKey)?;
    // Canonical decimal only (no sign, spaces or leading zeros): the signed content is built
    // from the number, so another spelling of it must not verify.
    let ts: i64 = timestamp
        .parse()
        .ok()
        .filter(|ts: &i64| ts.to_string() == timestamp)
        .ok_or(WebhookError::BadTimestamp)?;
    let skew = now_secs.saturating_sub(ts);
    if skew.unsigned_abs() > TOLERANCE_SECS.unsigned_abs() {
        return Err(WebhookError::Stale(skew));
    }
    let content = signed_content(id, ts, body);
    let ok = signature_header.split_whitespace().any(|part| {
        part.strip_prefix("v1a,")
            .and_then(|b| B64.decode(b).ok())
            .and_then(|b| Signature::from_slice(&b).ok())
            // Strict: no small-order keys, no malleable signatures (RFC 8032 §5.1.7).
            .is_some_and(|sig| key.verify_strict(&content, &sig).is_ok())
    });
    if ok {
        Ok(())
    } else {
        Err(WebhookError::BadSignature)
    }
}

/// Resolves the URL's host and checks every address; returns the host and the address to pin
/// the connection to (so DNS cannot change between the check and the request).
pub async fn check_target(
    url: &str,
    allow_private: bool,
) -> Result<(String, SocketAddr), WebhookError> {
    let parsed = reqwest::Url::parse(url).map_err(|_| WebhookError::BadUrl(redacted(url)))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(WebhookError::BadUrl(redacted(url)));
    }
    let host = parsed
        .host_str()
        .ok_or_else(|| WebhookError::BadUrl(redacted(url)))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = parsed.port_or_known_default().unwrap_or(443);
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|_| WebhookError::Resolve(host.clone()))?
        .collect();
    let first = *addrs
        .first()
        .ok_or_else(|| WebhookError::Resolve(host.clone()))?;
    if !allow_private {
        if let Some(bad) = addrs.iter().map(|a| a.ip()).find(|ip| !is_public(*ip)) {
            return Err(WebhookError::PrivateTarget(bad));
        }
        if let Some(own) = addrs.iter().map(|a| a.ip()).find(|ip| is_this_hosts(*ip)) {
            return Err(WebhookError::OwnAddress(own));
        }
    }
    Ok((host, first))
}

/// Whether `ip` is an address of this host (a public address on one of its interfaces): a
/// socket can be bound to it. Where the kernel lets a socket bind any address
/// (`net.ipv4.ip_nonlocal_bind`), an address no host has (documentation ranges) binds too;
/// then this cannot tell, and says no.
fn is_this_hosts(ip: IpAddr) -> bool {
    let binds = |ip: IpAddr| std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok();
    let nowhere: IpAddr = match ip {
        IpAddr::V4(_) => std::net::Ipv4Addr::new(192, 0, 2, 1).into(),
        IpAddr::V6(_) => std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).into(),
    };
    binds(ip) && !binds(nowhere)
}

/// `url` as the Hub shows it (command output, audit records, logs): without the user name,
/// password, query and fragment, which can hold a secret (`https://user:pass@…`,
/// `…?token=…`); each part left out is marked `…`. The path is kept: it names the endpoint.
pub fn redacted(url: &str) -> String {
    let Ok(mut u) = reqwest::Url::parse(url) else {
        return "(not a URL)".to_owned();
    };
    let userinfo = !u.username().is_empty() || u.password().is_some();
    let query = u.query().is_some() || u.fragment().is_some();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.set_fragment(None);
    let mut shown = u.to_string();
    if userinfo {
        if let Some(at) = shown.find("://") {
            shown.insert_str(at + 3, "…@");
        }
    }
    if query {
        shown.push_str("?…");
    }
    shown
}

/// Refuses a webhook URL that is not http(s), or whose host is an IP literal that
/// [`is_public`] refuses (unless `allow_private`). Host names are checked again at every
/// delivery, after resolution.
pub fn check_url(url: &str, allow_private: bool) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        .ok_or_else(|| format!("webhook {} is not an http(s) URL", redacted(url)))?;
    let ip = match parsed.host() {
        Some(url::Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
        Some(url::Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
        _ => None,
    };
    match ip {
        Some(ip) if !allow_private && !is_public(ip) => Err(format!(
            "webhook {} points at {ip}, which is not a public address (a test receiver on this host needs the private-address opt-ins: docs/operator-guide.md §7)",
            redacted(url)
        )),
        _ => Ok(()),
    }
}

/// [`check_url`], and a host name resolved now: refused if any of its addresses is not public
/// (unless `allow_private`). A name that does not resolve here is let through: it is checked
/// again, and pinned, at every delivery. Blocking (the resolver): for `ewii-hub token create`,
/// never on an async worker.
pub fn check_url_now(url: &str, allow_private: bool) -> Result<(), String> {
    check_url(url, allow_private)?;
    if allow_private {
        return Ok(());
    }
    let Some(parsed) = reqwest::Url::parse(url).ok() else {
        return Ok(());
    };
    let own = |ip: IpAddr, how: &str| {
        format!(
            "webhook {} points at {ip}{how}, an address of this host: a delivery would reach the Hub's own listeners (a test receiver on this host needs the private-address opt-ins: docs/operator-guide.md §7)",
            redacted(url)
        )
    };
    let host = match parsed.host() {
        Some(url::Host::Ipv4(v4)) if is_this_hosts(v4.into()) => return Err(own(v4.into(), "")),
        Some(url::Host::Ipv6(v6)) if is_this_hosts(v6.into()) => return Err(own(v6.into(), "")),
        Some(url::Host::Domain(host)) => host,
        _ => return Ok(()),
    };
    let Some(port) = parsed.port_or_known_default() else {
        return Ok(());
    };
    let Ok(addrs) = std::net::ToSocketAddrs::to_socket_addrs(&(host, port)) else {
        return Ok(());
    };
    let addrs: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
    if let Some(ip) = addrs.iter().find(|ip| !is_public(**ip)) {
        return Err(format!(
            "webhook {} points at {ip} ({host} resolves to it), which is not a public address (a test receiver on this host needs the private-address opt-ins: docs/operator-guide.md §7)",
            redacted(url)
        ));
    }
    match addrs.into_iter().find(|ip| is_this_hosts(*ip)) {
        Some(ip) => Err(own(ip, &format!(" ({host} resolves to it)"))),
        None => Ok(()),
    }
}

/// Whether `ip` may receive webhooks without `danger_allow_private_targets`: a globally
/// routable unicast address. Refused: loopback, link-local (cloud metadata 169.254.169.254),
/// unspecified, multicast, broadcast, private (RFC 1918), shared/CGNAT (RFC 6598, including
/// 100.100.100.200), "this network", IETF protocol and benchmarking ranges, documentation
/// ranges, reserved 240/4, Azure's platform address 168.63.129.16; for IPv6 also unique-local (fc00::/7, including fd00:ec2::254),
/// site-local, documentation, NAT64 (64:ff9b::/96, 64:ff9b:1::/48), 6to4 (2002::/16), Teredo
/// (2001::/32) and IPv4-compatible or
/// IPv4-mapped forms of any of these (which are judged by their IPv4 address).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let seg = v6.segments();
            // NAT64 and IPv4-compatible (::a.b.c.d, deprecated) forms reach IPv4 hosts
            // through a translator: refused outright.
            let nat64 = seg[0] == 0x64 && seg[1] == 0xff9b && (seg[2..6] == [0; 4] || seg[2] == 1);
            let v4_compatible = seg[..6] == [0; 6];
            let unique_local = (seg[0] & 0xfe00) == 0xfc00;
            let link_local = (seg[0] & 0xffc0) == 0xfe80;
            let site_local = (seg[0] & 0xffc0) == 0xfec0;
            let documentation = seg[0] == 0x2001 && seg[1] == 0x0db8;
            // 6to4 (2002::/16 embeds an IPv4 address, 169.254.169.254 as 2002:a9fe:a9fe::)
            // and Teredo (2001::/32) reach IPv4 hosts through a relay or tunnel on the host:
            // refused outright, as NAT64 is (both deprecated for anything but that).
            let six_to_four = seg[0] == 0x2002;
            let teredo = seg[0] == 0x2001 && seg[1] == 0;
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || nat64
                || six_to_four
                || teredo
                || v4_compatible
                || unique_local
                || link_local
                || site_local
                || documentation)
        }
    }
}

fn is_public_v4(v4: std::net::Ipv4Addr) -> bool {
    let [a, b, c, _] = v4.octets();
    let shared = a == 100 && (64..=127).contains(&b);
    let this_network = a == 0;
    let ietf = a == 192 && b == 0 && c == 0;
    let benchmarking = a == 198 && (b == 18 || b == 19);
    let documentation = (a == 192 && b == 0 && c == 2)
        || (a == 198 && b == 51 && c == 100)
        || (a == 203 && b == 0 && c == 113);
    let reserved = a >= 240;
    let platform = v4 == ewii_common::policy::AZURE_PLATFORM;
    !(platform
        || v4.is_loopback()
        || v4.is_link_local()
        || v4.is_unspecified()
        || v4.is_multicast()
        || v4.is_broadcast()
        || v4.is_private()
        || shared
        || this_network
        || ietf
        || benchmarking
        || documentation
        || reserved)
}

#[cfg(test)]
mod tests {
    /// What the Hub shows of a webhook URL keeps where it goes and none of what may be a
    /// secret.
    #[test]
    fn a_shown_webhook_url_hides_credentials_and_query() {
        use super::redacted;
        assert_eq!(
            redacted("https://hooks.example.com/ewii/acme"),
            "https://hooks.example.com/ewii/acme"
        );
        assert_eq!(
            redacted("https://bot:s3cret@hooks.example.com:8443/in?token=abc#x"),
            "https://…@hooks.example.com:8443/in?…"
        );
        assert_eq!(
            redacted("https://hooks.example.com/in#frag"),
            "https://hooks.example.com/in?…"
        );
        assert_eq!(redacted("not a url ?token=abc"), "(not a URL)");
    }

    use super::*;

    /// Made at once by several callers (as a Hub starting and `ewii-hub token --webhook` can),
    /// the key is one: every caller signs with the key on disk.
    #[test]
    fn a_webhook_key_made_at_once_by_several_callers_is_one_key() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
            let keys: Vec<String> = (0..8)
                .map(|_| {
                    let (dir, barrier) = (dir.path().to_owned(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        WebhookKey::load_or_create(&dir).unwrap().public()
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap())
                .collect();
            let on_disk = WebhookKey::load_or_create(dir.path()).unwrap().public();
            assert!(
                keys.iter().all(|k| *k == on_disk),
                "{keys:?} against {on_disk}"
            );
            let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
            assert_eq!(left.len(), 1, "only webhook.key is left: {left:?}");
        }
    }

    #[test]
    fn p10_signatures_verify_and_tampering_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let key = WebhookKey::load_or_create(dir.path()).unwrap();
        let again = WebhookKey::load_or_create(dir.path()).unwrap();
        assert_eq!(key.public(), again.public(), "the key persists");
        let body = br#"{"type":"client.revoked"}"#;
        let sig = key.sign("msg_1", 1_000, body);
        let pk = key.public();
        assert_eq!(verify(&pk, "msg_1", "1000", &sig, body, 1_100), Ok(()));
        // Several signatures, one valid: accepted (key rotation).
        let multi = format!("v1a,AAAA {sig}");
        assert_eq!(verify(&pk, "msg_1", "1000", &multi, body, 1_000), Ok(()));
        assert_eq!(
            verify(
                &pk,
                "msg_1",
                "1000",
                &sig,
                br#"{"type":"client.revokeD"}"#,
                1_000
            ),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            verify(&pk, "msg_2", "1000", &sig, body, 1_000),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            verify(&pk, "msg_1", "1001", &sig, body, 1_000),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            verify(&pk, "msg_1", "1000", &sig, body, 1_301),
            Err(WebhookError::Stale(301))
        );
        assert_eq!(
            verify(&pk, "msg_1", "x", &sig, body, 1_000),
            Err(WebhookError::BadTimestamp)
        );
        assert_eq!(
            verify("whpk_AAAA", "msg_1", "1000", &sig, body, 1_000),
            Err(WebhookError::BadKey)
        );
        let other = WebhookKey::load_or_create(tempfile::tempdir().unwrap().path()).unwrap();
        assert_eq!(
            verify(&other.public(), "msg_1", "1000", &sig, body, 1_000),
            Err(WebhookError::BadSignature)
        );
    }

    #[test]
    fn p10_a_timestamp_is_canonical_and_never_overflows() {
        let dir = tempfile::tempdir().unwrap();
        let key = WebhookKey::load_or_create(dir.path()).unwrap();
        let public = key.public();
        let sig = key.sign("msg_1", 1_700_000_000, b"{}");
        assert_eq!(
            verify(&public, "msg_1", "1700000000", &sig, b"{}", 1_700_000_000),
            Ok(())
        );
        for spelling in [
            "+1700000000",
            " 1700000000",
            "01700000000",
            "1700000000 ",
            "",
        ] {
            assert_eq!(
                verify(&public, "msg_1", spelling, &sig, b"{}", 1_700_000_000),
                Err(WebhookError::BadTimestamp),
                "{spelling:?}"
            );
        }
        for (ts, now) in [
            (i64::MIN.to_string(), i64::MAX),
            (i64::MAX.to_string(), i64::MIN),
        ] {
            assert!(matches!(
                verify(&public, "msg_1", &ts, &sig, b"{}", now),
                Err(WebhookError::Stale(_))
            ));
        }
    }

    #[test]
    fn p10_only_globally_routable_addresses_receive_webhooks() {
        for refused in [
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.100.100.200",
            "168.63.129.16",
            "100.127.255.254",
            "0.1.2.3",
            "192.0.0.8",
            "198.18.0.1",
            "192.0.2.1",
            "198.51.100.1",
            "203.0.113.1",
            "240.0.0.1",
            "255.255.255.255",
            "127.0.0.1",
            "169.254.169.254",
            "fd00:ec2::254",
            "fc00::1",
            "fec0::1",
            "2001:db8::1",
            "64:ff9b::a00:1",
            "64:ff9b:1::1",
            "2002:a9fe:a9fe::1",
            "2002:0808:0808::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "::10.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:100.100.100.200",
            "::1",
            "fe80::1",
        ] {
            let ip: IpAddr = refused.parse().unwrap();
            assert!(!is_public(ip), "{refused} must be refused");
        }
        for public in [
            "1.1.1.1",
            "8.8.8.8",
            "100.128.0.1",
            "172.32.0.1",
            "2606:4700::1111",
            "2001:4860:4860::8888",
            "::ffff:1.1.1.1",
        ] {
            let ip: IpAddr = public.parse().unwrap();
            assert!(is_public(ip), "{public} is public");
        }
    }

    #[tokio::test]
    async fn p10_loopback_and_link_local_targets_are_refused_by_default() {
        for url in [
            "http://127.0.0.1:8080/hook",
            "http://[::1]/hook",
            "http://169.254.169.254/latest",
            "http://[fe80::1]/x",
            "http://0.0.0.0/x",
            "http://localhost/x",
        ] {
            assert!(
                matches!(
                    check_target(url, false).await,
                    Err(WebhookError::PrivateTarget(_))
                ),
                "{url}"
            );
        }
        assert!(check_target("http://127.0.0.1:8080/hook", true)
            .await
            .is_ok());
        assert!(matches!(
            check_target("ftp://example.org/", false).await,
            Err(WebhookError::BadUrl(_))
        ));
    }

    #[test]
    fn p10_a_webhook_url_is_refused_at_once_when_its_name_resolves_to_a_private_address() {
        // `localhost` resolves here (/etc/hosts); its addresses are loopback.
        let err = check_url_now("http://localhost:9000/hook", false).unwrap_err();
        assert!(err.contains("not a public address"), "{err}");
        assert!(check_url_now("http://localhost:9000/hook", true).is_ok());
        // Literals as before; a name that does not resolve here is checked at delivery.
        assert!(check_url_now("http://127.0.0.1/", false).is_err());
        assert!(check_url_now("https://name.invalid/hook", false).is_ok());
        assert!(check_url_now("ftp://example.org/", false).is_err());
    }

    #[test]
    fn p10_a_verified_id_is_refused_the_second_time_and_forgotten_after_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let seen = dir.path().join("seen");
        assert_eq!(check_and_record_seen(&seen, "msg_1", 1000), Ok(()));
        assert_eq!(check_and_record_seen(&seen, "msg_2", 1001), Ok(()));
        assert_eq!(
            check_and_record_seen(&seen, "msg_1", 1100),
            Err(WebhookError::Seen("msg_1".into()))
        );
        // Past twice the tolerance the id is dropped: such a delivery fails its timestamp.
        let later = 1000 + 2 * TOLERANCE_SECS + 1;
        assert_eq!(check_and_record_seen(&seen, "msg_1", later), Ok(()));
        let text = std::fs::read_to_string(&seen).unwrap();
        assert_eq!(text, format!("1001 msg_2\n{later} msg_1\n"));
        // An id that would forge a line is refused, and not written.
        assert!(matches!(
            check_and_record_seen(&seen, "x\n1 msg_2", later),
            Err(WebhookError::SeenFile(_))
        ));
    }
}
