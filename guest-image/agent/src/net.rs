//! Guest networking for rxe: an IPv4 address on the NIC, a permanent neighbour for the remote
//! peer, and the rxe link on top of the NIC. Done on request, or at boot when the kernel
//! command line asks (`p2prig.net=eth0,10.0.2.15/24` and `p2prig.rxe=rxe0,eth0`).

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{AgentError, Result};
use crate::netlink;

/// Sequence numbers of the agent's netlink requests.
static SEQUENCE: AtomicU32 = AtomicU32::new(1);

/// Checks an interface (or RDMA device) name the kernel would take: 1-15 bytes, no '/', no
/// whitespace, no NUL.
pub fn check_ifname(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace() || b == b':');
    if ok {
        Ok(())
    } else {
        Err(AgentError::Invalid(format!(
            "{name:?} is not an interface name (1-15 bytes, no '/', ':', spaces or NUL)"
        )))
    }
}

pub fn parse_ipv4(text: &str) -> Result<Ipv4Addr> {
    text.parse()
        .map_err(|_| AgentError::Invalid(format!("{text:?} is not an IPv4 address")))
}

/// "52:54:00:12:34:56" -> bytes.
pub fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let invalid =
        || AgentError::Invalid(format!("{text:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"));
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        return Err(invalid());
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
    }
    Ok(mac)
}

/// The netmask of an IPv4 prefix length (0-32).
pub fn netmask(prefix: u8) -> Result<Ipv4Addr> {
    if prefix > 32 {
        return Err(AgentError::Invalid(format!(
            "prefix /{prefix} is longer than 32 bits"
        )));
    }
    let bits = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    };
    Ok(Ipv4Addr::from(bits))
}

/// What the kernel command line asks the agent to set up at boot.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BootNetwork {
    /// (ifname, address, prefix)
    pub interface: Option<(String, Ipv4Addr, u8)>,
    /// (rxe name, netdev)
    pub rxe: Option<(String, String)>,
}

/// Reads `p2prig.net=IF,A.B.C.D/N` and `p2prig.rxe=NAME,NETDEV` from a kernel command line.
/// Malformed values are reported, not fatal: the agent still serves requests.
pub fn parse_cmdline(cmdline: &str) -> (BootNetwork, Vec<String>) {
    let mut boot = BootNetwork::default();
    let mut problems = Vec::new();
    for word in cmdline.split_whitespace() {
        if let Some(value) = word.strip_prefix("p2prig.net=") {
            let parsed = value.split_once(',').and_then(|(ifname, cidr)| {
                let (addr, prefix) = cidr.split_once('/')?;
                let addr = addr.parse().ok()?;
                let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32)?;
                check_ifname(ifname).ok()?;
                Some((ifname.to_owned(), addr, prefix))
            });
            match parsed {
                Some(interface) => boot.interface = Some(interface),
                None => problems.push(format!(
                    "ignoring {word}: expected p2prig.net=IFNAME,A.B.C.D/PREFIX"
                )),
            }
        } else if let Some(value) = word.strip_prefix("p2prig.rxe=") {
            match value.split_once(',') {
                Some((name, netdev))
                    if check_ifname(name).is_ok() && check_ifname(netdev).is_ok() =>
                {
                    boot.rxe = Some((name.to_owned(), netdev.to_owned()))
                }
                _ => problems.push(format!("ignoring {word}: expected p2prig.rxe=NAME,NETDEV")),
            }
        }
    }
    (boot, problems)
}

fn ifreq_for(ifname: &str) -> Result<libc::ifreq> {
    check_ifname(ifname)?;
    // SAFETY: ifreq is plain data (a name and a union of plain data); zero is valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(ifname.bytes()) {
        *slot = byte as libc::c_char;
    }
    Ok(request)
}

fn inet_socket() -> Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(AgentError::last_os("socket(AF_INET)"));
    }
    // SAFETY: fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let inet = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16) on Linux; the kernel reads the
    // family to interpret the rest.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(inet) }
}

fn ioctl(
    socket: &OwnedFd,
    request: libc::c_ulong,
    ifreq: &mut libc::ifreq,
    what: &str,
) -> Result<()> {
    // SAFETY: the ifreq is ours and as large as every SIOC[GS]IF* request expects.
    let ret = unsafe { libc::ioctl(socket.as_raw_fd(), request as _, ifreq as *mut libc::ifreq) };
    if ret < 0 {
        return Err(AgentError::last_os(what.to_owned()));
    }
    Ok(())
}

