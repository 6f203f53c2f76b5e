//! The sealed-object format: a header, then frames that are each compressed (when it pays),
//! encrypted and authenticated on their own. See `docs/formats/sealed-object.md`.
//!
//! ```text
//! header: "KLIOSEAL" | version u8 = 1 | kind u8 | salt [32] | name_len u16 | name
//! frame:  ct_len u32 | flags u8 | offset u64 | plain_len u32 | nonce [12] | ciphertext+tag
//! ```
//! All integers are big-endian. The object key is HKDF-SHA256(salt, master key). Each frame's
//! associated data is the whole header followed by the frame's flags, offset and length, so a
//! frame cannot be moved to another object, another position, or have its flags changed. A
//! complete object ends with a final frame whose payload is the total plaintext length and
//! its BLAKE3 hash: a missing final frame means the object was truncated.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::hkdf;

use crate::{Error, MasterKey, random_bytes};

const MAGIC: &[u8; 8] = b"KLIOSEAL";
const VERSION: u8 = 1;
const FLAG_ZSTD: u8 = 1;
const FLAG_FINAL: u8 = 2;
const TAG_LEN: usize = 16;
/// Bytes of a frame before its ciphertext.
pub const FRAME_HEADER_LEN: usize = 4 + 1 + 8 + 4 + 12;
/// The largest plaintext one frame may carry; readers reject larger claims.
pub const MAX_FRAME_PLAINTEXT: usize = 16 << 20;

/// What a sealed object holds; part of the authenticated header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectKind {
    /// A complete WAL segment.
    WalSegment = 1,
    /// A timeline history file.
    History = 2,
    /// The last, incomplete segment of a finished timeline.
    WalPartial = 3,
    /// A segment being received (appended frames, no final frame yet).
    WalOpen = 4,
    /// A `.backup` history file or other small WAL archive file.
    WalOther = 5,
    /// Repository metadata or data blob.
    Blob = 6,
}

impl ObjectKind {
    fn from_u8(v: u8) -> Option<ObjectKind> {
        Some(match v {
            1 => ObjectKind::WalSegment,
            2 => ObjectKind::History,
            3 => ObjectKind::WalPartial,
            4 => ObjectKind::WalOpen,
            5 => ObjectKind::WalOther,
            6 => ObjectKind::Blob,
            _ => return None,
        })
    }
}

/// The plaintext header of a sealed object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectHeader {
    pub kind: ObjectKind,
    pub salt: [u8; 32],
    /// The logical name the object is bound to (e.g. `wal/<cluster>/<file name>`).
    pub name: String,
}

