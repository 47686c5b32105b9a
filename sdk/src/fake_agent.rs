//! A fake control socket for the SDK's unit tests: it answers the Hello with Ready, takes
//! one request, and sends what the test scripted, as a hostile guest could.

use std::path::PathBuf;

use msb_protocol::frame::Frame;
use msb_protocol::message::{Message, PROTOCOL_VERSION};
use tokio::net::UnixListener;

use crate::conn;

/// Serves one connection on a fresh socket (in a runtime): Ready, then `answers` on
/// session 1, then holds the connection until the client goes. Keep the directory.
pub(crate) fn serve_once(answers: Vec<Message>) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("control.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    tokio::spawn(async move {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let (mut r, mut w) = stream.into_split();
        // The Hello and the request.
        for _ in 0..2 {
            if !matches!(conn::read_frame(&mut r).await, Ok(Some(_))) {
                return;
            }
        }
        let ready = Message::Ready {
            version: PROTOCOL_VERSION,
            agent: "fake".into(),
        };
        if conn::write_frame(&mut w, &Frame::new(0, ready))
            .await
            .is_err()
        {
            return;
        }
        for m in answers {
            if conn::write_frame(&mut w, &Frame::new(1, m)).await.is_err() {
                return;
            }
        }
        while let Ok(Some(_)) = conn::read_frame(&mut r).await {}
    });
    (dir, path)
}
