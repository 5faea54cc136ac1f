//! A fault-injecting TCP proxy: forwards to a real server until told to cut, so a test can
//! take "the database" or "the broker" away without touching the shared servers.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

/// The proxy; stops when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    down: Arc<AtomicBool>,
    /// Bumped on every cut, so live connections notice and close.
    generation: watch::Sender<u64>,
    /// Bumped on every black hole: live connections stop forwarding but stay open, as when
    /// a network path dies without a reset.
    silence: watch::Sender<u64>,
    refused: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listen on a free loopback port and forward to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let down = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let (generation, _) = watch::channel(0u64);
        let (silence, _) = watch::channel(0u64);
        let upstream = upstream.to_string();
        let (d, r, g) = (down.clone(), refused.clone(), generation.clone());
        let quiet = silence.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if d.load(Ordering::SeqCst) {
                    r.fetch_add(1, Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                let upstream = upstream.clone();
                let mut cut = g.subscribe();
                let mut hush = quiet.subscribe();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (mut c, mut s) = (client, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut c, &mut s) => {}
                        _ = cut.changed() => {}
                        _ = hush.changed() => {
                            // Hold both sockets open, forwarding nothing, until a cut or
                            // the client gives up.
                            let mut buf = [0u8; 4096];
                            loop {
                                tokio::select! {
                                    _ = cut.changed() => break,
                                    n = tokio::io::AsyncReadExt::read(&mut c, &mut buf) => {
                                        if matches!(n, Ok(0) | Err(_)) { break; }
                                    }
                                }
                            }
                        }
                    }
                });
            }
        });
        Self {
            addr,
            down,
            generation,
            silence,
            refused,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cut every live connection and refuse new ones until [`FaultProxy::restore`].
    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Stop forwarding on live connections without closing them, and refuse new ones: the
    /// clients notice only through their own heartbeats or timeouts.
    pub fn black_hole(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.silence.send_modify(|g| *g += 1);
    }

    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }

    /// Connections refused while cut: proof that a client kept trying.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}
