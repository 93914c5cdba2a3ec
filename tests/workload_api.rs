//! A SPIFFE Workload API server for the tests: the part of a SPIRE agent the Client talks to.
//!
//! It speaks the real protocol (gRPC over a Unix socket, `SpiffeWorkloadAPI/FetchX509SVID`,
//! the messages of the SPIFFE Workload API specification, the `workload.spiffe.io` header
//! required) and serves what the test sets: an SVID with its key and bundle, and federated
//! bundles. [`WorkloadApi::push`] delivers a new response to every open stream, as an agent
//! does when it rotates an SVID. The `spiffe` crate keeps its generated types private, so the
//! messages are written here from the specification's `workload.proto`.
//!
//! A stand-in only in that it is not SPIRE: it attests nothing (every caller on the socket is
//! the one workload) and its CA is the test's. The Client's side, the `spiffe` crate's
//! `X509Source` and tonic channel, is the real one.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tokio::sync::{oneshot, watch};
use tokio_stream::wrappers::{UnixListenerStream, WatchStream};
use tokio_stream::{Stream, StreamExt};

/// `X509SVIDRequest` (no fields).
#[derive(Clone, PartialEq, prost::Message)]
pub struct X509SvidRequest {}

/// `X509SVIDResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct X509SvidResponse {
    /// The SVIDs; the first is the default.
    #[prost(message, repeated, tag = "1")]
    pub svids: Vec<X509Svid>,
    /// CRLs (unused).
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub crl: Vec<Vec<u8>>,
    /// Foreign trust domain (`spiffe://<td>`) → its CA certificates, DER concatenated.
    #[prost(map = "string, bytes", tag = "3")]
    pub federated_bundles: HashMap<String, Vec<u8>>,
}

/// `X509SVID`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct X509Svid {
    /// The SVID's SPIFFE ID.
    #[prost(string, tag = "1")]
    pub spiffe_id: String,
    /// Leaf first, DER concatenated.
    #[prost(bytes = "vec", tag = "2")]
    pub x509_svid: Vec<u8>,
    /// PKCS#8 DER of the key.
    #[prost(bytes = "vec", tag = "3")]
    pub x509_svid_key: Vec<u8>,
    /// The SVID's own trust domain bundle, DER concatenated.
    #[prost(bytes = "vec", tag = "4")]
    pub bundle: Vec<u8>,
    /// Operator hint (unused).
    #[prost(string, tag = "5")]
    pub hint: String,
}

type Responses = Pin<Box<dyn Stream<Item = Result<X509SvidResponse, tonic::Status>> + Send>>;
type BoxFuture<T, E> = Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

/// The gRPC service: only `FetchX509SVID`; every other method answers UNIMPLEMENTED.
#[derive(Clone)]
struct Service {
    current: watch::Receiver<Option<X509SvidResponse>>,
}

impl tonic::server::NamedService for Service {
    const NAME: &'static str = "SpiffeWorkloadAPI";
}

struct FetchX509Svid(watch::Receiver<Option<X509SvidResponse>>);

impl tonic::server::ServerStreamingService<X509SvidRequest> for FetchX509Svid {
    type Response = X509SvidResponse;
    type ResponseStream = Responses;
    type Future = BoxFuture<tonic::Response<Responses>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<X509SvidRequest>) -> Self::Future {
        let rx = self.0.clone();
        Box::pin(async move {
            // The specification: a request without the header is refused.
            let ok = request
                .metadata()
                .get("workload.spiffe.io")
                .is_some_and(|v| v == "true");
            if !ok {
                return Err(tonic::Status::invalid_argument(
                    "security header missing from request",
                ));
            }
            // Every value the test sets, from the current one on; none set yet is skipped
            // (an agent with no registration entry for the caller sends nothing).
            let stream = WatchStream::new(rx).filter_map(|r| r.map(Ok));
            Ok(tonic::Response::new(Box::pin(stream) as Responses))
        })
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Service {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let current = self.current.clone();
        Box::pin(async move {
            if req.uri().path() != "/SpiffeWorkloadAPI/FetchX509SVID" {
                return Ok(tonic::Status::unimplemented("not served by the test agent").into_http());
            }
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.server_streaming(FetchX509Svid(current), req).await)
        })
    }
}

