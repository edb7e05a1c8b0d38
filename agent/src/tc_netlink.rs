//! TC through a clsact qdisc and a netlink filter: the path on kernels
//! without TCX (before 6.6), or when `datapath.tc_attach: netlink` asks for it.
//!
//! A netlink filter is not a BPF link: it cannot be pinned and outlives the
//! agent on its own (the filter holds the program). So keyfence puts its one
//! filter per interface at a fixed place ([`PRIORITY`], [`HANDLE`] on the
//! ingress hook), where a restarted agent finds it and replaces its program
//! in place (`RTM_NEWTFILTER` without `NLM_F_CREATE`: `cls_bpf` swaps the
//! program under RCU, so no packet meets no program). What bpffs records for
//! it (it holds only BPF objects, so both records are pins of the TC program):
//! `link-tcnl-<interface>` (the filter) and `qdisc-clsact-<interface>` (this
//! agent created the interface's clsact qdisc, so `detach` removes it again,
//! unless another program's filters are on it by then).
//!
//! aya 0.14 creates the qdisc and the filter; deleting them and listing the
//! filters on a hook are the small netlink requests below.

use std::io;

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    socket,
};

/// The filter's priority on the ingress hook: 1 runs before every filter
/// `tc` or a loader adds without naming one (those start at 49152), so a
/// program ahead of ours cannot end classification before keyfence decides.
pub const PRIORITY: u16 = 1;

/// The filter's handle at [`PRIORITY`]: `0x4b46` ("KF"), unlikely to be
/// another loader's choice (most let the kernel assign 1, 2, …).
pub const HANDLE: u16 = 0x4b46;

/// The record of the qdisc this agent created (see the module doc).
pub const QDISC_PIN_PREFIX: &str = "qdisc-clsact-";

const RTM_NEWQDISC: u16 = 36;
const RTM_DELQDISC: u16 = 37;
const RTM_GETQDISC: u16 = 38;
const RTM_DELTFILTER: u16 = 45;
const RTM_GETTFILTER: u16 = 46;
const RTM_NEWTFILTER: u16 = 44;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const TCA_KIND: u16 = 1;
/// `TC_H_CLSACT`, the clsact qdisc's parent (`TC_H_INGRESS` is the same value).
const TC_H_CLSACT: u32 = 0xffff_fff1;
/// `TC_H_MAKE(TC_H_CLSACT, 0)`: the clsact qdisc's own handle `ffff:`.
const CLSACT_HANDLE: u32 = 0xffff_0000;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)`.
pub const INGRESS_PARENT: u32 = 0xffff_fff2;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS)`.
pub const EGRESS_PARENT: u32 = 0xffff_fff3;
/// `ETH_P_ALL`, the protocol aya's netlink attach uses (network order in `tcm_info`).
const ETH_P_ALL: u16 = 0x0003;
const NLMSG_HDR: usize = 16;
const TCMSG: usize = 20;

/// One filter on a hook: `(priority, handle)`.
pub type FilterId = (u16, u32);

/// A `tcmsg` request with an optional `TCA_KIND` attribute.
fn request(kind: u16, flags: u16, ifindex: u32, handle: u32, parent: u32, info: u32) -> Vec<u8> {
    let mut msg = Vec::with_capacity(64);
    msg.extend_from_slice(&0u32.to_ne_bytes()); // length, set below
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    msg.extend_from_slice(&[0u8; 4]); // family (AF_UNSPEC), padding
    msg.extend_from_slice(&ifindex.to_ne_bytes());
    msg.extend_from_slice(&handle.to_ne_bytes());
    msg.extend_from_slice(&parent.to_ne_bytes());
    msg.extend_from_slice(&info.to_ne_bytes());
    msg
}

fn with_kind(mut msg: Vec<u8>, kind: &str) -> Vec<u8> {
    let payload = kind.len() + 1;
    let attr_len = 4 + payload;
    msg.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    msg.extend_from_slice(&TCA_KIND.to_ne_bytes());
    msg.extend_from_slice(kind.as_bytes());
    msg.push(0);
    while !msg.len().is_multiple_of(4) {
        msg.push(0);
    }
    msg
}

fn finish(mut msg: Vec<u8>) -> Vec<u8> {
    let len = msg.len() as u32;
    msg[..4].copy_from_slice(&len.to_ne_bytes());
    msg
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Send one request and read the answers until its ack (or the end of a
/// dump); `each` sees every `tcmsg` answer's `(type, payload)`.
fn talk(msg: &[u8], mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
    let sock = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&sock),
        &NetlinkAddr::new(0, 0),
    )?;
    send(
        std::os::fd::AsRawFd::as_raw_fd(&sock),
        msg,
        MsgFlags::empty(),
    )?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            &mut buf,
            MsgFlags::empty(),
        )?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "netlink closed without an answer",
            ));
        }
        let mut at = 0;
        while at + NLMSG_HDR <= n {
            let len = u32_at(&buf, at) as usize;
            let kind = u16_at(&buf, at + 4);
            if len < NLMSG_HDR || at + len > n {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "truncated netlink message",
                ));
            }
            let payload = &buf[at + NLMSG_HDR..at + len];
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let code = if payload.len() >= 4 {
                        i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]])
                    } else {
                        -libc::EIO
                    };
                    return if code == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-code))
                    };
                }
                _ => each(kind, payload),
            }
            at += (len + 3) & !3;
        }
    }
}

