//! Frames the agent sends back on a connection: one writer per connection, shared by the
//! threads of its sessions (each frame is written whole under its lock).

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};

use msb_protocol::frame::{write_frame, Frame};
use msb_protocol::message::{ErrorKind, Message};

/// The write half of a connection.
pub(crate) type Writer = Arc<Mutex<File>>;

/// Sends one frame; false once the client is gone.
pub(crate) fn send(w: &Writer, frame: &Frame) -> bool {
    let mut f = w.lock().unwrap_or_else(|p| p.into_inner());
    write_frame(&mut *f, frame).is_ok()
}

/// Sends `data` as one `FsData` frame without copying it into a message first.
pub(crate) fn send_fs_data(w: &Writer, id: u32, data: &[u8]) -> bool {
    let Ok(header) = msb_protocol::frame::fs_data_header(id, data.len()) else {
        return false;
    };
    let mut f = w.lock().unwrap_or_else(|p| p.into_inner());
    f.write_all(&header)
        .and_then(|()| f.write_all(data))
        .is_ok()
}

/// Sends a typed error that ends session `id` (0: the connection).
pub(crate) fn error(w: &Writer, id: u32, kind: ErrorKind, message: impl Into<String>) {
    send(
        w,
        &Frame::new(
            id,
            Message::Error {
                kind,
                message: message.into(),
            },
        )
        .end(),
    );
}
