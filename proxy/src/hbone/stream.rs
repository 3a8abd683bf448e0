//! Moving bytes between a TCP socket and an HBONE stream (an HTTP/2 CONNECT tunnel).
//!
//! Written out instead of adapting the stream to `AsyncRead`/`AsyncWrite` for the generic
//! copy: that adapter costs a copy each way (into a fresh `Bytes` on write, out of h2's
//! buffer on read). Here bytes read from TCP go into a `BytesMut` whose filled part is handed
//! to h2 as is, and DATA frames from h2 are written to TCP straight from h2's buffers.
//!
//! Backpressure is HTTP/2 flow control: data is sent only within the send capacity the peer
//! granted, and received data returns its window only once written to TCP, so a slow reader
//! slows the writer instead of growing a buffer. TCP EOF is END_STREAM and the reverse (half
//! close both ways). On any failure the caller drops the tunnel, which resets the stream.

use std::future::poll_fn;
use std::io;
use std::task::Poll;

use bytes::{BufMut, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One CONNECT stream: what we send and what we receive.
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    /// This side has already ended the stream (END_STREAM sent): the client's app closed its
    /// side before the CONNECT answer. The relay then only carries the other direction.
    pub ended: bool,
}

pub(crate) fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    let kind = if e.is_reset() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::BrokenPipe
    };
    io::Error::new(kind, e)
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream closed")
}

/// First read buffer of a connection: most connections (requests, responses, health checks)
/// never need more, and a thousand idle connections must not pin a thousand large buffers.
pub const INITIAL_BUFFER: usize = 4 << 10;

/// Plaintext bytes of a full TLS record.
const TLS_RECORD: usize = 16 << 10;
/// Bytes of an HTTP/2 frame header.
const FRAME_HEADER: usize = 9;

/// The largest payload up to `size` whose frame fills whole TLS records (or `size` itself,
/// below one record).
fn aligned(size: usize) -> usize {
    if size + FRAME_HEADER <= TLS_RECORD {
        return size;
    }
    (size + FRAME_HEADER) / TLS_RECORD * TLS_RECORD - FRAME_HEADER
}

/// TCP → stream until TCP EOF (then END_STREAM); returns the bytes moved. The read buffer
/// starts at [`INITIAL_BUFFER`] and doubles, up to `buffer`, each time a read fills it (a bulk
/// transfer), so memory follows the traffic instead of the connection count.
async fn tcp_to_stream(
    rd: &mut tokio::net::tcp::ReadHalf<'_>,
    send: &mut SendStream<Bytes>,
    buffer: usize,
) -> io::Result<u64> {
    let mut size = INITIAL_BUFFER.min(buffer);
    let mut buf = BytesMut::new();
    let mut total = 0u64;
    loop {
        if buf.capacity() < size / 2 {
            // Reclaims the previous allocation when h2 is done with it.
            buf.reserve(size);
        }
        // One read becomes one DATA frame; its 9-byte header plus the payload fill whole TLS
        // records (16 KiB of plaintext each) when the payload is a multiple of 16 KiB minus
        // the header. A 64 KiB payload would end in a record carrying 9 bytes: one more
        // record to seal, send, receive and open per frame.
        let room = aligned(size).min(buf.capacity() - buf.len());
        let n = rd.read_buf(&mut (&mut buf).limit(room)).await?;
        if n == 0 {
            // The client is done sending: its connection is only finishing now.
            crate::workers::closing();
            send.send_data(Bytes::new(), true).map_err(h2_io)?;
            return Ok(total);
        }
        if n == room && size < buffer {
            size = (size * 2).min(buffer);
        }
        total += n as u64;
        let mut chunk = buf.split().freeze();
        while !chunk.is_empty() {
            send.reserve_capacity(chunk.len());
            let granted = poll_fn(|cx| send.poll_capacity(cx))
                .await
                .ok_or_else(closed)?
                .map_err(h2_io)?;
            if granted == 0 {
                continue;
            }
            let part = chunk.split_to(granted.min(chunk.len()));
            send.send_data(part, false).map_err(h2_io)?;
        }
    }
}

/// A write to TCP takes, behind a bulk DATA frame, the frames h2 already holds, up to this many
/// bytes ([`stream_to_tcp`]).
const WRITE_BATCH: usize = 512 << 10;
/// And at most this many frames.
const WRITE_SLICES: usize = 16;