/// The filters on one clsact hook of `ifindex` (`parent` is
/// [`INGRESS_PARENT`] or [`EGRESS_PARENT`]); the per-priority header entries
/// (handle 0) are left out. No clsact qdisc: none.
pub fn filters(ifindex: u32, parent: u32) -> io::Result<Vec<FilterId>> {
    let msg = finish(request(RTM_GETTFILTER, NLM_F_DUMP, ifindex, 0, parent, 0));
    let mut found = Vec::new();
    let outcome = talk(&msg, |kind, payload| {
        if kind == RTM_NEWTFILTER && payload.len() >= TCMSG {
            let handle = u32_at(payload, 8);
            let priority = (u32_at(payload, 16) >> 16) as u16;
            if handle != 0 {
                found.push((priority, handle));
            }
        }
    });
    match outcome {
        Ok(()) => Ok(found),
        // The hook does not exist without the qdisc.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// The `TCA_KIND` attribute of a `tcmsg` answer.
fn kind_attr(payload: &[u8]) -> Option<&[u8]> {
    let mut at = TCMSG;
    while at + 4 <= payload.len() {
        let len = u16_at(payload, at) as usize;
        if len < 4 || at + len > payload.len() {
            return None;
        }
        if u16_at(payload, at + 2) == TCA_KIND {
            let value = &payload[at + 4..at + len];
            return Some(value.strip_suffix(&[0]).unwrap_or(value));
        }
        at += (len + 3) & !3;
    }
    None
}

/// Whether `ifindex` has a clsact qdisc (an `ingress` qdisc sits at the same
/// parent: the kind tells them apart).
pub fn has_clsact(ifindex: u32) -> io::Result<bool> {
    let msg = finish(request(RTM_GETQDISC, NLM_F_DUMP, ifindex, 0, 0, 0));
    let mut found = false;
    talk(&msg, |kind, payload| {
        if kind == RTM_NEWQDISC
            && payload.len() >= TCMSG
            && u32_at(payload, 4) == ifindex
            && u32_at(payload, 12) == TC_H_CLSACT
            && kind_attr(payload) == Some(b"clsact")
        {
            found = true;
        }
    })?;
    Ok(found)
}

/// Delete keyfence's filter from the ingress hook of `ifindex`. Already gone
/// (or no qdisc any more): nothing to do.
pub fn delete_filter(ifindex: u32) -> io::Result<()> {
    let info = (u32::from(PRIORITY) << 16) | u32::from(ETH_P_ALL.to_be());
    let msg = finish(request(
        RTM_DELTFILTER,
        NLM_F_ACK,
        ifindex,
        u32::from(HANDLE),
        INGRESS_PARENT,
        info,
    ));
    match talk(&msg, |_, _| {}) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) => Ok(()),
        other => other,
    }
}

/// What [`remove_qdisc_if_unused`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum QdiscOutcome {
    Removed,
    /// Other filters are on it: they keep it.
    KeptInUse(usize),
    /// It was already gone.
    Absent,
}

/// Delete the clsact qdisc keyfence created on `ifindex`, unless filters
/// (someone else's, on ingress or egress) are on it now: deleting the qdisc
/// would take them with it.
pub fn remove_qdisc_if_unused(ifindex: u32) -> io::Result<QdiscOutcome> {
    if !has_clsact(ifindex)? {
        return Ok(QdiscOutcome::Absent);
    }
    let mut others = filters(ifindex, INGRESS_PARENT)?;
    others.extend(filters(ifindex, EGRESS_PARENT)?);
    if !others.is_empty() {
        return Ok(QdiscOutcome::KeptInUse(others.len()));
    }
    let msg = finish(with_kind(
        request(
            RTM_DELQDISC,
            NLM_F_ACK,
            ifindex,
            CLSACT_HANDLE,
            TC_H_CLSACT,
            0,
        ),
        "clsact",
    ));
    match talk(&msg, |_, _| {}) {
        Ok(()) => Ok(QdiscOutcome::Removed),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) => {
            Ok(QdiscOutcome::Absent)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_laid_out_as_the_kernel_reads_them() {
        let msg = finish(with_kind(
            request(RTM_DELQDISC, NLM_F_ACK, 7, CLSACT_HANDLE, TC_H_CLSACT, 0),
            "clsact",
        ));
        // header 16 + tcmsg 20 + attribute 4 + "clsact\0" padded to 8
        assert_eq!(msg.len(), 48);
        assert_eq!(u32_at(&msg, 0), 48);
        assert_eq!(u16_at(&msg, 4), RTM_DELQDISC);
        assert_eq!(u16_at(&msg, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32_at(&msg, 20), 7, "ifindex");
        assert_eq!(u32_at(&msg, 24), CLSACT_HANDLE);
        assert_eq!(u32_at(&msg, 28), TC_H_CLSACT);
        assert_eq!(u16_at(&msg, 36), 11, "attribute length: 4 + \"clsact\\0\"");
        assert_eq!(u16_at(&msg, 38), TCA_KIND);
        assert_eq!(&msg[40..47], b"clsact\0");
    }
}
