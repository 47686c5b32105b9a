//! The guest's network, set up before any command runs: `lo` up always; with a
//! [`GuestNet`] on the kernel command line, `eth0` (the virtio-net device) gets its MTU,
//! address and a default route through the gateway over rtnetlink, and the guest gets an
//! `/etc/resolv.conf` naming the gateway and an `/etc/hosts` with
//! `host.microsandbox.internal`.
//!
//! The two files are written to `/run/msb/` (tmpfs) and bind-mounted over the image's, as
//! Docker does: writing them into the root would go through overlayfs and virtio-fs
//! (copy-up, a dozen FUSE requests), ~2 s of a boot on PVM hosts. Edits in the guest go to
//! the tmpfs copies and last until the VM stops.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use msb_protocol::bootcmd::{self, GuestNet, NET_KEY};
use msb_protocol::network::HOST_NAME;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// One rtnetlink conversation: requests, each acknowledged.
struct Rtnl {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    fn open() -> io::Result<Rtnl> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Rtnl {
            socket,
            seq: 0,
            buf: Vec::with_capacity(8192),
        })
    }

    /// Sends `msg` and waits for the kernel's acknowledgement.
    fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        self.seq += 1;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = self.seq;
        let mut m = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        m.finalize();
        let mut out = vec![0u8; m.buffer_len()];
        m.serialize(&mut out);
        self.socket.send(&out, 0)?;
        loop {
            self.buf.clear();
            let n = self.socket.recv(&mut self.buf, 0)?;
            let mut at = 0;
            while at < n {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[at..n])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = reply.header.length as usize;
                if reply.header.sequence_number == self.seq {
                    if let NetlinkPayload::Error(e) = reply.payload {
                        return match e.code {
                            None => Ok(()),
                            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                        };
                    }
                }
                if len == 0 {
                    break;
                }
                at += len;
            }
        }
    }

    /// Sets a link up, with `mtu` if given.
    fn link_up(&mut self, index: u32, mtu: Option<u16>) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        if let Some(mtu) = mtu {
            m.attributes.push(LinkAttribute::Mtu(u32::from(mtu)));
        }
        self.request(RouteNetlinkMessage::SetLink(m), 0)
    }

    fn add_address(&mut self, index: u32, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.prefix_len = prefix;
        m.header.index = index;
        m.attributes.push(AddressAttribute::Local(IpAddr::V4(addr)));
        m.attributes
            .push(AddressAttribute::Address(IpAddr::V4(addr)));
        let host_bits = u32::MAX.checked_shr(u32::from(prefix)).unwrap_or(0);
        let broadcast = Ipv4Addr::from(u32::from(addr) | host_bits);
        m.attributes.push(AddressAttribute::Broadcast(broadcast));
        self.request(
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    fn default_route(&mut self, index: u32, gateway: Ipv4Addr) -> io::Result<()> {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::Boot;
        m.header.scope = RouteScope::Universe;
        m.header.kind = RouteType::Unicast;
        m.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
        m.attributes.push(RouteAttribute::Oif(index));
        self.request(RouteNetlinkMessage::NewRoute(m), NLM_F_CREATE | NLM_F_EXCL)
    }
}

/// A link's index from sysfs (`if_nametoindex` would open an inet socket only to ask).
fn index_of(name: &str) -> io::Result<u32> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))?;
    text.trim()
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("ifindex {text:?}")))
}

/// The `/etc/hosts` text with `localhost` and the gateway's name in it (lines already
/// there are kept).
fn hosts_with(existing: &str, gateway: Option<Ipv4Addr>) -> String {
    let has = |name: &str| {
        existing.lines().any(|l| {
            let l = l.split('#').next().unwrap_or("");
            l.split_whitespace().skip(1).any(|n| n == name)
        })
    };
    let mut out = existing.to_string();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    if !has("localhost") {
        out.push_str("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    }
    if let Some(gw) = gateway {
        if !has(HOST_NAME) {
            out.push_str(&format!("{gw}\t{HOST_NAME}\n"));
        }
    }
    out
}

/// Makes `path` a plain file to bind over: a symlink there (an image's resolv.conf often
/// points into a runtime directory that is not there) or nothing becomes an empty file.
fn mount_point(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => return Ok(()),
        Ok(m) if m.is_dir() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} is a directory", path.display()),
            ))
        }
        Ok(_) => std::fs::remove_file(path)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::File::create(path).map(drop)
}