impl ObjectHeader {
    pub fn new(kind: ObjectKind, name: &str) -> ObjectHeader {
        ObjectHeader {
            kind,
            salt: random_bytes(),
            name: name.to_string(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(44 + self.name.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(self.kind as u8);
        out.extend_from_slice(&self.salt);
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out
    }

    /// Decodes a header from the start of `buf`, returning it and its encoded length.
    /// `shown` names the object in errors.
    pub fn decode(buf: &[u8], shown: &str) -> Result<(ObjectHeader, usize), Error> {
        if buf.len() < 44 || &buf[..8] != MAGIC {
            return Err(Error::corrupt(
                shown,
                "not a sealed Klio object (bad magic or too short)",
            ));
        }
        if buf[8] != VERSION {
            return Err(Error::corrupt(
                shown,
                format!("unsupported format version {}", buf[8]),
            ));
        }
        let kind = ObjectKind::from_u8(buf[9])
            .ok_or_else(|| Error::corrupt(shown, "unknown object kind"))?;
        let mut salt = [0u8; 32];
        salt.copy_from_slice(&buf[10..42]);
        let name_len = usize::from(u16::from_be_bytes([buf[42], buf[43]]));
        let end = 44 + name_len;
        let name = buf
            .get(44..end)
            .and_then(|n| std::str::from_utf8(n).ok())
            .ok_or_else(|| Error::corrupt(shown, "truncated or invalid header name"))?
            .to_string();
        Ok((ObjectHeader { kind, salt, name }, end))
    }
}

/// A frame as stored, before decryption.
#[derive(Clone, Copy, Debug)]
pub struct RawFrame<'a> {
    pub flags: u8,
    pub offset: u64,
    pub plain_len: u32,
    pub nonce: [u8; 12],
    pub ciphertext: &'a [u8],
    /// Position of the frame's first byte relative to the start of the frame area.
    pub start: usize,
    /// Position just past the frame.
    pub end: usize,
}

impl RawFrame<'_> {
    pub fn is_final(&self) -> bool {
        self.flags & FLAG_FINAL != 0
    }
}

/// A decrypted frame. `payload` is still compressed when `compressed` is true.
#[derive(Clone, Debug)]
pub struct OpenedFrame {
    pub offset: u64,
    pub plain_len: u32,
    pub compressed: bool,
    pub is_final: bool,
    pub payload: Vec<u8>,
}

impl OpenedFrame {
    /// The frame's plaintext, decompressed if needed.
    pub fn plaintext(&self, shown: &str) -> Result<Vec<u8>, Error> {
        decompress_payload(&self.payload, self.compressed, self.plain_len, shown)
    }
}

/// Decompresses a frame payload (as also sent to clients) and checks its length.
pub fn decompress_payload(
    payload: &[u8],
    compressed: bool,
    plain_len: u32,
    shown: &str,
) -> Result<Vec<u8>, Error> {
    if !compressed {
        if payload.len() != plain_len as usize {
            return Err(Error::corrupt(shown, "frame length mismatch"));
        }
        return Ok(payload.to_vec());
    }
    let out = zstd::bulk::decompress(payload, plain_len as usize)
        .map_err(|e| Error::corrupt(shown, format!("zstd frame does not decompress: {e}")))?;
    if out.len() != plain_len as usize {
        return Err(Error::corrupt(
            shown,
            "decompressed frame has the wrong length",
        ));
    }
    Ok(out)
}

/// Iterates the frames of a frame area (the bytes after the header).
pub struct FrameIter<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// The outcome of reading one frame boundary.
pub enum FrameRead<'a> {
    Frame(RawFrame<'a>),
    /// Fewer bytes remain than the next frame needs (a torn or truncated tail).
    Incomplete {
        start: usize,
    },
    End,
}

impl<'a> FrameIter<'a> {
    pub fn new(buf: &'a [u8]) -> FrameIter<'a> {
        FrameIter { buf, pos: 0 }
    }

    pub fn next_frame(&mut self) -> FrameRead<'a> {
        let rest = &self.buf[self.pos..];
        if rest.is_empty() {
            return FrameRead::End;
        }
        if rest.len() < FRAME_HEADER_LEN {
            return FrameRead::Incomplete { start: self.pos };
        }
        let ct_len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let flags = rest[4];
        let offset = u64::from_be_bytes(rest[5..13].try_into().expect("8 bytes"));
        let plain_len = u32::from_be_bytes(rest[13..17].try_into().expect("4 bytes"));
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&rest[17..29]);
        let total = FRAME_HEADER_LEN + ct_len;
        if ct_len > MAX_FRAME_PLAINTEXT + 1024 || rest.len() < total {
            return FrameRead::Incomplete { start: self.pos };
        }
        let frame = RawFrame {
            flags,
            offset,
            plain_len,
            nonce,
            ciphertext: &rest[FRAME_HEADER_LEN..total],
            start: self.pos,
            end: self.pos + total,
        };
        self.pos += total;
        FrameRead::Frame(frame)
    }
}

/// Summary of a complete object, from its final frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealedSummary {
    pub total_len: u64,
    pub blake3: [u8; 32],
}

/// Seals and opens the frames of one object.
pub struct FrameCipher {
    key: LessSafeKey,
    header: Vec<u8>,
    shown: String,
}