/// A running Workload API on a Unix socket.
pub struct WorkloadApi {
    /// The socket's path.
    pub path: PathBuf,
    set: watch::Sender<Option<X509SvidResponse>>,
    stop: Option<oneshot::Sender<()>>,
}

impl WorkloadApi {
    /// Serves on `path` (a new socket), with nothing to deliver until [`push`](Self::push).
    pub fn start(path: &Path) -> Self {
        let listener = tokio::net::UnixListener::bind(path).expect("bind the Workload API socket");
        let (set, current) = watch::channel(None);
        let (stop, stopped) = oneshot::channel::<()>();
        let service = Service { current };
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await;
        });
        Self {
            path: path.to_owned(),
            set,
            stop: Some(stop),
        }
    }

    /// The endpoint as a Client configures it.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    /// Delivers `svid` (with its bundle) and the federated bundles to every stream.
    pub fn push(&self, svid: &IssuedSvid, federated: &[(&str, &[Vec<u8>])]) {
        let response = X509SvidResponse {
            svids: vec![X509Svid {
                spiffe_id: svid.spiffe_id.clone(),
                x509_svid: svid.chain.concat(),
                x509_svid_key: svid.key_pkcs8.clone(),
                bundle: svid.bundle.concat(),
                hint: String::new(),
            }],
            crl: Vec::new(),
            federated_bundles: federated
                .iter()
                .map(|(td, certs)| (format!("spiffe://{td}"), certs.concat()))
                .collect(),
        };
        self.set.send_replace(Some(response));
    }

    /// Stops serving (open streams end; the socket file stays).
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for WorkloadApi {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An SVID as an agent holds it.
#[derive(Clone)]
pub struct IssuedSvid {
    /// The SPIFFE ID.
    pub spiffe_id: String,
    /// DER, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER.
    pub key_pkcs8: Vec<u8>,
    /// The trust domain's CA certificates (DER).
    pub bundle: Vec<Vec<u8>>,
    /// The leaf's serial, normalised as the Client and the Hub report it.
    pub serial: String,
}

impl IssuedSvid {
    /// The SVID as the Client holds it in memory.
    pub fn svid(&self) -> ewii::identity::store::Svid {
        ewii::identity::store::Svid::from_pkcs8(
            self.chain.iter().map(|c| c.clone().into()).collect(),
            self.key_pkcs8.clone(),
        )
    }
}

/// A customer's SPIRE CA for one trust domain.
pub struct SpireCa {
    /// The trust domain.
    pub trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// DER of the CA certificate.
    pub cert: Vec<u8>,
    serial: u64,
}

impl SpireCa {
    /// A new CA for `trust_domain`.
    pub fn new(trust_domain: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "SPIRE test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{trust_domain}").try_into().unwrap(),
        )];
        let cert = params.self_signed(&key).unwrap().der().to_vec();
        Self {
            trust_domain: trust_domain.to_owned(),
            issuer: Issuer::new(params, key),
            cert,
            serial: 0x5150_0000,
        }
    }

    /// Writes the CA certificate as PEM (the bundle file a Hub's `[[federation]]` names).
    pub fn write_bundle(&self, path: &Path) {
        let pem = ewii::identity::store::Pem::certs(&[self.cert.clone().into()]);
        std::fs::write(path, pem).unwrap();
    }

    /// A fresh key and an X509-SVID for `path` (e.g. `/ewii/acme`), valid for `lifetime`.
    pub fn issue(&mut self, path: &str, lifetime: Duration) -> IssuedSvid {
        self.serial += 1;
        let key = KeyPair::generate().unwrap();
        let id = format!("spiffe://{}{path}", self.trust_domain);
        let mut params = CertificateParams::default();
        params.serial_number = Some(self.serial.into());
        params.subject_alt_names = vec![SanType::URI(id.clone().try_into().unwrap())];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::seconds(30);
        params.not_after = now + time::Duration::try_from(lifetime).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let serial = ewii::identity::inspect_leaf(cert.der()).unwrap().serial;
        IssuedSvid {
            spiffe_id: id,
            chain: vec![cert.der().to_vec()],
            key_pkcs8: key.serialize_der(),
            bundle: vec![self.cert.clone()],
            serial,
        }
    }
}
