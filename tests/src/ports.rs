//! Addresses for tests that need one nothing answers on, or a server that
//! goes down and comes back on the same address, without the race of
//! picking a free port, releasing it and hoping nobody takes it meanwhile
//! (or a fixed "closed" port, which something on the machine may use).

use std::net::SocketAddr;

/// A port on 127.0.0.1 held, for as long as this value lives, by a socket
/// that is bound but never listens. Connections to it are refused, the
/// kernel hands it to nobody who asks for a free port, and a server under
/// test can still listen on it: both sockets set `SO_REUSEADDR` (Rust's
/// and tokio's listeners do), which Linux allows as long as only one of
/// them listens. So a server stopped and started again on it comes back on
/// the same address, and between its runs the address refuses connections,
/// as a server that is down does.
#[derive(Debug)]
pub struct HeldPort {
    _socket: tokio::net::TcpSocket,
    address: SocketAddr,
}

impl HeldPort {
    pub fn new() -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
        socket.set_reuseaddr(true).expect("setting SO_REUSEADDR");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("binding a free port");
        let address = socket.local_addr().expect("the bound address");
        Self {
            _socket: socket,
            address,
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Default for HeldPort {
    fn default() -> Self {
        Self::new()
    }
}