impl FrameCipher {
    pub fn new(master: &MasterKey, header: &ObjectHeader) -> FrameCipher {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &header.salt).extract(&master.0);
        let okm = prk
            .expand(&[b"klio sealed object v1"], &AES_256_GCM)
            .expect("hkdf expand to a 32-byte key");
        let key = LessSafeKey::new(UnboundKey::from(okm));
        FrameCipher {
            key,
            header: header.encode(),
            shown: header.name.clone(),
        }
    }

    /// The encoded header this cipher binds frames to.
    pub fn header_bytes(&self) -> &[u8] {
        &self.header
    }

    fn aad(&self, flags: u8, offset: u64, plain_len: u32) -> Vec<u8> {
        let mut aad = Vec::with_capacity(self.header.len() + 13);
        aad.extend_from_slice(&self.header);
        aad.push(flags);
        aad.extend_from_slice(&offset.to_be_bytes());
        aad.extend_from_slice(&plain_len.to_be_bytes());
        aad
    }

    fn seal_raw(
        &self,
        flags: u8,
        offset: u64,
        plain_len: u32,
        mut payload: Vec<u8>,
        out: &mut Vec<u8>,
    ) {
        let nonce: [u8; 12] = random_bytes();
        let aad = self.aad(flags, offset, plain_len);
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_slice()),
                &mut payload,
            )
            .expect("AES-GCM sealing of a bounded frame cannot fail");
        out.reserve(FRAME_HEADER_LEN + payload.len());
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.push(flags);
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&plain_len.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&payload);
    }

    /// Appends to `out` one frame carrying `plaintext` at `offset`, compressed with zstd at
    /// `level` when that makes it smaller (`None`: never compress).
    pub fn seal_frame(&self, offset: u64, plaintext: &[u8], level: Option<i32>, out: &mut Vec<u8>) {
        assert!(
            plaintext.len() <= MAX_FRAME_PLAINTEXT,
            "frame larger than MAX_FRAME_PLAINTEXT"
        );
        let compressed = level.and_then(|l| zstd::bulk::compress(plaintext, l).ok());
        let (flags, payload) = match compressed {
            Some(c) if c.len() + 64 < plaintext.len() => (FLAG_ZSTD, c),
            _ => (0, plaintext.to_vec()),
        };
        self.seal_raw(flags, offset, plaintext.len() as u32, payload, out);
    }

    /// Appends one frame carrying a payload prepared elsewhere: `payload` is the zstd
    /// compression of a `plain_len`-byte plaintext when `compressed`, else the plaintext.
    /// The caller has checked that it decompresses to the plaintext it stands for.
    pub fn seal_payload(
        &self,
        offset: u64,
        plain_len: u32,
        payload: Vec<u8>,
        compressed: bool,
        out: &mut Vec<u8>,
    ) {
        assert!(
            plain_len as usize <= MAX_FRAME_PLAINTEXT,
            "frame larger than MAX_FRAME_PLAINTEXT"
        );
        let flags = if compressed { FLAG_ZSTD } else { 0 };
        self.seal_raw(flags, offset, plain_len, payload, out);
    }

    /// Appends the final frame that marks the object complete.
    pub fn seal_final(&self, summary: &SealedSummary, out: &mut Vec<u8>) {
        let mut payload = Vec::with_capacity(40);
        payload.extend_from_slice(&summary.total_len.to_be_bytes());
        payload.extend_from_slice(&summary.blake3);
        self.seal_raw(FLAG_FINAL, summary.total_len, 0, payload, out);
    }

    /// Decrypts and authenticates one frame.
    pub fn open_frame(&self, raw: &RawFrame<'_>) -> Result<OpenedFrame, Error> {
        let aad = self.aad(raw.flags, raw.offset, raw.plain_len);
        let mut buf = raw.ciphertext.to_vec();
        if buf.len() < TAG_LEN {
            return Err(Error::corrupt(&self.shown, "frame shorter than its tag"));
        }
        let plain_len = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(raw.nonce),
                Aad::from(aad.as_slice()),
                &mut buf,
            )
            .map_err(|_| {
                Error::corrupt(
                    &self.shown,
                    format!("authentication of the frame at byte {} failed", raw.offset),
                )
            })?
            .len();
        buf.truncate(plain_len);
        Ok(OpenedFrame {
            offset: raw.offset,
            plain_len: raw.plain_len,
            compressed: raw.flags & FLAG_ZSTD != 0,
            is_final: raw.is_final(),
            payload: buf,
        })
    }

    /// Opens every frame of a complete object in order, checking continuity, and returns the
    /// frames (payloads still compressed) and the summary of the final frame.
    pub fn open_all(&self, area: &[u8]) -> Result<(Vec<OpenedFrame>, SealedSummary), Error> {
        let mut iter = FrameIter::new(area);
        let mut frames = Vec::new();
        let mut expect = 0u64;
        loop {
            match iter.next_frame() {
                FrameRead::End => {
                    return Err(Error::corrupt(
                        &self.shown,
                        "truncated: the final frame is missing",
                    ));
                }
                FrameRead::Incomplete { start } => {
                    return Err(Error::corrupt(
                        &self.shown,
                        format!("truncated frame at position {start}"),
                    ));
                }
                FrameRead::Frame(raw) => {
                    let f = self.open_frame(&raw)?;
                    if f.offset != expect {
                        return Err(Error::corrupt(
                            &self.shown,
                            format!(
                                "frame at byte {} found where byte {expect} was expected",
                                f.offset
                            ),
                        ));
                    }
                    if f.is_final {
                        let summary = parse_final(&f.payload, &self.shown)?;
                        if summary.total_len != expect {
                            return Err(Error::corrupt(
                                &self.shown,
                                "final frame length does not match the frames",
                            ));
                        }
                        if !matches!(iter.next_frame(), FrameRead::End) {
                            return Err(Error::corrupt(&self.shown, "data after the final frame"));
                        }
                        return Ok((frames, summary));
                    }
                    expect += u64::from(f.plain_len);
                    frames.push(f);
                }
            }
        }
    }

    /// Reads the frames of an object that is still being appended to (no final frame).
    /// Returns the opened frames and the length of the valid prefix of `area`. A torn last
    /// frame (incomplete, or failing authentication with nothing after it) is not an error:
    /// it was never acknowledged. Any other damage is.
    pub fn scan_open(&self, area: &[u8]) -> Result<(Vec<OpenedFrame>, usize), Error> {
        let mut iter = FrameIter::new(area);
        let mut frames = Vec::new();
        let mut expect = 0u64;
        let mut valid = 0usize;
        loop {
            match iter.next_frame() {
                FrameRead::End => return Ok((frames, valid)),
                FrameRead::Incomplete { .. } => return Ok((frames, valid)),
                FrameRead::Frame(raw) => {
                    let f = match self.open_frame(&raw) {
                        Ok(f) => f,
                        Err(_) if raw.end == area.len() => return Ok((frames, valid)),
                        Err(e) => return Err(e),
                    };
                    if f.is_final || f.offset != expect {
                        return Err(Error::corrupt(
                            &self.shown,
                            format!("unexpected frame at byte {}", f.offset),
                        ));
                    }
                    expect += u64::from(f.plain_len);
                    valid = raw.end;
                    frames.push(f);
                }
            }
        }
    }
}

