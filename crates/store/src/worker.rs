//! The worker scheme's control socket: the parent hands out store links to a
//! worker over the socket the worker inherited, as file descriptors
//! (`SCM_RIGHTS`).
//!
//! Protocol on the control socket (a Unix stream socket pair, the worker's
//! end is its standard input):
//! - worker → parent: one byte `L`: "give me a link";
//! - parent → worker: one byte `K` carrying one descriptor: a fresh Unix
//!   socket, whose other end the parent serves as a trusted store
//!   connection (framed as any transport connection).
//!
//! End of file on the control socket means the other process is gone (or
//! stopped serving workers).

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::Interest;
use tokio::net::UnixStream;

/// A worker's request for a link.
pub(crate) const REQUEST: u8 = b'L';
/// The parent's answer, carrying the link's descriptor.
const GRANT: u8 = b'K';

/// Parent side: waits for the next request. `Ok(false)`: the worker closed
/// its end (it exited).
pub(crate) async fn next_request(ctrl: &UnixStream) -> io::Result<bool> {
    let mut byte = [0u8; 1];
    loop {
        ctrl.readable().await?;
        match ctrl.try_read(&mut byte) {
            Ok(0) => return Ok(false),
            Ok(_) if byte[0] == REQUEST => return Ok(true),
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "unexpected byte {:#04x} on the worker control socket",
                        byte[0]
                    ),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Parent side: sends `fd` (one end of a new link) to the worker.
pub(crate) async fn grant(ctrl: &UnixStream, fd: &OwnedFd) -> io::Result<()> {
    loop {
        ctrl.writable().await?;
        let r = ctrl.try_io(Interest::WRITABLE, || {
            let fds = [fd.as_fd()];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
                return Err(io::Error::other("ancillary buffer too small"));
            }
            Ok(rustix::net::sendmsg(
                ctrl,
                &[IoSlice::new(&[GRANT])],
                &mut control,
                SendFlags::NOSIGNAL,
            )?)
        });
        match r {
            Ok(1) => return Ok(()),
            Ok(_) => return Err(io::Error::other("short write on the worker control socket")),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Worker side: asks the parent for a link and waits for its descriptor.
/// `Ok(None)`: the parent closed the control socket (it is gone).
pub(crate) async fn request(ctrl: &UnixStream) -> io::Result<Option<OwnedFd>> {
    loop {
        ctrl.writable().await?;
        match ctrl.try_write(&[REQUEST]) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    loop {
        ctrl.readable().await?;
        let r = ctrl.try_io(Interest::READABLE, || {
            let mut byte = [0u8; 1];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let msg = rustix::net::recvmsg(
                ctrl,
                &mut [IoSliceMut::new(&mut byte)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )?;
            if msg.bytes == 0 {
                return Ok(None);
            }
            let mut fd = None;
            for m in control.drain() {
                if let RecvAncillaryMessage::ScmRights(mut fds) = m {
                    // Close any extra descriptor (dropped here).
                    for f in fds.by_ref() {
                        fd.get_or_insert(f);
                    }
                }
            }
            match (byte[0], fd) {
                (GRANT, Some(fd)) => Ok(Some(fd)),
                (b, _) => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the parent sent {b:#04x} without a link on the control socket"),
                )),
            }
        });
        match r {
            Ok(x) => return Ok(x),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}