/// Stream → TCP until END_STREAM (then TCP half-close); returns the bytes moved.
///
/// Behind a frame of a full TLS record or more (bulk), the frames h2 has already received join
/// the same `writev`: each write to an app in the same pod wakes it, so fewer writes are fewer
/// wake-ups and fewer system calls per byte. A small frame (a request, an answer) is written
/// alone, at once, without looking further.
async fn stream_to_tcp(
    recv: &mut RecvStream,
    wr: &mut tokio::net::tcp::WriteHalf<'_>,
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut batch: Vec<Bytes> = Vec::new();
    while let Some(data) = recv.data().await {
        batch.push(data.map_err(h2_io)?);
        let mut len = batch[0].len();
        let (mut ended, mut failed) = (false, None);
        if len + FRAME_HEADER >= TLS_RECORD {
            while len < WRITE_BATCH && batch.len() < WRITE_SLICES {
                match poll_fn(|cx| Poll::Ready(recv.poll_data(cx))).await {
                    Poll::Ready(Some(Ok(more))) => {
                        len += more.len();
                        batch.push(more);
                    }
                    // What came before the failure is written first, as it would have been
                    // frame by frame.
                    Poll::Ready(Some(Err(e))) => {
                        failed = Some(h2_io(e));
                        break;
                    }
                    Poll::Ready(None) => {
                        ended = true;
                        break;
                    }
                    Poll::Pending => break,
                }
            }
        }
        write_all_vectored(wr, &mut batch).await?;
        total += len as u64;
        // A download behind a half-closed request keeps its worker counted as busy.
        crate::workers::sent_to_client(len);
        let _ = recv.flow_control().release_capacity(len);
        if let Some(e) = failed {
            return Err(e);
        }
        if ended {
            break;
        }
    }
    wr.shutdown().await?;
    Ok(total)
}

/// Writes every byte of `bufs` (at most [`WRITE_SLICES`]), in as few `writev` as the socket
/// takes them; leaves `bufs` empty.
async fn write_all_vectored(
    wr: &mut tokio::net::tcp::WriteHalf<'_>,
    bufs: &mut Vec<Bytes>,
) -> io::Result<()> {
    let mut first = 0;
    loop {
        // An empty frame has nothing to write (and a `writev` of nothing would read as a
        // socket that takes no more).
        while bufs.get(first).is_some_and(Bytes::is_empty) {
            first += 1;
        }
        if first == bufs.len() {
            break;
        }
        let mut n = {
            let mut slices = [io::IoSlice::new(&[]); WRITE_SLICES];
            let rest = &bufs[first..];
            for (slice, b) in slices.iter_mut().zip(rest) {
                *slice = io::IoSlice::new(b);
            }
            wr.write_vectored(&slices[..rest.len().min(WRITE_SLICES)])
                .await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let head = &mut bufs[first];
            if n >= head.len() {
                n -= head.len();
                first += 1;
            } else {
                bytes::Buf::advance(head, n);
                n = 0;
            }
        }
    }
    bufs.clear();
    Ok(())
}