fn parse_final(payload: &[u8], shown: &str) -> Result<SealedSummary, Error> {
    if payload.len() != 40 {
        return Err(Error::corrupt(shown, "final frame has the wrong size"));
    }
    let total_len = u64::from_be_bytes(payload[..8].try_into().expect("8 bytes"));
    let mut blake3 = [0u8; 32];
    blake3.copy_from_slice(&payload[8..40]);
    Ok(SealedSummary { total_len, blake3 })
}

/// Frame size used by [`seal_object`].
const SEAL_FRAME: usize = 1 << 20;

/// Seals a whole plaintext as one object named `name`.
pub fn seal_object(
    master: &MasterKey,
    kind: ObjectKind,
    name: &str,
    plaintext: &[u8],
    level: Option<i32>,
) -> Vec<u8> {
    let header = ObjectHeader::new(kind, name);
    let cipher = FrameCipher::new(master, &header);
    let mut out = cipher.header_bytes().to_vec();
    for (i, chunk) in plaintext.chunks(SEAL_FRAME).enumerate() {
        cipher.seal_frame((i * SEAL_FRAME) as u64, chunk, level, &mut out);
    }
    let summary = SealedSummary {
        total_len: plaintext.len() as u64,
        blake3: *blake3::hash(plaintext).as_bytes(),
    };
    cipher.seal_final(&summary, &mut out);
    out
}

