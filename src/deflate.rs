//! imgbuild's own DEFLATE encoder (RFC 1951) for one block of the parallel gzip writer
//! ([`crate::compress::ParGzWriter`]): the engine behind `--compression-level fast`.
//!
//! Why a new engine (issue 11, bench/compression.md): zlib-rs's fastest level with dynamic
//! Huffman codes costs ~1.3 CPU s per 100 MiB; libdeflate cannot prime a block with the
//! previous 32 KiB nor end it without a final block, and ISA-L writes different bytes on
//! different CPUs. This encoder is plain integer arithmetic with no CPU-dependent paths, so its
//! bytes depend on the input (block, dictionary, last-ness) and [`Params`] alone.
//!
//! How: greedy LZ77 over a multiplicative hash of 4 bytes with `ways` candidates per bucket
//! (libdeflate's and ISA-L's "fastest" design), stepping faster through stretches without
//! matches; the dictionary's positions are inserted first so matches reach back into it
//! (RFC 1951 3.2: distances up to 32 KiB). The symbols are then written
//! as dynamic-Huffman blocks (3.2.7) of about [`Params::block_syms`] symbols, each as a
//! fixed-Huffman (3.2.6) or stored (3.2.4) block instead when that is smaller. Code lengths come from Moffat and Katajainen's in-place
//! algorithm, limited to 15 bits (7 for the code-length code) with miniz's adjustment. A block
//! that is not the last ends with a sync flush (an empty stored block, byte-aligned), exactly as
//! zlib's `Z_SYNC_FLUSH` does, so blocks concatenate into one stream; the last block has
//! BFINAL set.

use std::cell::RefCell;

/// The window: the farthest a match may reach back (RFC 1951 3.2).
pub const WINDOW: usize = 32 * 1024;
/// Matches shorter than 4 bytes are not looked for (the hash covers 4 bytes).
const MIN_MATCH: usize = 4;
const MAX_MATCH: usize = 258;
/// Zero bytes after the input, so 8-byte reads near its end stay in the buffer.
const PAD: usize = 8;
/// Hash-table entries hold `position + OFFSET`; 0 means empty. An empty entry then looks
/// farther away than the window, so one comparison rejects both.
const OFFSET: u32 = WINDOW as u32 + 1;

/// The encoder's knobs. Each set of values is part of the output bytes: changing one changes
/// every digest made with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Params {
    /// log2 of the hash table's bucket count.
    pub hash_bits: u32,
    /// Candidates kept per bucket (1 or 2): the newest first.
    pub ways: usize,
    /// After a match of at most this length, its inner positions are hashed too (better
    /// matches later, more work now). 0: never.
    pub insert_max: usize,
    /// After `2^skip_shift` positions without a match, the search steps over more of them
    /// (incompressible stretches cost less); 0: never.
    pub skip_shift: u32,
    /// A new Huffman block after this many symbols (codes that follow the data); 0: one
    /// block per input block.
    pub block_syms: usize,
}

/// `--compression-level fast` (see bench/compression.md for the measurements behind it).
pub const FAST: Params = Params {
    hash_bits: 16,
    ways: 1,
    insert_max: 4,
    skip_shift: 4,
    block_syms: 8192,
};

/// Per-thread buffers, reused across blocks and cleared for each (the output must not
/// depend on which blocks a thread compressed before).
#[derive(Debug, Default)]
struct State {
    buf: Vec<u8>,
    table: Vec<u32>,
    seqs: Vec<Seq>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// Raw-deflate `data`, primed with `dict` (its last 32 KiB count), ended with a sync flush or,
/// if `last`, as the final block. The output starts and ends on a byte boundary.
pub fn deflate_block(p: &Params, dict: &[u8], data: &[u8], last: bool) -> Vec<u8> {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let State { buf, table, seqs } = &mut *s;
        let dict = &dict[dict.len().saturating_sub(WINDOW)..];
        buf.clear();
        buf.extend_from_slice(dict);
        buf.extend_from_slice(data);
        buf.extend_from_slice(&[0; PAD]);
        table.clear();
        table.resize(p.ways << p.hash_bits, 0);
        seqs.clear();
        if p.ways >= 2 {
            find_matches::<2>(p, buf, dict.len(), table, seqs);
        } else {
            find_matches::<1>(p, buf, dict.len(), table, seqs);
        }
        // About the stored form's size: data, 5 bytes per stored block, the sync flush.
        let mut out = Bits::with_capacity(data.len() + 5 * (data.len() / 65535 + 1) + 64);
        write_blocks(&mut out, seqs, data, last, p.block_syms);
        if !last {
            // Sync flush: an empty stored block ends byte-aligned with 00 00 ff ff.
            out.put(0, 3);
            out.align();
            out.bytes(&[0, 0, 0xff, 0xff]);
        }
        out.finish()
    })
}

