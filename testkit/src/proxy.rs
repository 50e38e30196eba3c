//! A TCP forwarder for fault injection: switch it off (connections refused at once) or make it a
//! black hole (connections accepted, never answered) while the code under test talks through it.

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

/// A TCP forwarder to `target` on loopback that can be switched off (connections refused at once) or made a
/// black hole (connections accepted, never answered).
pub struct Proxy {
    pub port: u16,
    mode: Arc<AtomicU8>,
}
pub const UP: u8 = 0;
pub const DOWN: u8 = 1;
pub const BLACK_HOLE: u8 = 2;

impl Proxy {
    pub fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(AtomicU8::new(UP));
        let m = mode.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { continue };
                match m.load(Ordering::SeqCst) {
                    DOWN => drop(client),
                    BLACK_HOLE => {
                        std::thread::spawn(move || {
                            std::thread::sleep(Duration::from_secs(600));
                            drop(client)
                        });
                    }
                    _ => {
                        let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else { continue };
                        let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                        let (mut c, mut s) = (client, server);
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut c, &mut s);
                            let _ = s.shutdown(std::net::Shutdown::Write);
                        });
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut s2, &mut c2);
                            let _ = c2.shutdown(std::net::Shutdown::Write);
                        });
                    }
                }
            }
        });
        Proxy { port, mode }
    }
    pub fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }
}

impl Proxy {
    /// A forwarder listening on 127.0.0.1 inside the network namespace `listen_netns` (a
    /// `/proc/PID/ns/net` path) to `target_port` on 127.0.0.1 inside `target_netns` (kept open:
    /// it outlives the processes that made it). How one box reaches a server left in another
    /// box's network after that box was killed.
    pub fn across(listen_netns: &std::path::Path, target_netns: std::fs::File, target_port: u16) -> Proxy {
        use std::sync::mpsc;
        let listen_ns = std::fs::File::open(listen_netns).expect("the listening namespace");
        let (tx, rx) = mpsc::channel();
        let target_ns = Arc::new(target_netns);
        let mode = Arc::new(AtomicU8::new(UP));
        let m = mode.clone();
        std::thread::spawn(move || {
            nix::sched::setns(&listen_ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns (listen)");
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            tx.send(listener.local_addr().unwrap().port()).unwrap();
            for conn in listener.incoming() {
                let Ok(client) = conn else { continue };
                if m.load(Ordering::SeqCst) != UP {
                    drop(client);
                    continue;
                }
                let ns = target_ns.clone();
                std::thread::spawn(move || {
                    nix::sched::setns(&*ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns (target)");
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)) else { return };
                    let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                    let (mut c, mut s) = (client, server);
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut s2, &mut c2);
                        let _ = c2.shutdown(std::net::Shutdown::Write);
                    });
                    let _ = std::io::copy(&mut c, &mut s);
                    let _ = s.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        // DOWN (and BLACK_HOLE) refuse new connections at once.
        Proxy { port: rx.recv().expect("the forwarder's port"), mode }
    }
}
