//! The sandbox network in the VMM: the `msb-net` proxy as the backend of the virtio-net
//! device (the device crate knows only its `NetBackend` seam, the proxy crate neither).

use std::os::fd::RawFd;
use std::time::Duration;

use msb_devices::virtio::net::{LinkFeatures, NetBackend};
use msb_net::Proxy;

/// The proxy behind a virtio-net device.
#[derive(Debug)]
pub struct ProxyBackend(pub Proxy);

impl NetBackend for ProxyBackend {
    fn activate(&mut self, link: LinkFeatures) {
        self.0.activate(link.guest_csum, link.mtu);
    }

    fn wait_fd(&self) -> RawFd {
        self.0.wait_fd()
    }

    fn poll_delay(&mut self) -> Option<Duration> {
        self.0.poll_delay()
    }

    fn send_frame(&mut self, frame: &[u8]) -> bool {
        self.0.send_frame(frame)
    }

    fn poll(&mut self) {
        self.0.poll();
    }

    fn recv_frame(&mut self, buf: &mut [u8]) -> Option<usize> {
        self.0.recv_frame(buf)
    }
}
