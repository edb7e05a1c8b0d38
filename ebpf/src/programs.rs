//! Entry points: thin wrappers that hand packet bounds to the shared verdict.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

use crate::{parse::MAX_L4_OFFSET, verdict::judge};

/// Bytes of an skb made linear before parsing: everything the parser may read,
/// up to the ports of a transport header at `MAX_L4_OFFSET` (two VLAN tags,
/// IPv6 and the deepest extension chain it walks), so TC judges every packet
/// as XDP does. Pulling fails only without memory; the parser then sees fewer
/// bytes and counts the packet truncated (dropped only under
/// `datapath.unparsed: drop` on a protected address).
const TC_PULL_BYTES: u32 = MAX_L4_OFFSET as u32 + 4;

#[xdp]
pub fn keyfence_xdp(ctx: XdpContext) -> u32 {
    if judge(ctx.data(), ctx.data_end(), ctx.ingress_ifindex() as u32) {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

/// TC ingress (tcx on kernels ≥ 6.6, clsact before). Passing returns
/// `TC_ACT_UNSPEC` (`TCX_NEXT`) so programs attached after ours still run.
#[classifier]
pub fn keyfence_tc(ctx: TcContext) -> i32 {
    let len = ctx.len();
    // Failure leaves the packet as it was; the parser then sees fewer bytes.
    let _ = ctx.pull_data(if len < TC_PULL_BYTES {
        len
    } else {
        TC_PULL_BYTES
    });
    // SAFETY: the context pointer the kernel handed to this program.
    #[expect(unsafe_code, reason = "reading __sk_buff.ifindex")]
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if judge(ctx.data(), ctx.data_end(), ifindex) {
        TC_ACT_SHOT as i32
    } else {
        TC_ACT_UNSPEC
    }
}
