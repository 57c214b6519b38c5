//! A test certificate authority and a TLS endpoint in front of the development broker, so
//! that a worker configured for `security.protocol = SSL` does its TLS handshakes, and all of
//! its Kafka traffic, over real TLS with a CA of the test's own.
//!
//! The endpoint terminates TLS and forwards the bytes to the mock broker, which speaks
//! plaintext only; the broker is told (`advertise`) to send clients to the endpoint, so
//! every connection a client opens after bootstrapping goes through it as well.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::ssl::{SslAcceptor, SslMethod, SslStream};
use openssl::x509::extension::{BasicConstraints, KeyUsage, SubjectAlternativeName};
use openssl::x509::{X509Name, X509};

/// A version 3 certificate of `subject` for `key`, issued by `issuer`, valid for a day.
fn certificate_builder(
    subject: &openssl::x509::X509NameRef,
    issuer: &openssl::x509::X509NameRef,
    key: &PKey<Private>,
) -> openssl::x509::X509Builder {
    let mut builder = X509::builder().unwrap();
    builder.set_version(2).unwrap();
    builder.set_serial_number(&serial()).unwrap();
    builder.set_subject_name(subject).unwrap();
    builder.set_issuer_name(issuer).unwrap();
    builder.set_pubkey(key).unwrap();
    builder
        .set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    builder
        .set_not_after(&Asn1Time::days_from_now(1).unwrap())
        .unwrap();
    builder
}

/// A certificate authority and the PEM file of its certificate.
pub struct Authority {
    key: PKey<Private>,
    certificate: X509,
    pub certificate_file: PathBuf,
}

fn new_key() -> PKey<Private> {
    PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap()
}

fn name(common_name: &str) -> X509Name {
    let mut name = X509Name::builder().unwrap();
    name.append_entry_by_text("CN", common_name).unwrap();
    name.build()
}

fn serial() -> openssl::asn1::Asn1Integer {
    let mut serial = BigNum::new().unwrap();
    serial.rand(64, MsbOption::MAYBE_ZERO, false).unwrap();
    serial.to_asn1_integer().unwrap()
}

impl Authority {
    /// A self-signed CA valid for a day, its certificate written to `dir/<name>.pem`.
    pub fn new(dir: &Path, common_name: &str) -> Authority {
        let key = new_key();
        let mut builder = certificate_builder(&name(common_name), &name(common_name), &key);
        builder
            .append_extension(BasicConstraints::new().critical().ca().build().unwrap())
            .unwrap();
        builder
            .append_extension(
                KeyUsage::new()
                    .critical()
                    .key_cert_sign()
                    .crl_sign()
                    .build()
                    .unwrap(),
            )
            .unwrap();
        builder.sign(&key, MessageDigest::sha256()).unwrap();
        let certificate = builder.build();
        let certificate_file = dir.join(format!("{common_name}.pem"));
        std::fs::write(&certificate_file, certificate.to_pem().unwrap()).unwrap();
        Authority {
            key,
            certificate,
            certificate_file,
        }
    }

    /// A server certificate for 127.0.0.1 and localhost signed by this CA, with its key.
    pub fn server_certificate(&self) -> (X509, PKey<Private>) {
        let key = new_key();
        let mut builder =
            certificate_builder(&name("localhost"), self.certificate.subject_name(), &key);
        let names = SubjectAlternativeName::new()
            .ip("127.0.0.1")
            .dns("localhost")
            .build(&builder.x509v3_context(Some(&self.certificate), None))
            .unwrap();
        builder.append_extension(names).unwrap();
        builder.sign(&self.key, MessageDigest::sha256()).unwrap();
        (builder.build(), key)
    }
}

/// A TLS endpoint on loopback forwarding each connection's plaintext to `upstream`.
pub struct TlsEndpoint {
    pub port: u16,
    /// Connections whose TLS handshake completed.
    pub handshakes: Arc<AtomicUsize>,
    /// Connections whose handshake failed (a client that does not trust the certificate).
    pub refused: Arc<AtomicUsize>,
}

impl TlsEndpoint {
    pub fn start(authority: &Authority, upstream: String) -> TlsEndpoint {
        let (certificate, key) = authority.server_certificate();
        let mut acceptor = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
        acceptor.set_certificate(&certificate).unwrap();
        acceptor.set_private_key(&key).unwrap();
        let acceptor = Arc::new(acceptor.build());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let handshakes = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let (done, failed) = (Arc::clone(&handshakes), Arc::clone(&refused));
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let (acceptor, upstream) = (Arc::clone(&acceptor), upstream.clone());
                let (done, failed) = (Arc::clone(&done), Arc::clone(&failed));
                std::thread::spawn(move || match acceptor.accept(client) {
                    Ok(tls) => {
                        done.fetch_add(1, Ordering::SeqCst);
                        if let Ok(server) = TcpStream::connect(&upstream) {
                            forward(tls, server);
                        }
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        TlsEndpoint {
            port,
            handshakes,
            refused,
        }
    }
}

/// Copies bytes both ways until either side closes. A TLS stream cannot be split between two
/// threads, so one thread polls both sides with short read timeouts.
fn forward(mut tls: SslStream<TcpStream>, mut server: TcpStream) {
    let poll = Some(Duration::from_millis(2));
    tls.get_ref().set_read_timeout(poll).unwrap();
    server.set_read_timeout(poll).unwrap();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        match tls.read(&mut buffer) {
            Ok(0) => return,
            Ok(n) => {
                if server.write_all(&buffer[..n]).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
        match server.read(&mut buffer) {
            Ok(0) => return,
            Ok(n) => {
                if tls.write_all(&buffer[..n]).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}
