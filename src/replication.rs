//! PostgreSQL's physical streaming replication protocol, the client's side — just what the WAL
//! tip needs: connect over the unix socket as the database's OS user (peer authentication, like
//! [`crate::pg`]), `IDENTIFY_SYSTEM`, `START_REPLICATION PHYSICAL … TIMELINE …` without a slot,
//! then the server's WAL as it is flushed and the client's standby status updates.
//!
//! Why by hand: tokio-postgres does not speak the replication sub-protocol, and pg_receivewal
//! writes into pre-zeroed 16 MiB `.partial` files whose valid length only the server knows —
//! reading them would mean asking `pg_stat_replication` how far they are good. Here every byte
//! arrives with its LSN, in memory, and what the client reports as flushed is what it chooses
//! (the tip reports what S3 holds). The protocol is small and stable since PostgreSQL 10
//! (protocol.sgml, "Streaming Replication Protocol"); every message the server sends is bounded
//! before it is read.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// A WAL position (an LSN), as the protocol carries it.
pub type Lsn = u64;

fn lsn_text(l: Lsn) -> String {
    format!("{:X}/{:X}", l >> 32, l & 0xffff_ffff)
}

fn parse_lsn(s: &str) -> Option<Lsn> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from(u32::from_str_radix(hi, 16).ok()?) << 32) | u64::from(u32::from_str_radix(lo, 16).ok()?))
}

/// The largest message accepted from the server: walsender sends at most 128 KiB of WAL per
/// message (`MAX_SEND_SIZE`); error texts and rows are far smaller.
const MAX_MESSAGE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ReplError {
    #[error("cannot connect to {socket} as {user}: {why}")]
    Connect { socket: String, user: String, why: String },
    #[error("PostgreSQL: {0}")]
    Server(String),
    #[error("the replication connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the replication protocol: {0}")]
    Protocol(String),
}

/// What `IDENTIFY_SYSTEM` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct System {
    pub system_identifier: u64,
    pub timeline: u32,
    /// The server's current flush position.
    pub flush: Lsn,
}

/// A message of the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    /// WAL from `start` on; `server_end` is how far the server has flushed.
    Data { start: Lsn, server_end: Lsn, bytes: Vec<u8> },
    /// The server is alive at `server_end`, and wants a status update now when `reply`.
    Keepalive { server_end: Lsn, reply: bool },
    /// The timeline ended (the server was promoted or is shutting down): reconnect.
    End,
}

