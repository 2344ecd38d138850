//! WebSocket framing for the load generator: a header parser and a streaming scanner for the
//! server's (unmasked) frames, and an encoder for the client's (masked) frames.
//!
//! The fan-out subscribers must cost far less than the service they measure, so they never decode
//! a message: they parse only the 2-to-14-byte frame headers (RFC 6455 §5.2), skip payloads, and
//! count. Control frames (ping, close) are small (≤ 125 bytes) and always captured, so a ping can
//! be answered and a close code reported. Data payloads are captured only when asked (the
//! subscription ack, and the few subscribers that sample latency).
//!
//! Hand-written on purpose: WebSocket libraries decode (and copy) every payload, which would make
//! the subscribers, not the service, the bottleneck being measured.

use thiserror::Error;

/// Longest possible header: 2 bytes + 8 bytes of extended length + 4 bytes of mask.
pub const MAX_HEADER_LEN: usize = 14;

/// Largest data payload the scanner will capture; beyond it capturing is refused, never grown.
pub const MAX_CAPTURED_PAYLOAD: usize = 1 << 20;

/// Frame opcodes (RFC 6455 §5.2).
pub mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// What is wrong with a frame the server sent. Any of these means the stream is unusable.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("server frame is masked (servers must not mask, RFC 6455 §5.1)")]
    Masked,
    #[error("reserved bits {0:#05b} set without a negotiated extension")]
    ReservedBits(u8),
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    #[error("control frame with opcode {opcode:#x} is fragmented or longer than 125 bytes ({len})")]
    BadControlFrame { opcode: u8, len: u64 },
    #[error("64-bit payload length has its most significant bit set")]
    LengthOverflow,
    #[error("data payload of {0} bytes is too large to capture")]
    CaptureTooLarge(u64),
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: u8,
    pub payload_len: u64,
    /// Bytes the header itself occupies (2, 4 or 10 for unmasked frames).
    pub header_len: usize,
}

impl Header {
    /// Close, ping or pong.
    pub fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }

    /// The last frame of a text or binary message: what the subscribers count as one delivery.
    pub fn ends_message(&self) -> bool {
        self.fin && !self.is_control()
    }
}

