//! The port connector, the guest side of `connect_port` (preview URLs, the in-sandbox daemons): run as
//! an exec of the sandbox user (`/.tartarus/tartarus-connect PORT`), it connects to the port on the
//! guest's loopback, says so with one byte on stderr ([`CONNECTED`]), and then carries stdin to the
//! connection and the connection to stdout — the exec's stdio, which the host's multiplexer carries over
//! the channel with its flow control — until the connection ends.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

/// The connector's path in the guest (a name of the agent's executable in the initramfs).
pub const CONNECT_PATH: &str = "/.tartarus/tartarus-connect";
pub const CONNECT_NAME: &str = "tartarus-connect";
/// Written to stderr once connected.
pub const CONNECTED: u8 = b'c';
/// Exit status when nothing listens on the port.
pub const REFUSED: i32 = 111;
/// Exit status for any other failure to connect (or a bad argument).
pub const FAILED: i32 = 112;
/// How long the connection may take (on the guest's loopback only a stuck guest makes it wait).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Once the host's side has closed, how long the service may still take to finish its answer.
const DRAIN: Duration = Duration::from_secs(5);

/// `tartarus-connect PORT`.
pub fn run(args: &[String]) -> i32 {
    let Some(port) = args
        .first()
        .and_then(|p| p.parse::<u16>().ok())
        .filter(|p| *p > 0)
    else {
        eprintln!("usage: {CONNECT_NAME} PORT");
        return FAILED;
    };
    let stream = match TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), CONNECT_TIMEOUT)
    {
        Ok(stream) => stream,
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return REFUSED,
        Err(e) => {
            eprintln!("connecting to port {port}: {e}");
            return FAILED;
        }
    };
    if io::stderr().write_all(&[CONNECTED]).is_err() {
        return FAILED;
    }
    let Ok(to_service) = stream.try_clone() else {
        return FAILED;
    };
    // Host → service, on its own thread; at the host's end of file the service gets its end of file too
    // and a bounded time to finish.
    std::thread::spawn(move || {
        let mut to_service = to_service;
        let _ = io::copy(&mut io::stdin().lock(), &mut to_service);
        let _ = to_service.shutdown(Shutdown::Write);
        let _ = to_service.set_read_timeout(Some(DRAIN));
    });
    let mut from_service = stream;
    let mut out = io::stdout().lock();
    let mut buf = [0u8; 64 << 10];
    loop {
        match from_service.read(&mut buf) {
            Ok(0) => return 0,
            Ok(n) => {
                if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                    return 0;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return 0,
        }
    }
}
