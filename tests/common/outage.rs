//! Taking a server away: a TCP proxy on 127.0.0.1 in front of it that can be cut (its port closed and
//! every connection through it dropped, so clients get "connection refused") and restored on the same
//! port, as an outage of the server looks to its clients.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

pub struct Proxy {
    addr: SocketAddr,
    target: SocketAddr,
    task: Option<JoinHandle<()>>,
}

impl Proxy {
    /// A proxy to `target` on a free port, passing traffic.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = listen("127.0.0.1:0".parse().unwrap());
        let addr = listener.local_addr().unwrap();
        Proxy { addr, target, task: Some(tokio::spawn(forward(listener, target))) }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes the port and drops every connection.
    pub fn cut(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Listens again on the same port.
    pub fn restore(&mut self) {
        if self.task.is_none() {
            self.task = Some(tokio::spawn(forward(listen(self.addr), self.target)));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

fn listen(addr: SocketAddr) -> TcpListener {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr).unwrap_or_else(|e| panic!("binding {addr}: {e}"));
    socket.listen(128).unwrap()
}

/// Accepts and forwards until aborted; aborting drops the connection tasks with it.
async fn forward(listener: TcpListener, target: SocketAddr) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else { continue };
        connections.spawn(async move {
            if let Ok(mut outbound) = TcpStream::connect(target).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
        while connections.try_join_next().is_some() {}
    }
}