/// Copies both ways until both directions ended: (bytes TCP→stream, bytes stream→TCP).
pub async fn copy(tcp: &mut TcpStream, tunnel: Tunnel, buffer: usize) -> io::Result<(u64, u64)> {
    let Tunnel {
        mut send,
        mut recv,
        ended,
    } = tunnel;
    let (mut rd, mut wr) = tcp.split();
    let up = async {
        if ended {
            // Its EOF was read and sent already; a second END_STREAM would be an error.
            return Ok(0);
        }
        tcp_to_stream(&mut rd, &mut send, buffer).await
    };
    tokio::try_join!(up, stream_to_tcp(&mut recv, &mut wr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::{DOWNLOAD_AFTER_CLOSE, Workers, until};
    use std::sync::Arc;
    use std::time::Duration;

    /// The client side of a CONNECT over `io` (the caller serves the other side), its stream
    /// and connection windows `window`, and a TCP pair on loopback: (the tunnel, the app's
    /// socket, the relay's socket).
    async fn tunnel_and_app(
        io: tokio::io::DuplexStream,
        window: u32,
    ) -> (Tunnel, TcpStream, TcpStream) {
        let (mut h2, conn) = h2::client::Builder::new()
            .initial_window_size(window)
            .initial_connection_window_size(window)
            .handshake(io)
            .await
            .unwrap();
        tokio::spawn(conn);
        let connect = http::Request::connect("10.0.0.1:80").body(()).unwrap();
        let (answer, send) = h2.send_request(connect, false).unwrap();
        let recv = answer.await.unwrap().into_body();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let tunnel = Tunnel {
            send,
            recv,
            ended: false,
        };
        (tunnel, app, tcp)
    }

    /// A relay on a data-path worker: once the app half-closes, its connection stops counting
    /// toward the worker's load; once more than [`DOWNLOAD_AFTER_CLOSE`] bytes went back to
    /// the app (a download), it counts again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_download_behind_a_half_close_counts_toward_the_workers_load() {
        let workers = Arc::new(Workers::start(1, Duration::ZERO).unwrap());
        // The destination's side of an HBONE stream over an in-memory HTTP/2 connection.
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let (go_tx, go) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let mut send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            let mut body = req.into_body();
            while let Some(d) = body.data().await {
                let _ = body.flow_control().release_capacity(d.unwrap().len());
            }
            let _ = go.await;
            // Sent without END_STREAM: the relay stays open to be looked at.
            let download = vec![7u8; DOWNLOAD_AFTER_CLOSE + 1];
            send.send_data(Bytes::from(download), false).unwrap();
            std::future::pending::<()>().await;
        });
        // HTTP/2's default windows.
        let (tunnel, mut app, tcp) = tunnel_and_app(client_io, 65_535).await;
        workers.run(tcp, move |mut tcp| async move {
            let _ = copy(&mut tcp, tunnel, 64 << 10).await;
        });
        let load_is = async |what: &str, n: usize| until(what, || workers.load_of(0) == n).await;
        load_is("an open connection counts", 1).await;
        app.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        app.shutdown().await.unwrap();
        load_is("a half-closed one does not", 0).await;
        go_tx.send(()).unwrap();
        let mut got = vec![0u8; DOWNLOAD_AFTER_CLOSE + 1];
        app.read_exact(&mut got).await.unwrap();
        load_is("a download behind the half-close counts again", 1).await;
        // Operators see the same load.
        let mut registry = prometheus_client::registry::Registry::default();
        workers.register_metrics(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("ambit_worker_connections{worker=\"0\"} 1\n"),
            "{text}"
        );
    }

    /// Frames h2 already holds go to TCP in batched writes: every byte arrives once and in
    /// order, through partial writes to a socket that takes a few KiB at a time, small and
    /// empty frames between bulk ones included, and END_STREAM behind the last frame is the
    /// app's EOF.
    #[tokio::test]
    async fn queued_frames_reach_the_app_once_and_in_order() {
        // Empty frames too (HTTP/2 allows them, peers send them): nothing to write for them.
        let sizes: Vec<usize> = (0..60)
            .map(|i| match [16_375, 0, 130_000, 40_000, 7, 0][i % 6] {
                0 => 0,
                n => n + i,
            })
            .collect();
        let frame = |i: usize, n: usize| (0..n).map(move |j| (i * 31 + j) as u8);
        let expected: Vec<u8> = sizes
            .iter()
            .enumerate()
            .flat_map(|(i, &n)| frame(i, n))
            .collect();
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let frames = sizes.clone();
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io).await.unwrap();
            let (_req, mut respond) = conn.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let mut send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            // All queued at once (the client's windows hold them), END_STREAM behind the last.
            for (i, &n) in frames.iter().enumerate() {
                let end = i + 1 == frames.len();
                send.send_data(frame(i, n).collect::<Vec<u8>>().into(), end)
                    .unwrap();
            }
            std::future::pending::<()>().await;
        });
        // Windows that hold every frame.
        let (tunnel, mut app, mut tcp) = tunnel_and_app(client_io, 16 << 20).await;
        // A small send buffer: the relay's writes are cut short and resumed.
        socket2::SockRef::from(&tcp)
            .set_send_buffer_size(4096)
            .unwrap();
        let relay = tokio::spawn(async move { copy(&mut tcp, tunnel, 64 << 10).await });
        let mut got = Vec::new();
        app.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), expected.len(), "bytes the app received");
        assert!(got == expected, "the bytes differ from what was sent");
        app.shutdown().await.unwrap();
        let (up, down) = relay.await.unwrap().unwrap();
        assert_eq!((up, down), (0, expected.len() as u64));
    }

    #[test]
    fn bulk_frames_fill_whole_tls_records() {
        assert_eq!(
            aligned(INITIAL_BUFFER),
            INITIAL_BUFFER,
            "below one record: as is"
        );
        assert_eq!(aligned(64 << 10), (64 << 10) - FRAME_HEADER);
        for size in [TLS_RECORD, 32 << 10, 64 << 10, 100_000, 256 << 10] {
            let payload = aligned(size);
            assert!(payload <= size, "{size}");
            assert_eq!((payload + FRAME_HEADER) % TLS_RECORD, 0, "{size}");
            assert!(
                size - payload < TLS_RECORD,
                "{size}: at most one record less"
            );
        }
    }
}