/// A connection, before streaming.
pub struct Replication {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

/// The read side while streaming.
pub struct Stream {
    r: BufReader<OwnedReadHalf>,
}

/// The write side while streaming.
pub struct Feedback {
    w: OwnedWriteHalf,
}

fn cstr(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(s.as_bytes());
    buf.push(0);
}

/// Reads one message: its type and body (bounded).
async fn read_message(r: &mut BufReader<OwnedReadHalf>) -> Result<(u8, Vec<u8>), ReplError> {
    let tag = r.read_u8().await?;
    let len = r.read_u32().await? as usize;
    if !(4..=MAX_MESSAGE).contains(&len) {
        return Err(ReplError::Protocol(format!("a message of {len} bytes (type {:?})", tag as char)));
    }
    let mut body = vec![0u8; len - 4];
    r.read_exact(&mut body).await?;
    Ok((tag, body))
}

/// The severity, code and message of an ErrorResponse (never its DETAIL, which can quote data).
fn error_text(body: &[u8]) -> String {
    let (mut severity, mut code, mut message) = ("", "", String::new());
    for field in body.split(|b| *b == 0) {
        let Some((&t, v)) = field.split_first() else { continue };
        let v = std::str::from_utf8(v).unwrap_or("?");
        match t {
            b'S' => severity = if severity.is_empty() { v } else { severity },
            b'V' => severity = v,
            b'C' => code = v,
            b'M' => message = v.chars().take(500).collect(),
            _ => {}
        }
    }
    format!("{severity} {code}: {message}")
}

fn be_u64(b: &[u8], at: usize) -> Result<u64, ReplError> {
    b.get(at..at + 8)
        .map(|s| u64::from_be_bytes(s.try_into().expect("8 bytes")))
        .ok_or_else(|| ReplError::Protocol(format!("a message of {} bytes is too short", b.len())))
}

impl Replication {
    /// Connects to the server at `socket` as `user` (peer authentication), in replication mode.
    pub async fn connect(socket: &Path, user: &str, application: &str, timeout: Duration) -> Result<Self, ReplError> {
        let work = async {
            let stream = crate::pg::connect_socket_as(socket, user).await.map_err(|e| ReplError::Connect {
                socket: socket.display().to_string(),
                user: user.into(),
                why: e.to_string(),
            })?;
            let (r, w) = stream.into_split();
            let mut c = Replication { r: BufReader::with_capacity(256 << 10, r), w };
            let mut body = Vec::new();
            body.extend_from_slice(&196_608u32.to_be_bytes()); // protocol 3.0
            for (k, v) in [("user", user), ("replication", "true"), ("application_name", application)] {
                cstr(&mut body, k);
                cstr(&mut body, v);
            }
            body.push(0);
            let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
            msg.extend_from_slice(&body);
            c.w.write_all(&msg).await?;
            loop {
                let (tag, body) = read_message(&mut c.r).await?;
                match tag {
                    b'R' => {
                        let code = body.get(..4).map(|b| u32::from_be_bytes(b.try_into().expect("4"))).unwrap_or(99);
                        if code != 0 {
                            return Err(ReplError::Connect {
                                socket: socket.display().to_string(),
                                user: user.into(),
                                why: format!(
                                    "PostgreSQL asks for a password (authentication request {code}); caretaker \
                                     connects by peer authentication only: pg_hba.conf needs `local replication \
                                     {user} peer`"
                                ),
                            });
                        }
                    }
                    b'E' => return Err(ReplError::Server(error_text(&body))),
                    b'Z' => return Ok(c),
                    _ => {} // ParameterStatus, BackendKeyData, NoticeResponse
                }
            }
        };
        tokio::time::timeout(timeout, work).await.map_err(|_| ReplError::Connect {
            socket: socket.display().to_string(),
            user: user.into(),
            why: format!("no answer within {} s", timeout.as_secs()),
        })?
    }

    async fn query(&mut self, sql: &str) -> Result<(), ReplError> {
        let mut body = Vec::new();
        cstr(&mut body, sql);
        let mut msg = vec![b'Q'];
        msg.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        msg.extend_from_slice(&body);
        self.w.write_all(&msg).await?;
        Ok(())
    }

