//! Bulk-transfer integrity: SHA-256 and a deterministic pseudo-random byte
//! stream, so both ends of a proxied transfer can agree on what was sent
//! without keeping it in memory.

use std::io::{self, Read};

use sha2::{Digest, Sha256};

/// SHA-256 of `bytes`, raw.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// SHA-256 of `bytes` as 64 lowercase hex digits.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&sha256(bytes))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// `len` pseudo-random bytes from `seed`; the same seed always gives the same
/// bytes (within one build of this crate).
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    let n = PseudoRandom::new(seed, len as u64)
        .read(&mut out)
        .expect("reading PseudoRandom cannot fail");
    debug_assert_eq!(n, len);
    out
}

/// A [`Read`] of `len` pseudo-random bytes from `seed`, generated on the fly
/// (so a multi-gigabyte stream costs no memory). It yields exactly the bytes
/// of [`pseudo_random_bytes`]`(seed, len)`, however it is read.
#[derive(Debug, Clone)]
pub struct PseudoRandom {
    rng: fastrand::Rng,
    /// Bytes of the current 8-byte word not handed out yet.
    word: [u8; 8],
    word_used: usize,
    remaining: u64,
}

impl PseudoRandom {
    /// A stream of `len` bytes from `seed`.
    pub fn new(seed: u64, len: u64) -> Self {
        PseudoRandom {
            rng: fastrand::Rng::with_seed(seed),
            word: [0; 8],
            word_used: 8,
            remaining: len,
        }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// SHA-256 (hex) of the whole stream of `len` bytes from `seed`, computed
    /// without holding it in memory: what a sink must report after receiving it.
    pub fn expected_sha256_hex(seed: u64, len: u64) -> String {
        let mut stream = PseudoRandom::new(seed, len);
        let mut hasher = Sha256::new();
        let mut buf = vec![0; 64 * 1024];
        loop {
            let n = stream
                .read(&mut buf)
                .expect("reading PseudoRandom cannot fail");
            if n == 0 {
                return hex(&hasher.finalize());
            }
            hasher.update(&buf[..n]);
        }
    }
}

impl Read for PseudoRandom {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = usize::try_from(self.remaining)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        // fastrand's `fill` consumes the generator in 8-byte words, so to make
        // the output independent of how reads are split we do the same here.
        let mut filled = 0;
        while filled < n {
            if self.word_used == 8 {
                self.word = self.rng.u64(..).to_le_bytes();
                self.word_used = 0;
            }
            let take = (8 - self.word_used).min(n - filled);
            buf[filled..filled + take]
                .copy_from_slice(&self.word[self.word_used..self.word_used + take]);
            self.word_used += take;
            filled += take;
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// An incremental SHA-256 that also counts bytes: what a sink keeps while a
/// transfer is running.
#[derive(Debug, Default, Clone)]
pub struct HashCounter {
    hasher: Sha256,
    len: u64,
}

impl HashCounter {
    /// An empty counter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Bytes seen so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True if nothing was added.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `(length, hex digest)` of everything added.
    pub fn finish(self) -> (u64, String) {
        (self.len, hex(&self.hasher.finalize()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_matches_vec_however_it_is_read() {
        let want = pseudo_random_bytes(7, 10_000);
        for chunk in [1, 3, 8, 13, 4096, 20_000] {
            let mut got = Vec::new();
            let mut stream = PseudoRandom::new(7, 10_000);
            let mut buf = vec![0; chunk];
            loop {
                let n = stream.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(got, want, "chunk size {chunk}");
        }
        assert_eq!(
            PseudoRandom::expected_sha256_hex(7, 10_000),
            sha256_hex(&want)
        );
    }

    #[test]
    fn hash_counter_matches_one_shot() {
        let data = pseudo_random_bytes(1, 1000);
        let mut counter = HashCounter::new();
        counter.update(&data[..10]);
        counter.update(&data[10..]);
        assert_eq!(counter.finish(), (1000, sha256_hex(&data)));
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