#[derive(Debug)]
struct Freqs {
    lit: [u32; 286],
    dist: [u32; 30],
}

impl Default for Freqs {
    fn default() -> Self {
        Freqs {
            lit: [0; 286],
            dist: [0; 30],
        }
    }
}

#[inline(always)]
fn read32(b: &[u8], i: usize) -> u32 {
    // One bounds check and one 4-byte load (indexing each byte makes four of each).
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[i..i + 4]);
    u32::from_le_bytes(w)
}

#[inline(always)]
fn read64(b: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(w)
}

#[inline(always)]
fn hash(v: u32, bits: u32) -> usize {
    (v.wrapping_mul(0x1e35_a7bd) >> (32 - bits)) as usize
}

/// Length of the common prefix of `b[a..]` and `b[c..]` (a < c), at least `MIN_MATCH` known,
/// at most `limit`.
#[inline(always)]
fn match_len(b: &[u8], a: usize, c: usize, limit: usize) -> usize {
    let mut n = MIN_MATCH;
    while n + 8 <= limit {
        let x = read64(b, a + n) ^ read64(b, c + n);
        if x != 0 {
            return n + (x.trailing_zeros() / 8) as usize;
        }
        n += 8;
    }
    while n < limit && b[a + n] == b[c + n] {
        n += 1;
    }
    n
}

/// A run of literals and the match after it: literal count, then the match as
/// `(distance - 1) << 9 | length` (length 0: no match, the block's trailing literals).
type Seq = (u32, u32);

/// Greedy LZ77 over `buf[start..end]` (`end` = `buf.len() - PAD`), matches reaching back into
/// `buf[..start]`. Runs go to `seqs`; the last one has no match.
fn find_matches<const WAYS: usize>(
    p: &Params,
    buf: &[u8],
    start: usize,
    table: &mut [u32],
    seqs: &mut Vec<Seq>,
) {
    let end = buf.len() - PAD;
    let bits = p.hash_bits;
    // Positions with 4 bytes to hash.
    let hashable = end.saturating_sub(MIN_MATCH - 1);
    let insert = |table: &mut [u32], pos: usize| {
        let h = hash(read32(buf, pos), bits) * WAYS;
        if WAYS == 2 {
            table[h + 1] = table[h];
        }
        table[h] = pos as u32 + OFFSET;
    };
    // The dictionary's positions (they may hash bytes of the data).
    for pos in 0..start.min(hashable) {
        insert(table, pos);
    }
    let mut anchor = start;
    let mut pos = start;
    let mut misses = 0u32;
    while pos < hashable {
        let cur = read32(buf, pos);
        let h = hash(cur, bits) * WAYS;
        let here = pos as u32 + OFFSET;
        let d1 = here.wrapping_sub(table[h]) as usize;
        let mut best = if d1 <= WINDOW && read32(buf, pos - d1) == cur {
            let limit = (end - pos).min(MAX_MATCH);
            (match_len(buf, pos - d1, pos, limit), d1)
        } else {
            (0, 0)
        };
        if WAYS == 2 {
            let d2 = here.wrapping_sub(table[h + 1]) as usize;
            if d2 <= WINDOW && read32(buf, pos - d2) == cur {
                let limit = (end - pos).min(MAX_MATCH);
                let len = match_len(buf, pos - d2, pos, limit);
                if len > best.0 {
                    best = (len, d2);
                }
            }
            table[h + 1] = table[h];
        }
        table[h] = here;
        let (len, dist) = best;
        if len == 0 {
            pos += 1;
            if p.skip_shift > 0 {
                misses += 1;
                pos += (misses >> p.skip_shift) as usize;
            }
            continue;
        }
        seqs.push(((pos - anchor) as u32, ((dist as u32 - 1) << 9) | len as u32));
        if len <= p.insert_max {
            for q in pos + 1..(pos + len).min(hashable) {
                insert(table, q);
            }
        }
        pos += len;
        anchor = pos;
        misses = 0;
    }
    seqs.push(((end - anchor) as u32, 0));
}