/// Sets `addr`/`prefix` on `ifname` and brings it (and lo) up.
pub fn net_up(ifname: &str, addr: Ipv4Addr, prefix: u8) -> Result<()> {
    let mask = netmask(prefix)?;
    let socket = inet_socket()?;
    let mut request = ifreq_for(ifname)?;
    request.ifr_ifru.ifru_addr = sockaddr_in(addr);
    ioctl(
        &socket,
        libc::SIOCSIFADDR,
        &mut request,
        &format!("SIOCSIFADDR {ifname} {addr}"),
    )?;
    let mut request = ifreq_for(ifname)?;
    request.ifr_ifru.ifru_netmask = sockaddr_in(mask);
    ioctl(
        &socket,
        libc::SIOCSIFNETMASK,
        &mut request,
        &format!("SIOCSIFNETMASK {ifname} {mask}"),
    )?;
    for name in [ifname, "lo"] {
        let mut request = ifreq_for(name)?;
        ioctl(
            &socket,
            libc::SIOCGIFFLAGS,
            &mut request,
            &format!("SIOCGIFFLAGS {name}"),
        )?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { request.ifr_ifru.ifru_flags };
        request.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        ioctl(
            &socket,
            libc::SIOCSIFFLAGS,
            &mut request,
            &format!("SIOCSIFFLAGS {name} up"),
        )?;
    }
    Ok(())
}

fn ifindex(ifname: &str) -> Result<u32> {
    check_ifname(ifname)?;
    let name = CString::new(ifname).map_err(|_| AgentError::Invalid("NUL in name".into()))?;
    // SAFETY: NUL-terminated string that lives across the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(AgentError::last_os(format!("if_nametoindex {ifname}")));
    }
    Ok(index)
}

/// A permanent neighbour entry `ip` -> `mac` on `ifname`.
pub fn neigh_add(ifname: &str, ip: Ipv4Addr, mac: [u8; 6]) -> Result<()> {
    let index = ifindex(ifname)?;
    let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    netlink::request(
        libc::NETLINK_ROUTE,
        &netlink::neigh_message(seq, index, ip, mac),
        seq,
        &format!("RTM_NEWNEIGH {ip} on {ifname}"),
    )
}

/// `rdma link add NAME type rxe netdev NETDEV`.
pub fn rdma_link_add(name: &str, netdev: &str) -> Result<()> {
    check_ifname(name)?;
    check_ifname(netdev)?;
    let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    netlink::request(
        libc::NETLINK_RDMA,
        &netlink::rdma_newlink_message(seq, name, "rxe", netdev),
        seq,
        &format!("RDMA_NLDEV_CMD_NEWLINK {name} type rxe netdev {netdev}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_asks_for_address_and_rxe() {
        let (boot, problems) = parse_cmdline(
            "console=ttyS0 p2prig.net=eth0,10.0.2.15/24 quiet p2prig.rxe=rxe0,eth0\n",
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            boot,
            BootNetwork {
                interface: Some(("eth0".into(), Ipv4Addr::new(10, 0, 2, 15), 24)),
                rxe: Some(("rxe0".into(), "eth0".into())),
            }
        );
        let (boot, problems) =
            parse_cmdline("p2prig.net=eth0,10.0.2.15/33 p2prig.rxe=rxe0 p2prig.net=eth0");
        assert_eq!(boot, BootNetwork::default());
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert_eq!(parse_cmdline("console=ttyS0").0, BootNetwork::default());
    }

    #[test]
    fn names_macs_and_masks_are_checked() -> Result<()> {
        assert!(check_ifname("eth0").is_ok());
        for bad in ["", "a/b", "x y", "sixteen-bytes-xx", "..", "eth0:1"] {
            assert!(check_ifname(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_mac("52:54:00:12:34:5f")?,
            [0x52, 0x54, 0, 0x12, 0x34, 0x5f]
        );
        for bad in [
            "52:54:00:12:34",
            "52:54:00:12:34:5g",
            "52-54-00-12-34-56",
            "+2:54:00:12:34:56",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        assert_eq!(netmask(24)?, Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(0)?, Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(netmask(32)?, Ipv4Addr::new(255, 255, 255, 255));
        assert!(netmask(33).is_err());
        assert!(parse_ipv4("10.0.2.256").is_err());
        Ok(())
    }
}
