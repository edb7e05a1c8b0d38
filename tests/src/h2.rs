//! An HTTP/2-capable upstream for the shim's upstream tests: hyper's server
//! inside a namespace speaking HTTP/1.1 and HTTP/2 with prior knowledge
//! (h2c) on plain TCP, or over TLS with ALPN. It answers every request with a
//! JSON echo like [`crate::http::Upstream`]'s plus the protocol version it
//! was spoken to in: `{"upstream":"echo","version":"HTTP/2.0","method",
//! "path","authority","headers"}`. A path `/slow/MS` answers after MS
//! milliseconds (at most 10 s). Stops on drop.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio::sync::oneshot;
use tokio_rustls::{TlsAcceptor, rustls};

use crate::netns::{Netns, enter};

/// How the upstream speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    /// Plain TCP: HTTP/1.1, and HTTP/2 with prior knowledge.
    Plain,
    /// TLS offering `h2` and `http/1.1`.
    TlsH2,
    /// TLS offering only `http/1.1`.
    TlsH1,
}

/// The running server.
pub struct HyperUpstream {
    stop: Option<oneshot::Sender<()>>,
    requests: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

fn tls_acceptor(cert: &Path, key: &Path, alpn: Alpn) -> anyhow::Result<TlsAcceptor> {
    let certs = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = match alpn {
        Alpn::TlsH2 => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        _ => vec![b"http/1.1".to_vec()],
    };
    Ok(TlsAcceptor::from(Arc::new(config)))
}

async fn echo(req: Request<Incoming>, count: Arc<AtomicU64>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body_bytes = body.collect().await.map_or(0, |b| b.to_bytes().len());
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", hyper::http::uri::PathAndQuery::as_str)
        .to_owned();
    if let Some(ms) = path
        .strip_prefix("/slow/")
        .and_then(|ms| ms.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms.min(10_000))).await;
    }
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers
            .entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    count.fetch_add(1, Ordering::SeqCst);
    let body = serde_json::json!({
        "upstream": "echo",
        "version": format!("{:?}", parts.version),
        "method": parts.method.as_str(),
        "path": path,
        "authority": parts.uri.authority().map(|a| a.as_str().to_owned()),
        "headers": headers,
        "body_bytes": body_bytes,
    })
    .to_string();
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}

impl HyperUpstream {
    /// Serve on `bind` inside `ns`; `tls` (certificate and key PEM files) is
    /// needed unless `alpn` is [`Alpn::Plain`].
    pub fn start(
        ns: &Netns,
        bind: SocketAddr,
        alpn: Alpn,
        tls: Option<(&Path, &Path)>,
    ) -> anyhow::Result<Self> {
        let acceptor = match (alpn, tls) {
            (Alpn::Plain, _) => None,
            (_, Some((cert, key))) => Some(tls_acceptor(cert, key, alpn)?),
            (_, None) => anyhow::bail!("a TLS upstream needs a certificate"),
        };
        let requests = Arc::new(AtomicU64::new(0));
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let path = ns.path();
        let count = Arc::clone(&requests);
        let connections = Arc::new(AtomicU64::new(0));
        let accepted = Arc::clone(&connections);
        let thread = thread::spawn(move || {
            let runtime = enter(&path).and_then(|()| {
                Ok(tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?)
            });
            let runtime = match runtime {
                Ok(r) => r,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::bind(bind)
                    .await
                    .with_context(|| format!("binding {bind}"))
                {
                    Ok(l) => {
                        let _ = ready_tx.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let serve = async move {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        accepted.fetch_add(1, Ordering::SeqCst);
                        let (acceptor, count) = (acceptor.clone(), Arc::clone(&count));
                        tokio::spawn(async move {
                            let service = service_fn(move |req| {
                                let count = Arc::clone(&count);
                                async move { Ok::<_, Infallible>(echo(req, count).await) }
                            });
                            let builder = auto::Builder::new(TokioExecutor::new());
                            let _ = match acceptor {
                                Some(a) => match a.accept(stream).await {
                                    Ok(tls) => {
                                        builder.serve_connection(TokioIo::new(tls), service).await
                                    }
                                    Err(_) => return,
                                },
                                None => {
                                    builder
                                        .serve_connection(TokioIo::new(stream), service)
                                        .await
                                }
                            };
                        });
                    }
                };
                tokio::select! {
                    () = serve => {}
                    _ = stop_rx => {}
                }
            });
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("the HTTP/2 upstream did not start")??;
        Ok(Self {
            stop: Some(stop_tx),
            requests,
            connections,
            thread: Some(thread),
        })
    }

    /// Requests answered so far.
    #[must_use]
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    #[must_use]
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for HyperUpstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
