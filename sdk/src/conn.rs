//! Async frame I/O on a sandbox's control socket.

use std::path::Path;

use msb_protocol::frame::{body_len, decode_body, encode, Frame};
use msb_protocol::message::{Message, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::error::{MicrosandboxError, MicrosandboxResult};

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub(crate) async fn read_frame(
    r: &mut (impl AsyncRead + Unpin),
) -> MicrosandboxResult<Option<Frame>> {
    let mut prefix = [0u8; 4];
    if r.read(&mut prefix[..1]).await? == 0 {
        return Ok(None);
    }
    r.read_exact(&mut prefix[1..]).await?;
    let len = body_len(prefix)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(Some(decode_body(&body)?))
}

/// Writes one frame.
pub(crate) async fn write_frame(
    w: &mut (impl AsyncWrite + Unpin),
    frame: &Frame,
) -> MicrosandboxResult<()> {
    w.write_all(&encode(frame)?).await?;
    Ok(())
}

/// Connects to a control socket and completes the Hello/Ready exchange.
pub(crate) async fn open(control: &Path) -> MicrosandboxResult<(OwnedReadHalf, OwnedWriteHalf)> {
    open_with(control, None).await
}

/// Connects to a control socket, sends `Hello` and `first` together (the agent takes
/// frames in order, so the request needs no round trip of its own before it), and
/// completes the Hello/Ready exchange; the answer to `first` is the next frame to read.
pub(crate) async fn open_with(
    control: &Path,
    first: Option<&Frame>,
) -> MicrosandboxResult<(OwnedReadHalf, OwnedWriteHalf)> {
    let stream = UnixStream::connect(control).await?;
    let (mut r, mut w) = stream.into_split();
    let mut out = encode(&Frame::new(
        0,
        Message::Hello {
            version: PROTOCOL_VERSION,
        },
    ))?;
    if let Some(f) = first {
        out.extend_from_slice(&encode(f)?);
    }
    if let Err(e) = w.write_all(&out).await {
        // A relay that refuses the connection (busy, draining) writes its reason and
        // closes, maybe before our request went out: its reason is the better error.
        return match read_frame(&mut r).await {
            Ok(Some(Frame {
                message: Message::Error { kind, message },
                ..
            })) => Err(MicrosandboxError::from_agent(kind, message)),
            _ => Err(e.into()),
        };
    }
    match read_frame(&mut r).await? {
        Some(Frame {
            message: Message::Ready { version, .. },
            ..
        }) if version == PROTOCOL_VERSION => Ok((r, w)),
        Some(Frame {
            message: Message::Ready { version, .. },
            ..
        }) => Err(MicrosandboxError::Version(format!(
            "the agent speaks version {version}, this SDK {PROTOCOL_VERSION}"
        ))),
        Some(Frame {
            message: Message::Error { kind, message },
            ..
        }) => Err(MicrosandboxError::from_agent(kind, message)),
        Some(other) => Err(MicrosandboxError::Agent(format!(
            "expected Ready, got {:?}",
            other.message
        ))),
        None => Err(MicrosandboxError::ConnectionClosed),
    }
}

/// One request the VMM's relay answers itself (`Drain`, `Detach`: no Hello, no guest),
/// within `timeout`; an `Error` answer is the typed error.
pub(crate) async fn relay_request(
    control: &Path,
    message: Message,
    timeout: std::time::Duration,
) -> MicrosandboxResult<Message> {
    let exchange = async {
        let mut stream = UnixStream::connect(control).await?;
        write_frame(&mut stream, &Frame::new(1, message)).await?;
        match read_frame(&mut stream).await? {
            Some(Frame {
                message: Message::Error { kind, message },
                ..
            }) => Err(MicrosandboxError::from_agent(kind, message)),
            Some(f) => Ok(f.message),
            None => Err(MicrosandboxError::ConnectionClosed),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(MicrosandboxError::AgentUnavailable(format!(
                "the VMM did not answer within {}s",
                timeout.as_secs()
            )))
        })
}
