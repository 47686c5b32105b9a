//! A [`NetBackend`] double for the device's tests and benchmarks: it records the frames the
//! guest sends, hands the guest frames queued through its [`BackendHandle`], can refuse
//! frames (backpressure) and echo them back (loopback).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{LinkFeatures, NetBackend};

#[derive(Debug, Default)]
struct State {
    sent: Vec<Vec<u8>>,
    to_guest: VecDeque<Vec<u8>>,
    refusing: bool,
    echo: bool,
    links: Vec<LinkFeatures>,
    polls: u64,
    refused: u64,
    poll_delay: Option<Duration>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    wake: EventFd,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake(&self) {
        let _ = self.wake.write(1);
    }
}

/// The backend handed to the device.
#[derive(Debug)]
pub struct RecordingBackend(Arc<Shared>);

/// The test's side of a [`RecordingBackend`].
#[derive(Debug, Clone)]
pub struct BackendHandle(Arc<Shared>);

impl RecordingBackend {
    /// A backend that takes every frame, and the handle to watch and feed it.
    pub fn new() -> (Self, BackendHandle) {
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            wake: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        });
        (RecordingBackend(shared.clone()), BackendHandle(shared))
    }
}

impl BackendHandle {
    /// Frames the guest sent so far.
    pub fn sent(&self) -> Vec<Vec<u8>> {
        self.0.state().sent.clone()
    }

    /// How many frames the guest sent so far.
    pub fn sent_count(&self) -> usize {
        self.0.state().sent.len()
    }

    /// Queues a frame for the guest and wakes the worker.
    pub fn push_frame(&self, frame: &[u8]) {
        self.0.state().to_guest.push_back(frame.to_vec());
        self.0.wake();
    }

    /// Frames still waiting for the guest.
    pub fn pending(&self) -> usize {
        self.0.state().to_guest.len()
    }

    /// Refuses (`true`) or takes (`false`) the guest's frames; taking them again wakes the
    /// worker.
    pub fn set_refusing(&self, refusing: bool) {
        self.0.state().refusing = refusing;
        if !refusing {
            self.0.wake();
        }
    }

    /// Queues every frame the guest sends back to it as well.
    pub fn set_echo(&self, echo: bool) {
        self.0.state().echo = echo;
    }

    /// What `poll_delay` returns.
    pub fn set_poll_delay(&self, delay: Option<Duration>) {
        self.0.state().poll_delay = delay;
        self.0.wake();
    }

    /// The `LinkFeatures` of each activation so far.
    pub fn links(&self) -> Vec<LinkFeatures> {
        self.0.state().links.clone()
    }

    /// Calls of `poll` so far.
    pub fn polls(&self) -> u64 {
        self.0.state().polls
    }

    /// Frames refused so far.
    pub fn refused(&self) -> u64 {
        self.0.state().refused
    }

    /// How many handles and backends share this state (1 once the device dropped its
    /// backend).
    pub fn owners(&self) -> usize {
        Arc::strong_count(&self.0)
    }
}

impl NetBackend for RecordingBackend {
    fn activate(&mut self, link: LinkFeatures) {
        self.0.state().links.push(link);
    }

    fn wait_fd(&self) -> RawFd {
        self.0.wake.as_raw_fd()
    }

    fn poll_delay(&mut self) -> Option<Duration> {
        self.0.state().poll_delay
    }

    fn send_frame(&mut self, frame: &[u8]) -> bool {
        let mut s = self.0.state();
        if s.refusing {
            s.refused += 1;
            return false;
        }
        s.sent.push(frame.to_vec());
        if s.echo {
            s.to_guest.push_back(frame.to_vec());
        }
        true
    }

    fn poll(&mut self) {
        // Level-triggered: consume the wake-up.
        let _ = self.0.wake.read();
        self.0.state().polls += 1;
    }

    fn recv_frame(&mut self, buf: &mut [u8]) -> Option<usize> {
        let frame = self.0.state().to_guest.pop_front()?;
        let n = frame.len();
        match buf.get_mut(..n) {
            Some(dst) => dst.copy_from_slice(&frame),
            // Too large for any buffer: report it as is, the device drops it.
            None => buf.copy_from_slice(&frame[..buf.len()]),
        }
        Some(n)
    }
}