/// Parses one server frame header from the start of `buf`.
///
/// Returns `Ok(None)` when `buf` holds only part of the header.
pub fn parse_header(buf: &[u8]) -> Result<Option<Header>, FrameError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    let fin = b0 & 0x80 != 0;
    let rsv = (b0 >> 4) & 0x7;
    if rsv != 0 {
        return Err(FrameError::ReservedBits(rsv));
    }
    let op = b0 & 0x0F;
    if !matches!(
        op,
        opcode::CONTINUATION
            | opcode::TEXT
            | opcode::BINARY
            | opcode::CLOSE
            | opcode::PING
            | opcode::PONG
    ) {
        return Err(FrameError::UnknownOpcode(op));
    }
    if b1 & 0x80 != 0 {
        return Err(FrameError::Masked);
    }
    let (payload_len, header_len) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(ext) => (u64::from(u16::from_be_bytes([ext[0], ext[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(ext) => {
                let mut be = [0u8; 8];
                be.copy_from_slice(ext);
                let len = u64::from_be_bytes(be);
                if len >> 63 != 0 {
                    return Err(FrameError::LengthOverflow);
                }
                (len, 10)
            }
            None => return Ok(None),
        },
        short => (u64::from(short), 2),
    };
    let header = Header {
        fin,
        opcode: op,
        payload_len,
        header_len,
    };
    if header.is_control() && (!fin || payload_len > 125) {
        return Err(FrameError::BadControlFrame {
            opcode: op,
            len: payload_len,
        });
    }
    Ok(Some(header))
}

/// Streaming frame scanner: feed it whatever `read()` returned, in any split, and it reports
/// each completed frame.
#[derive(Debug, Default)]
pub struct Scanner {
    /// Capture data-frame payloads too (control payloads are always captured).
    pub capture_data: bool,
    partial_header: [u8; MAX_HEADER_LEN],
    partial_len: usize,
    current: Option<Header>,
    remaining: u64,
    payload: Vec<u8>,
}

impl Scanner {
    /// A scanner that skips data payloads.
    pub fn new() -> Self {
        Self::default()
    }

    /// A scanner that also captures data payloads.
    pub fn capturing() -> Self {
        Self {
            capture_data: true,
            ..Self::default()
        }
    }

    fn captures(&self, header: &Header) -> bool {
        header.is_control() || self.capture_data
    }

    /// Consumes `data`, calling `on_frame(header, payload)` for every frame completed in it.
    /// `payload` is the frame's payload when captured, empty otherwise.
    pub fn feed<F>(&mut self, data: &[u8], mut on_frame: F) -> Result<(), FrameError>
    where
        F: FnMut(&Header, &[u8]),
    {
        let mut pos = 0;
        while pos < data.len() {
            let Some(header) = self.current else {
                let Some((header, used)) = self.take_header(&data[pos..])? else {
                    return Ok(());
                };
                pos += used;
                self.start_frame(header)?;
                self.finish_if_complete(&mut on_frame);
                continue;
            };
            let available = (data.len() - pos) as u64;
            let take = self.remaining.min(available) as usize;
            if self.captures(&header) {
                self.payload.extend_from_slice(&data[pos..pos + take]);
            }
            pos += take;
            self.remaining -= take as u64;
            self.finish_if_complete(&mut on_frame);
        }
        Ok(())
    }

    /// Parses a header from any carried-over bytes plus `data`. Returns the header and how many
    /// bytes of `data` it used, or `None` after stashing an incomplete header.
    fn take_header(&mut self, data: &[u8]) -> Result<Option<(Header, usize)>, FrameError> {
        if self.partial_len == 0 {
            // Fast path: the whole header is in this read, no copy.
            if let Some(header) = parse_header(data)? {
                return Ok(Some((header, header.header_len)));
            }
            self.partial_header[..data.len()].copy_from_slice(data);
            self.partial_len = data.len();
            return Ok(None);
        }
        let before = self.partial_len;
        let add = (MAX_HEADER_LEN - before).min(data.len());
        self.partial_header[before..before + add].copy_from_slice(&data[..add]);
        self.partial_len += add;
        match parse_header(&self.partial_header[..self.partial_len])? {
            Some(header) => {
                self.partial_len = 0;
                Ok(Some((header, header.header_len - before)))
            }
            None => Ok(None),
        }
    }

    fn start_frame(&mut self, header: Header) -> Result<(), FrameError> {
        if !header.is_control()
            && self.capture_data
            && header.payload_len > MAX_CAPTURED_PAYLOAD as u64
        {
            return Err(FrameError::CaptureTooLarge(header.payload_len));
        }
        self.current = Some(header);
        self.remaining = header.payload_len;
        self.payload.clear();
        Ok(())
    }

    fn finish_if_complete<F>(&mut self, on_frame: &mut F)
    where
        F: FnMut(&Header, &[u8]),
    {
        if self.remaining == 0
            && let Some(header) = self.current.take()
        {
            on_frame(&header, &self.payload);
        }
    }
}

/// Encodes one client frame (FIN set, masked with `mask` as RFC 6455 requires of clients).
pub fn encode_client_frame(op: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + MAX_HEADER_LEN);
    out.push(0x80 | (op & 0x0F));
    match payload.len() {
        len @ 0..=125 => out.push(0x80 | len as u8),
        len @ 126..=0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// The status code carried by a close frame's payload, if any.
pub fn close_code(payload: &[u8]) -> Option<u16> {
    match payload {
        [hi, lo, ..] => Some(u16::from_be_bytes([*hi, *lo])),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unmasked server frame, built independently of the parser under test.
    fn server_frame(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | op];
        let len = payload.len();
        if len < 126 {
            out.push(len as u8);
        } else if len <= 0xFFFF {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(payload);
        out
    }

    fn collect(scanner: &mut Scanner, chunks: &[&[u8]]) -> Vec<(Header, Vec<u8>)> {
        let mut frames = Vec::new();
        for chunk in chunks {
            scanner
                .feed(chunk, |h, p| frames.push((*h, p.to_vec())))
                .expect("valid server frames");
        }
        frames
    }

    #[test]
    fn seven_bit_length() {
        let h = parse_header(&[0x81, 5, b'h'])
            .expect("valid")
            .expect("complete");
        assert_eq!(
            h,
            Header {
                fin: true,
                opcode: opcode::TEXT,
                payload_len: 5,
                header_len: 2
            }
        );
        assert!(h.ends_message());
    }

    #[test]
    fn sixteen_bit_length() {
        let h = parse_header(&[0x81, 126, 0x01, 0x00])
            .expect("valid")
            .expect("complete");
        assert_eq!((h.payload_len, h.header_len), (256, 4));
    }

    #[test]
    fn sixty_four_bit_length() {
        let mut buf = vec![0x82, 127];
        buf.extend_from_slice(&70_000u64.to_be_bytes());
        let h = parse_header(&buf).expect("valid").expect("complete");
        assert_eq!(
            (h.opcode, h.payload_len, h.header_len),
            (opcode::BINARY, 70_000, 10)
        );
    }

    #[test]
    fn incomplete_headers_ask_for_more() {
        assert_eq!(parse_header(&[]), Ok(None));
        assert_eq!(parse_header(&[0x81]), Ok(None));
        assert_eq!(parse_header(&[0x81, 126, 0x01]), Ok(None));
        assert_eq!(parse_header(&[0x81, 127, 0, 0, 0, 0, 0, 0, 1]), Ok(None));
    }

    #[test]
    fn rejects_what_a_server_must_not_send() {
        assert_eq!(parse_header(&[0x81, 0x85]), Err(FrameError::Masked));
        assert_eq!(
            parse_header(&[0xC1, 1]),
            Err(FrameError::ReservedBits(0b100))
        );
        assert_eq!(parse_header(&[0x83, 1]), Err(FrameError::UnknownOpcode(3)));
        assert_eq!(
            parse_header(&[0x09, 0]),
            Err(FrameError::BadControlFrame {
                opcode: opcode::PING,
                len: 0
            })
        );
        assert_eq!(
            parse_header(&[0x89, 126, 0, 126]),
            Err(FrameError::BadControlFrame {
                opcode: opcode::PING,
                len: 126
            })
        );
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&(1u64 << 63).to_be_bytes());
        assert_eq!(parse_header(&huge), Err(FrameError::LengthOverflow));
    }

    #[test]
    fn counts_frames_and_skips_data_payloads() {
        let mut stream = server_frame(true, opcode::TEXT, b"{\"op\":\"event\"}");
        stream.extend(server_frame(true, opcode::TEXT, &[b'x'; 300]));
        stream.extend(server_frame(true, opcode::PING, b"hi"));
        stream.extend(server_frame(true, opcode::TEXT, &[]));
        let frames = collect(&mut Scanner::new(), &[&stream]);
        let summary: Vec<(u8, u64, Vec<u8>)> = frames
            .into_iter()
            .map(|(h, p)| (h.opcode, h.payload_len, p))
            .collect();
        assert_eq!(
            summary,
            vec![
                (opcode::TEXT, 14, vec![]),
                (opcode::TEXT, 300, vec![]),
                (opcode::PING, 2, b"hi".to_vec()),
                (opcode::TEXT, 0, vec![]),
            ]
        );
    }

    #[test]
    fn any_split_gives_the_same_frames() {
        let mut stream = server_frame(true, opcode::TEXT, b"first");
        stream.extend(server_frame(true, opcode::TEXT, &[7u8; 200]));
        stream.extend(server_frame(true, opcode::BINARY, &vec![9u8; 70_000]));
        stream.extend(server_frame(false, opcode::TEXT, b"par"));
        stream.extend(server_frame(true, opcode::CONTINUATION, b"ts"));
        stream.extend(server_frame(true, opcode::CLOSE, &[0x03, 0xE9]));
        let whole = collect(&mut Scanner::capturing(), &[&stream]);
        assert_eq!(whole.len(), 6);
        assert_eq!(whole[1].1, vec![7u8; 200]);
        assert_eq!(whole[2].0.payload_len, 70_000);
        assert_eq!(whole.iter().filter(|(h, _)| h.ends_message()).count(), 4);
        assert_eq!(close_code(&whole[5].1), Some(1001));

        let byte_by_byte: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(collect(&mut Scanner::capturing(), &byte_by_byte), whole);
        for size in [2, 3, 5, 13, 14, 15, 127, 4096] {
            let chunks: Vec<&[u8]> = stream.chunks(size).collect();
            assert_eq!(
                collect(&mut Scanner::capturing(), &chunks),
                whole,
                "chunks of {size}"
            );
        }
    }

    #[test]
    fn header_split_inside_extended_length() {
        let frame = server_frame(true, opcode::TEXT, &[1u8; 1000]);
        let (a, b) = frame.split_at(3);
        let frames = collect(&mut Scanner::new(), &[a, b]);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].0.payload_len, 1000);
    }

    #[test]
    fn errors_surface_from_the_scanner() {
        let mut scanner = Scanner::new();
        assert_eq!(
            scanner.feed(&[0x81, 0x81, 0, 0, 0, 0, 0], |_, _| ()),
            Err(FrameError::Masked)
        );
    }

    #[test]
    fn client_frames_are_masked_and_round_trip() {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        // RFC 6455 §5.7: a masked "Hello".
        assert_eq!(
            encode_client_frame(opcode::TEXT, b"Hello", mask),
            vec![
                0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58
            ]
        );
        let long = encode_client_frame(opcode::TEXT, &[0u8; 300], [1, 2, 3, 4]);
        assert_eq!(&long[..4], &[0x81, 0x80 | 126, 0x01, 0x2C]);
        assert_eq!(long.len(), 4 + 4 + 300);
        assert_eq!(&long[8..12], &[1, 2, 3, 4]);
    }

    #[test]
    fn close_code_needs_two_bytes() {
        assert_eq!(close_code(&[]), None);
        assert_eq!(close_code(&[0x0F]), None);
        assert_eq!(close_code(&[0x0F, 0xA0, b'x']), Some(4000));
    }
}
