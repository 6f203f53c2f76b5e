//! What the property tests of several crates share (each includes this file with
//! `#[path]`: the crates have no test-only dependency in common): a small deterministic
//! generator, the seed and the scale.

#![allow(dead_code)]

/// xorshift64*: small, deterministic, good enough to spread inputs.
pub struct Rng(pub u64);

impl Rng {
    /// A generator seeded by [`seed`]`(fixed)`.
    pub fn seeded(fixed: u64) -> Rng {
        Rng(seed(fixed))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// One of `items`.
    pub fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

/// The seed: `KLIO_PROPERTY_SEED` when set (bench/fuzz.sh explores new inputs that way; a
/// failure prints the seed to reproduce it), else the test's fixed one.
pub fn seed(fixed: u64) -> u64 {
    let s = std::env::var("KLIO_PROPERTY_SEED")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(fixed, |v| v ^ fixed);
    eprintln!("property seed {s} (KLIO_PROPERTY_SEED)");
    s.max(1)
}

/// How many times the default number of cases to run (`KLIO_PROPERTY_SCALE`, default 1).
pub fn scale(n: u64) -> u64 {
    n * std::env::var("KLIO_PROPERTY_SCALE")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1)
        .max(1)
}