/// The guest's resolver files, with `etc` the root's `/etc` and `run` a tmpfs directory:
/// `(name, text)` for `resolv.conf` and `hosts` (the image's hosts lines kept).
fn resolver_files(etc: &Path, gateway: Ipv4Addr) -> [(&'static str, String); 2] {
    let hosts = std::fs::read_to_string(etc.join("hosts")).unwrap_or_default();
    [
        (
            "resolv.conf",
            format!("# written by microsandbox: the sandbox's gateway answers DNS\nnameserver {gateway}\n"),
        ),
        ("hosts", hosts_with(&hosts, Some(gateway))),
    ]
}

/// Writes the resolver files under `run` and binds them over `etc`'s.
fn install_resolver(etc: &Path, run: &Path, gateway: Ipv4Addr) -> io::Result<()> {
    std::fs::create_dir_all(run)?;
    for (name, text) in resolver_files(etc, gateway) {
        let source = run.join(name);
        std::fs::write(&source, text)?;
        let target = etc.join(name);
        mount_point(&target)?;
        nix::mount::mount(
            Some(&source),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| io::Error::other(format!("bind {}: {e}", target.display())))?;
    }
    Ok(())
}

/// Sets the network up as the kernel command line says.
pub fn setup(cmdline: &str) -> Result<(), String> {
    let mut rtnl = Rtnl::open().map_err(|e| format!("cannot open rtnetlink: {e}"))?;
    let lo = index_of("lo").map_err(|e| format!("no loopback device: {e}"))?;
    rtnl.link_up(lo, None)
        .map_err(|e| format!("cannot bring lo up: {e}"))?;
    let Some(value) = bootcmd::find_param(cmdline, NET_KEY) else {
        return Ok(());
    };
    let net = GuestNet::decode(value).ok_or_else(|| format!("malformed {NET_KEY}={value}"))?;
    let eth = index_of("eth0").map_err(|e| format!("no network device eth0: {e}"))?;
    rtnl.link_up(eth, Some(net.mtu))
        .map_err(|e| format!("cannot bring eth0 up with MTU {}: {e}", net.mtu))?;
    rtnl.add_address(eth, net.address, net.prefix)
        .map_err(|e| format!("cannot give eth0 {}/{}: {e}", net.address, net.prefix))?;
    match rtnl.default_route(eth, net.gateway) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(format!("cannot route through {}: {e}", net.gateway)),
    }
    install_resolver(Path::new("/etc"), Path::new("/run/msb"), net.gateway)
        .map_err(|e| format!("cannot set /etc/resolv.conf and /etc/hosts up: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_keep_what_is_there_and_gain_the_gateway() {
        let gw = Ipv4Addr::new(10, 200, 200, 1);
        let text = hosts_with("", Some(gw));
        assert!(text.contains("127.0.0.1\tlocalhost\n"));
        assert!(text.contains("10.200.200.1\thost.microsandbox.internal\n"));
        // Idempotent.
        assert_eq!(hosts_with(&text, Some(gw)), text);
        let image =
            "127.0.0.1 localhost box\n# host.microsandbox.internal in a comment\n10.0.0.9 db";
        let text = hosts_with(image, Some(gw));
        assert!(text.starts_with(image));
        assert_eq!(text.matches("localhost").count(), 1);
        assert!(text.ends_with("10.200.200.1\thost.microsandbox.internal\n"));
    }

    #[test]
    fn resolver_files_and_their_mount_points() {
        let dir = tempfile::tempdir().expect("tempdir");
        let etc = dir.path().join("etc");
        std::fs::create_dir(&etc).expect("etc");
        std::fs::write(etc.join("hosts"), "10.0.0.9 db\n").expect("hosts");
        std::os::unix::fs::symlink(
            "../run/systemd/resolve/stub-resolv.conf",
            etc.join("resolv.conf"),
        )
        .expect("symlink");
        let [(r, conf), (h, hosts)] = resolver_files(&etc, Ipv4Addr::new(10, 200, 200, 1));
        assert_eq!((r, h), ("resolv.conf", "hosts"));
        assert!(conf.contains("nameserver 10.200.200.1\n"));
        assert!(hosts.starts_with("10.0.0.9 db\n"));
        assert!(hosts.contains("host.microsandbox.internal"));
        // A dangling symlink and a missing file become empty files; a file stays.
        mount_point(&etc.join("resolv.conf")).expect("mount point");
        assert!(std::fs::symlink_metadata(etc.join("resolv.conf"))
            .expect("meta")
            .is_file());
        assert!(!dir.path().join("run").exists());
        mount_point(&dir.path().join("new/etc/hosts")).expect("created");
        mount_point(&etc.join("hosts")).expect("kept");
        assert_eq!(
            std::fs::read_to_string(etc.join("hosts")).expect("read"),
            "10.0.0.9 db\n"
        );
        assert!(mount_point(&etc).is_err(), "a directory is refused");
    }
}