/// The runs as Huffman blocks of about `max_syms` symbols each (0: one block), the last
/// one final if `last`.
fn write_blocks(out: &mut Bits, seqs: &[Seq], data: &[u8], last: bool, max_syms: usize) {
    let (mut i, mut at) = (0, 0);
    while i < seqs.len() {
        let (i0, at0) = (i, at);
        let mut freq = Freqs::default();
        let mut syms = 0;
        while i < seqs.len() {
            let (lits, m) = seqs[i];
            for &b in &data[at..at + lits as usize] {
                freq.lit[usize::from(b)] += 1;
            }
            at += lits as usize;
            syms += lits as usize;
            let len = (m & 0x1ff) as usize;
            if len > 0 {
                freq.lit[257 + usize::from(LEN_SYM[len])] += 1;
                freq.dist[dist_sym((m >> 9) as usize)] += 1;
                at += len;
                syms += 1;
            }
            i += 1;
            if max_syms > 0 && syms >= max_syms {
                break;
            }
        }
        freq.lit[256] += 1;
        write_block(
            out,
            &seqs[i0..i],
            &freq,
            &data[at0..at],
            last && i == seqs.len(),
        );
    }
}

// RFC 1951 3.2.5: length and distance codes.
const LEN_BASE: [u16; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
const LEN_EXTRA: [u8; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
const DIST_BASE: [u16; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
    2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
];
const DIST_EXTRA: [u8; 30] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];

/// Length (3..=258) -> length symbol - 257.
const LEN_SYM: [u8; 259] = {
    let mut t = [0u8; 259];
    let mut len = 3;
    while len <= 258 {
        let mut s = 0;
        while s + 1 < 29 && LEN_BASE[s + 1] as usize <= len {
            s += 1;
        }
        t[len] = s as u8;
        len += 1;
    }
    t
};

/// zlib's two-part table: distance - 1 below 256 directly, above by its bits 7 and up.
const DIST_SYM: [u8; 512] = {
    let mut t = [0u8; 512];
    let mut i = 0;
    while i < 512 {
        let d = if i < 256 { i } else { (i - 256) << 7 };
        let mut s = 0;
        while s + 1 < 30 && DIST_BASE[s + 1] as usize <= d + 1 {
            s += 1;
        }
        t[i] = s as u8;
        i += 1;
    }
    t
};

#[inline(always)]
fn dist_sym(d0: usize) -> usize {
    if d0 < 256 {
        DIST_SYM[d0] as usize
    } else {
        DIST_SYM[256 + (d0 >> 7)] as usize
    }
}

/// Order of the code-length code's lengths in the header (RFC 1951 3.2.7).
const CL_ORDER: [usize; 19] = [
    16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
];

/// LSB-first bit writer into a buffer sized for the block's largest form (it grows if that
/// estimate is ever short).
#[derive(Debug)]
struct Bits {
    out: Vec<u8>,
    at: usize,
    acc: u64,
    n: u32,
}

impl Bits {
    fn with_capacity(n: usize) -> Self {
        Bits {
            out: vec![0; n + 8],
            at: 0,
            acc: 0,
            n: 0,
        }
    }
    /// Append the low `len` (<= 32) bits of `v`.
    #[inline(always)]
    fn put(&mut self, v: u32, len: u32) {
        self.acc |= u64::from(v) << self.n;
        self.n += len;
        if self.n >= 32 {
            self.word();
        }
    }
    #[inline(always)]
    fn word(&mut self) {
        if self.at + 4 > self.out.len() {
            self.out.resize(self.out.len() * 2, 0);
        }
        self.out[self.at..self.at + 4].copy_from_slice(&(self.acc as u32).to_le_bytes());
        self.at += 4;
        self.acc >>= 32;
        self.n -= 32;
    }
    /// Pad with zero bits to a byte boundary and write out the whole bytes held.
    fn align(&mut self) {
        let bytes = self.n.div_ceil(8) as usize;
        let acc = self.acc.to_le_bytes();
        self.raw(&acc[..bytes]);
        self.acc = 0;
        self.n = 0;
    }
    fn raw(&mut self, b: &[u8]) {
        if self.at + b.len() > self.out.len() {
            self.out.resize(self.at + b.len() + 8, 0);
        }
        self.out[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }
    /// Raw bytes (after [`Bits::align`]).
    fn bytes(&mut self, b: &[u8]) {
        debug_assert_eq!(self.n, 0);
        self.raw(b);
    }
    fn finish(mut self) -> Vec<u8> {
        self.align();
        self.out.truncate(self.at);
        self.out
    }
}

/// Huffman code lengths for `freq`, at most `max` bits; unused symbols get 0. At least two
/// symbols get a code, as zlib does: a lone code would be incomplete, which some decoders
/// reject.
fn code_lengths(freq: &[u32], max: u32, lens: &mut [u8]) {
    lens.fill(0);
    let mut syms: Vec<(u32, u16)> = freq
        .iter()
        .enumerate()
        .filter(|(_, f)| **f > 0)
        .map(|(s, f)| (*f, s as u16))
        .collect();
    let mut filler = 0u16;
    while syms.len() < 2 {
        if freq[usize::from(filler)] == 0 {
            syms.push((0, filler));
        }
        filler += 1;
    }
    syms.sort_unstable();
    let mut a: Vec<u32> = syms.iter().map(|s| s.0).collect();
    minimum_redundancy(&mut a);
    // Lengths per count; lengths over `max` folded in (miniz's tdefl_huffman_enforce_max_code_size).
    let mut count = [0u32; 33];
    for &l in &a {
        count[(l as usize).min(max as usize)] += 1;
    }
    let mut total: u32 = (1..=max).map(|l| count[l as usize] << (max - l)).sum();
    while total != 1 << max {
        count[max as usize] -= 1;
        for l in (1..max as usize).rev() {
            if count[l] != 0 {
                count[l] -= 1;
                count[l + 1] += 2;
                break;
            }
        }
        total -= 1;
    }
    // The rarest symbols get the longest codes.
    let mut k = 0;
    for l in (1..=max as usize).rev() {
        for _ in 0..count[l] {
            lens[usize::from(syms[k].1)] = l as u8;
            k += 1;
        }
    }
}

/// Moffat and Katajainen, "In-Place Calculation of Minimum-Redundancy Codes" (1995): `a` holds
/// weights in ascending order (at least two); on return, each one's code length.
fn minimum_redundancy(a: &mut [u32]) {
    let n = a.len();
    a[0] += a[1];
    let (mut root, mut leaf) = (0usize, 2usize);
    for next in 1..n - 1 {
        if leaf >= n || a[root] < a[leaf] {
            a[next] = a[root];
            a[root] = next as u32;
            root += 1;
        } else {
            a[next] = a[leaf];
            leaf += 1;
        }
        if leaf >= n || (root < next && a[root] < a[leaf]) {
            a[next] += a[root];
            a[root] = next as u32;
            root += 1;
        } else {
            a[next] += a[leaf];
            leaf += 1;
        }
    }
    a[n - 2] = 0;
    for next in (0..n.saturating_sub(2)).rev() {
        a[next] = a[a[next] as usize] + 1;
    }
    let (mut avail, mut used, mut depth) = (1i64, 0i64, 0u32);
    let (mut root, mut next) = (n as i64 - 2, n as i64 - 1);
    while avail > 0 {
        while root >= 0 && a[root as usize] == depth {
            used += 1;
            root -= 1;
        }
        while avail > used {
            a[next as usize] = depth;
            next -= 1;
            avail -= 1;
        }
        avail = 2 * used;
        depth += 1;
        used = 0;
    }
}

/// Canonical codes for `lens` (RFC 1951 3.2.2), bit-reversed for the LSB-first writer.
fn canonical(lens: &[u8], codes: &mut [u32]) {
    let mut count = [0u32; 16];
    for &l in lens {
        count[usize::from(l)] += 1;
    }
    count[0] = 0;
    let mut next = [0u32; 16];
    let mut code = 0;
    for l in 1..16 {
        code = (code + count[l - 1]) << 1;
        next[l] = code;
    }
    for (s, &l) in lens.iter().enumerate() {
        if l > 0 {
            let c = next[usize::from(l)];
            next[usize::from(l)] += 1;
            codes[s] = c.reverse_bits() >> (32 - u32::from(l));
        }
    }
}

/// Run-length coded code lengths (RFC 1951 3.2.7): (symbol 0-18, extra-bits value).
fn rle_lengths(lens: &[u8], out: &mut Vec<(u8, u8)>) {
    let mut i = 0;
    while i < lens.len() {
        let v = lens[i];
        let mut run = 1;
        while i + run < lens.len() && lens[i + run] == v {
            run += 1;
        }
        i += run;
        if v == 0 {
            while run >= 11 {
                let r = run.min(138);
                out.push((18, (r - 11) as u8));
                run -= r;
            }
            if run >= 3 {
                out.push((17, (run - 3) as u8));
                run = 0;
            }
        } else {
            out.push((v, 0));
            run -= 1;
            while run >= 3 {
                let r = run.min(6);
                out.push((16, (r - 3) as u8));
                run -= r;
            }
        }
        for _ in 0..run {
            out.push((v, 0));
        }
    }
}

const CL_EXTRA: [u32; 19] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 3, 7];

/// A Huffman block's header and the sizes that choose between block types.
struct Dynamic {
    lit_lens: [u8; 286],
    dist_lens: [u8; 30],
    nlit: usize,
    ndist: usize,
    cl_lens: [u8; 19],
    ncl: usize,
    rle: Vec<(u8, u8)>,
}

impl Dynamic {
    fn new(freq: &Freqs) -> Self {
        let mut lit_lens = [0u8; 286];
        let mut dist_lens = [0u8; 30];
        code_lengths(&freq.lit, 15, &mut lit_lens);
        code_lengths(&freq.dist, 15, &mut dist_lens);
        let nlit = 257.max(lit_lens.iter().rposition(|&l| l > 0).map_or(0, |i| i + 1));
        let ndist = 1.max(dist_lens.iter().rposition(|&l| l > 0).map_or(0, |i| i + 1));
        let mut all = Vec::with_capacity(nlit + ndist);
        all.extend_from_slice(&lit_lens[..nlit]);
        all.extend_from_slice(&dist_lens[..ndist]);
        let mut rle = Vec::with_capacity(all.len());
        rle_lengths(&all, &mut rle);
        let mut cl_freq = [0u32; 19];
        for &(s, _) in &rle {
            cl_freq[usize::from(s)] += 1;
        }
        let mut cl_lens = [0u8; 19];
        code_lengths(&cl_freq, 7, &mut cl_lens);
        let ncl = 4.max(
            CL_ORDER
                .iter()
                .rposition(|&s| cl_lens[s] > 0)
                .map_or(0, |i| i + 1),
        );
        Dynamic {
            lit_lens,
            dist_lens,
            nlit,
            ndist,
            cl_lens,
            ncl,
            rle,
        }
    }

    fn header_bits(&self) -> u64 {
        let rle: u64 = self
            .rle
            .iter()
            .map(|&(s, _)| {
                u64::from(self.cl_lens[usize::from(s)]) + u64::from(CL_EXTRA[usize::from(s)])
            })
            .sum();
        3 + 5 + 5 + 4 + 3 * self.ncl as u64 + rle
    }

    fn write_header(&self, out: &mut Bits) {
        out.put(self.nlit as u32 - 257, 5);
        out.put(self.ndist as u32 - 1, 5);
        out.put(self.ncl as u32 - 4, 4);
        for &s in &CL_ORDER[..self.ncl] {
            out.put(u32::from(self.cl_lens[s]), 3);
        }
        let mut cl_codes = [0u32; 19];
        canonical(&self.cl_lens, &mut cl_codes);
        for &(s, x) in &self.rle {
            let s = usize::from(s);
            out.put(cl_codes[s], u32::from(self.cl_lens[s]));
            out.put(u32::from(x), CL_EXTRA[s]);
        }
    }
}

/// Fixed Huffman code lengths (RFC 1951 3.2.6).
fn fixed_lens() -> ([u8; 288], [u8; 30]) {
    let mut lit = [8u8; 288];
    lit[144..256].fill(9);
    lit[256..280].fill(7);
    (lit, [5u8; 30])
}

/// Bits of the block's symbols under the given code lengths, extra bits included.
fn data_bits(freq: &Freqs, lit: &[u8], dist: &[u8]) -> u64 {
    let mut bits: u64 = 0;
    for (s, &f) in freq.lit.iter().enumerate() {
        let extra = if s > 256 {
            u64::from(LEN_EXTRA[s - 257])
        } else {
            0
        };
        bits += u64::from(f) * (u64::from(lit[s]) + extra);
    }
    for (s, &f) in freq.dist.iter().enumerate() {
        bits += u64::from(f) * (u64::from(dist[s]) + u64::from(DIST_EXTRA[s]));
    }
    bits
}

/// The block as the smallest of dynamic Huffman, fixed Huffman and stored.
fn write_block(out: &mut Bits, seqs: &[Seq], freq: &Freqs, data: &[u8], last: bool) {
    let bfinal = u32::from(last);
    let dynamic = Dynamic::new(freq);
    let (fixed_lit, fixed_dist) = fixed_lens();
    let dyn_bits = dynamic.header_bits() + data_bits(freq, &dynamic.lit_lens, &dynamic.dist_lens);
    let fixed_bits = 3 + data_bits(freq, &fixed_lit, &fixed_dist);
    // Each stored block: 3 header bits, at most 7 bits to the byte, LEN and NLEN.
    let stored_bits =
        (data.len().div_ceil(65535).max(1) as u64) * (3 + 7 + 32) + 8 * data.len() as u64;
    if stored_bits < dyn_bits.min(fixed_bits) {
        let mut chunks = data.chunks(65535).peekable();
        if chunks.peek().is_none() {
            out.put(bfinal, 3);
            out.align();
            out.bytes(&[0, 0, 0xff, 0xff]);
        }
        while let Some(c) = chunks.next() {
            let fin = last && chunks.peek().is_none();
            out.put(u32::from(fin), 3);
            out.align();
            let len = c.len() as u16;
            out.bytes(&len.to_le_bytes());
            out.bytes(&(!len).to_le_bytes());
            out.bytes(c);
        }
        return;
    }
    let block_bits = dyn_bits.min(fixed_bits);
    let (lit_lens, dist_lens): (&[u8], &[u8]) = if fixed_bits <= dyn_bits {
        out.put(bfinal | (1 << 1), 3);
        (&fixed_lit, &fixed_dist)
    } else {
        out.put(bfinal | (2 << 1), 3);
        dynamic.write_header(out);
        (&dynamic.lit_lens, &dynamic.dist_lens)
    };
    let mut lit_codes = [0u32; 288];
    let mut dist_codes = [0u32; 30];
    canonical(lit_lens, &mut lit_codes);
    canonical(dist_lens, &mut dist_codes);
    // Length code and its extra bits in one write, per length.
    let mut len_put = [(0u32, 0u32); 259];
    for (len, slot) in len_put.iter_mut().enumerate().skip(3) {
        let s = usize::from(LEN_SYM[len]);
        let n = u32::from(lit_lens[257 + s]);
        let extra = (len - usize::from(LEN_BASE[s])) as u32;
        *slot = (
            lit_codes[257 + s] | (extra << n),
            n + u32::from(LEN_EXTRA[s]),
        );
    }
    // Literal code and length in one word per byte value.
    let mut lit_put = [0u32; 256];
    for (b, slot) in lit_put.iter_mut().enumerate() {
        *slot = lit_codes[b] | (u32::from(lit_lens[b]) << 16);
    }
    // The hot loop keeps the bit buffer in locals and writes 8 bytes at a time into room
    // reserved for the block's exact size (computed above), so no write needs a size check.
    let need = out.at + (block_bits / 8) as usize + 16;
    if out.out.len() < need {
        out.out.resize(need, 0);
    }
    let (mut acc, mut n, mut o) = (out.acc, out.n, out.at);
    let buf = &mut out.out[..];
    macro_rules! put {
        ($v:expr, $len:expr) => {{
            acc |= u64::from($v) << n;
            n += $len;
            if n >= 32 {
                buf[o..o + 8].copy_from_slice(&acc.to_le_bytes());
                let k = n >> 3;
                o += k as usize;
                acc >>= k * 8;
                n -= k * 8;
            }
        }};
    }
    let mut at = 0;
    for &(lits, m) in seqs {
        for &b in &data[at..at + lits as usize] {
            let c = lit_put[usize::from(b)];
            put!(c & 0xffff, c >> 16);
        }
        at += lits as usize;
        let len = (m & 0x1ff) as usize;
        if len == 0 {
            break;
        }
        let (v, k) = len_put[len];
        put!(v, k);
        let d0 = (m >> 9) as usize;
        let s = dist_sym(d0);
        let k = u32::from(dist_lens[s]);
        let extra = (d0 + 1 - usize::from(DIST_BASE[s])) as u32;
        put!(dist_codes[s] | (extra << k), k + u32::from(DIST_EXTRA[s]));
        at += len;
    }
    put!(lit_codes[256], u32::from(lit_lens[256]));
    (out.acc, out.n, out.at) = (acc, n, o);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Deterministic bytes of several kinds: text, binary with repeats, noise, runs.
    fn inputs() -> Vec<(&'static str, Vec<u8>)> {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let noise: Vec<u8> = (0..300_000).map(|_| rnd() as u8).collect();
        let text: Vec<u8> = (0..400_000)
            .map(|i| b"the quick brown fox jumps over the lazy dog; "[(i * 7 + i / 97) % 45])
            .collect();
        let mut binary = Vec::new();
        while binary.len() < 700_000 {
            let r = rnd();
            if r % 3 == 0 && binary.len() > 40_000 {
                // A repeat from up to ~40 KiB back: some reach past the window.
                let back = (r >> 8) as usize % 40_000 + 1;
                let len = (r >> 32) as usize % 300 + 1;
                let from = binary.len() - back;
                for k in 0..len {
                    let b = binary[from + k];
                    binary.push(b);
                }
            } else {
                binary.extend_from_slice(&r.to_le_bytes()[..(r >> 60) as usize % 8 + 1]);
            }
        }
        vec![
            ("empty", Vec::new()),
            ("one byte", vec![7]),
            ("zeros", vec![0; 500_000]),
            ("noise", noise),
            ("text", text),
            ("binary", binary),
            ("short text", b"abcabcabcabcabcxyz".to_vec()),
        ]
    }

    /// Blocks the way the parallel writer cuts them, concatenated into one raw stream.
    fn encode(p: &Params, data: &[u8], block: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            let end = (at + block).min(data.len());
            let last = end == data.len();
            out.extend(deflate_block(
                p,
                &data[at.saturating_sub(WINDOW)..at],
                &data[at..end],
                last,
            ));
            if last {
                return out;
            }
            at = end;
        }
    }

    fn inflate(raw: &[u8]) -> Vec<u8> {
        let mut got = Vec::new();
        flate2::read::DeflateDecoder::new(raw)
            .read_to_end(&mut got)
            .expect("a valid deflate stream");
        got
    }

    #[test]
    fn every_input_and_setting_round_trips() {
        let settings = [
            FAST,
            Params { ways: 1, ..FAST },
            Params {
                insert_max: 258,
                ..FAST
            },
            Params {
                skip_shift: 3,
                ..FAST
            },
            Params {
                block_syms: 0,
                ..FAST
            },
            Params {
                ways: 2,
                insert_max: 8,
                hash_bits: 9,
                ..FAST
            },
            Params {
                hash_bits: 10,
                ways: 1,
                insert_max: 16,
                skip_shift: 1,
                block_syms: 7,
            },
        ];
        for (name, data) in inputs() {
            for p in &settings {
                // (Tiny blocks: in the random test, on short inputs.)
                for block in [20_000, 128 * 1024, 1 << 20] {
                    let raw = encode(p, &data, block);
                    assert!(inflate(&raw) == data, "{name} {p:?} block {block}");
                }
            }
        }
    }

    #[test]
    fn random_inputs_and_settings_round_trip() {
        // A seeded property test: short inputs from small alphabets (many matches, long and
        // overlapping), every knob at random, blocks of any size.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n.max(1)
        };
        for case in 0..300 {
            let len = rnd(20_000) as usize;
            let alphabet = 1 + rnd(255) as u8;
            let mut data = Vec::with_capacity(len);
            while data.len() < len {
                if !data.is_empty() && rnd(3) == 0 {
                    let from = data.len() - 1 - rnd(data.len() as u64) as usize;
                    for k in 0..rnd(400) as usize {
                        let b = data[from + k % (data.len() - from)];
                        data.push(b);
                    }
                } else {
                    data.push(rnd(u64::from(alphabet)) as u8);
                }
            }
            data.truncate(len);
            let p = Params {
                hash_bits: 8 + rnd(9) as u32,
                ways: 1 + rnd(2) as usize,
                insert_max: rnd(300) as usize,
                skip_shift: rnd(7) as u32,
                block_syms: rnd(3000) as usize,
            };
            let block = 1 + rnd(6000) as usize;
            let raw = encode(&p, &data, block);
            assert!(
                inflate(&raw) == data,
                "case {case}: {p:?}, block {block}, {len} bytes"
            );
        }
    }

    #[test]
    fn blocks_use_their_dictionary_and_compress() {
        let data: Vec<u8> = (0..200_000u32)
            .map(|i| (i % 251) as u8 ^ (i / 5000) as u8)
            .collect();
        let with = deflate_block(&FAST, &data[..100_000], &data[100_000..], true);
        let without = deflate_block(&FAST, &[], &data[100_000..], true);
        assert!(
            with.len() < without.len(),
            "{} vs {}",
            with.len(),
            without.len()
        );
        // Decoding it needs the dictionary: as the tail of a stream that carries it.
        let head = deflate_block(&FAST, &[], &data[..100_000], false);
        assert_eq!(inflate(&[head, with].concat()), data);
        let text = inputs().remove(4).1;
        assert!(encode(&FAST, &text, 128 * 1024).len() < text.len() / 20);
    }

    #[test]
    fn incompressible_input_is_stored_not_grown() {
        let noise = inputs().remove(3).1;
        let raw = encode(&FAST, &noise, 128 * 1024);
        // Stored blocks: 5 bytes per 64 KiB plus the sync flushes.
        assert!(
            raw.len() < noise.len() + noise.len() / 1000 + 64,
            "{}",
            raw.len()
        );
    }

    #[test]
    fn code_lengths_are_complete_and_limited() {
        // Fibonacci weights make the unlimited code ~40 deep.
        let mut fib = vec![1u32, 1];
        while fib.len() < 40 {
            let n = fib[fib.len() - 1] + fib[fib.len() - 2];
            fib.push(n);
        }
        let cases: Vec<(Vec<u32>, u32)> = vec![
            (fib.clone(), 15),
            (fib.clone(), 7),
            (vec![0, 5, 0], 15),
            (vec![0, 0, 0], 15),
            (vec![3, 3, 3, 3], 15),
            (vec![1; 286], 15),
            ((1..=286).collect(), 15),
        ];
        for (freq, max) in cases {
            let mut lens = vec![0u8; freq.len()];
            code_lengths(&freq, max, &mut lens);
            assert!(lens.iter().all(|&l| u32::from(l) <= max), "{freq:?}");
            let kraft: f64 = lens
                .iter()
                .filter(|&&l| l > 0)
                .map(|&l| 0.5f64.powi(i32::from(l)))
                .sum();
            assert!((kraft - 1.0).abs() < 1e-12, "{freq:?}: Kraft sum {kraft}");
            for (s, &f) in freq.iter().enumerate() {
                assert!(
                    f == 0 || lens[s] > 0,
                    "{freq:?}: used symbol {s} has no code"
                );
            }
        }
        // The optimal lengths where no limit bites: 1, 2, 3, 3.
        let mut lens = [0u8; 4];
        code_lengths(&[8, 4, 2, 2], 15, &mut lens);
        assert_eq!(lens, [1, 2, 3, 3]);
    }

    #[test]
    fn tables_match_the_rfc() {
        for (len, &s) in LEN_SYM.iter().enumerate().skip(3) {
            let s = usize::from(s);
            let base = usize::from(LEN_BASE[s]);
            assert!(
                base <= len && len - base < 1 << LEN_EXTRA[s],
                "length {len}"
            );
        }
        assert_eq!(LEN_SYM[258], 28);
        assert_eq!(LEN_SYM[257], 27);
        for d in 1..=WINDOW {
            let s = dist_sym(d - 1);
            let base = usize::from(DIST_BASE[s]);
            assert!(base <= d && d - base < 1 << DIST_EXTRA[s], "distance {d}");
        }
    }
}