/// Opens a complete object, checking that it is bound to `expected_name`, and returns its
/// plaintext after verifying every frame, the final length and the BLAKE3 hash.
pub fn open_object(
    master: &MasterKey,
    expected_name: &str,
    bytes: &[u8],
) -> Result<(ObjectKind, Vec<u8>), Error> {
    let (header, hlen) = ObjectHeader::decode(bytes, expected_name)?;
    if header.name != expected_name {
        return Err(Error::corrupt(
            expected_name,
            format!("it holds object \"{}\"", header.name),
        ));
    }
    let cipher = FrameCipher::new(master, &header);
    let (frames, summary) = cipher.open_all(&bytes[hlen..])?;
    let mut out = Vec::with_capacity(summary.total_len as usize);
    for f in &frames {
        out.extend_from_slice(&f.plaintext(expected_name)?);
    }
    if blake3::hash(&out).as_bytes() != &summary.blake3 {
        return Err(Error::corrupt(expected_name, "content hash mismatch"));
    }
    Ok((header.kind, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8 ^ (i / 4096) as u8).collect()
    }

    #[test]
    fn seal_open_roundtrip_multi_frame() {
        let m = MasterKey::generate();
        let data = sample(3 * SEAL_FRAME + 123);
        let sealed = seal_object(&m, ObjectKind::WalSegment, "wal/a/x", &data, Some(3));
        assert!(sealed.len() < data.len(), "compressible data should shrink");
        let (kind, back) = open_object(&m, "wal/a/x", &sealed).unwrap();
        assert_eq!(kind, ObjectKind::WalSegment);
        assert_eq!(back, data);
    }

    #[test]
    fn empty_object_roundtrips() {
        let m = MasterKey::generate();
        let sealed = seal_object(&m, ObjectKind::History, "h", b"", Some(3));
        assert_eq!(open_object(&m, "h", &sealed).unwrap().1, b"");
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let m = MasterKey::generate();
        let data = sample(5000);
        let sealed = seal_object(&m, ObjectKind::WalSegment, "n", &data, Some(1));
        for i in (0..sealed.len()).step_by(7) {
            let mut bad = sealed.clone();
            bad[i] ^= 0x40;
            assert!(
                open_object(&m, "n", &bad).is_err(),
                "flip at {i} not detected"
            );
        }
    }

    #[test]
    fn truncation_wrong_name_and_wrong_key_are_detected() {
        let m = MasterKey::generate();
        let data = sample(2 * SEAL_FRAME);
        let sealed = seal_object(&m, ObjectKind::WalSegment, "n", &data, None);
        for cut in [sealed.len() - 1, sealed.len() - 60, 100, 44] {
            assert!(
                open_object(&m, "n", &sealed[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let err = open_object(&m, "other", &sealed).unwrap_err();
        assert!(err.to_string().contains("holds object \"n\""), "{err}");
        assert!(open_object(&MasterKey::generate(), "n", &sealed).is_err());
    }

    #[test]
    fn scan_open_tolerates_a_torn_tail_only() {
        let m = MasterKey::generate();
        let header = ObjectHeader::new(ObjectKind::WalOpen, "open");
        let c = FrameCipher::new(&m, &header);
        let mut area = Vec::new();
        c.seal_frame(0, &sample(1000), Some(1), &mut area);
        let first_end = area.len();
        c.seal_frame(1000, &sample(2000), Some(1), &mut area);
        let full = area.len();
        let (frames, valid) = c.scan_open(&area).unwrap();
        assert_eq!((frames.len(), valid), (2, full));
        // torn: last frame cut short
        let (frames, valid) = c.scan_open(&area[..full - 5]).unwrap();
        assert_eq!((frames.len(), valid), (1, first_end));
        // torn: last frame complete in length but garbage content
        let mut torn = area.clone();
        torn[full - 3] ^= 1;
        let (frames, valid) = c.scan_open(&torn).unwrap();
        assert_eq!((frames.len(), valid), (1, first_end));
        // corruption in the middle is an error
        let mut bad = area.clone();
        bad[first_end - 3] ^= 1;
        assert!(c.scan_open(&bad).is_err());
    }

    #[test]
    fn incompressible_frames_are_stored_raw() {
        let m = MasterKey::generate();
        let noise: Vec<u8> = (0..4096).map(|_| random_bytes::<1>()[0]).collect();
        let sealed = seal_object(&m, ObjectKind::Blob, "r", &noise, Some(19));
        assert!(sealed.len() < noise.len() + 200);
        assert_eq!(open_object(&m, "r", &sealed).unwrap().1, noise);
    }
}