    /// `IDENTIFY_SYSTEM`.
    pub async fn identify(&mut self) -> Result<System, ReplError> {
        self.query("IDENTIFY_SYSTEM").await?;
        let mut row: Option<Vec<Option<String>>> = None;
        loop {
            let (tag, body) = read_message(&mut self.r).await?;
            match tag {
                b'D' => row = Some(data_row(&body)?),
                b'E' => return Err(ReplError::Server(error_text(&body))),
                b'Z' => break,
                _ => {}
            }
        }
        let row = row.ok_or_else(|| ReplError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let col = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        let bad = |what: &str, v: String| ReplError::Protocol(format!("IDENTIFY_SYSTEM's {what} is {v:?}"));
        Ok(System {
            system_identifier: col(0).parse().map_err(|_| bad("systemid", col(0)))?,
            timeline: col(1).parse().ok().filter(|t| *t > 0).ok_or_else(|| bad("timeline", col(1)))?,
            flush: parse_lsn(&col(2)).ok_or_else(|| bad("xlogpos", col(2)))?,
        })
    }

    /// `START_REPLICATION PHYSICAL start TIMELINE timeline` (no slot): the stream and its
    /// feedback side.
    pub async fn start(mut self, timeline: u32, start: Lsn) -> Result<(Stream, Feedback), ReplError> {
        self.query(&format!("START_REPLICATION PHYSICAL {} TIMELINE {timeline}", lsn_text(start))).await?;
        loop {
            let (tag, body) = read_message(&mut self.r).await?;
            match tag {
                b'W' => return Ok((Stream { r: self.r }, Feedback { w: self.w })),
                b'E' => return Err(ReplError::Server(error_text(&body))),
                b'N' | b'S' => {}
                t => return Err(ReplError::Protocol(format!("START_REPLICATION answered {:?}", t as char))),
            }
        }
    }
}

fn data_row(body: &[u8]) -> Result<Vec<Option<String>>, ReplError> {
    let short = || ReplError::Protocol("a short data row".into());
    let n = u16::from_be_bytes(body.get(..2).ok_or_else(short)?.try_into().expect("2")) as usize;
    let mut at = 2;
    let mut cols = Vec::with_capacity(n);
    for _ in 0..n {
        let len = i32::from_be_bytes(body.get(at..at + 4).ok_or_else(short)?.try_into().expect("4"));
        at += 4;
        if len < 0 {
            cols.push(None);
            continue;
        }
        let v = body.get(at..at + len as usize).ok_or_else(short)?;
        at += len as usize;
        cols.push(Some(String::from_utf8_lossy(v).into_owned()));
    }
    Ok(cols)
}

impl Stream {
    /// The next message (not cancel-safe: read it from one task).
    pub async fn next(&mut self) -> Result<Message, ReplError> {
        loop {
            let (tag, body) = read_message(&mut self.r).await?;
            match tag {
                b'd' => match body.first() {
                    Some(b'w') => {
                        if body.len() < 25 {
                            return Err(ReplError::Protocol("a short XLogData message".into()));
                        }
                        return Ok(Message::Data {
                            start: be_u64(&body, 1)?,
                            server_end: be_u64(&body, 9)?,
                            bytes: body[25..].to_vec(),
                        });
                    }
                    Some(b'k') => {
                        return Ok(Message::Keepalive {
                            server_end: be_u64(&body, 1)?,
                            reply: body.get(17).is_some_and(|b| *b != 0),
                        });
                    }
                    other => {
                        return Err(ReplError::Protocol(format!(
                            "unknown CopyData message {:?}",
                            other.map(|b| *b as char)
                        )));
                    }
                },
                b'c' | b'C' | b'Z' => return Ok(Message::End),
                b'E' => return Err(ReplError::Server(error_text(&body))),
                b'N' | b'S' => {}
                t => return Err(ReplError::Protocol(format!("unexpected message {:?} while streaming", t as char))),
            }
        }
    }
}

/// Microseconds since 2000-01-01, PostgreSQL's clock.
fn pg_now() -> i64 {
    let unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_micros() as i64;
    unix - 946_684_800_000_000
}

impl Feedback {
    /// A standby status update: received up to `written`, safe up to `flushed`.
    pub async fn report(&mut self, written: Lsn, flushed: Lsn) -> Result<(), ReplError> {
        let mut msg = vec![b'd'];
        msg.extend_from_slice(&(4u32 + 1 + 8 * 4 + 1).to_be_bytes());
        msg.push(b'r');
        for v in [written, flushed, flushed] {
            msg.extend_from_slice(&v.to_be_bytes());
        }
        msg.extend_from_slice(&pg_now().to_be_bytes());
        msg.push(0);
        self.w.write_all(&msg).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_responses_give_severity_code_and_message_only() {
        let body = b"SERROR\0VERROR\0C42501\0Mmust be superuser or replication role\0Dsecret row\0\0";
        let t = error_text(body);
        assert_eq!(t, "ERROR 42501: must be superuser or replication role");
        assert!(!t.contains("secret"));
    }

    #[test]
    fn data_rows_are_bounded_by_their_message() {
        let mut row = vec![0, 2];
        row.extend_from_slice(&3i32.to_be_bytes());
        row.extend_from_slice(b"abc");
        row.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(data_row(&row).unwrap(), vec![Some("abc".to_string()), None]);
        let mut lying = vec![0, 1];
        lying.extend_from_slice(&1000i32.to_be_bytes());
        lying.extend_from_slice(b"abc");
        assert!(data_row(&lying).is_err());
    }
}
