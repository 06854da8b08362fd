//! Compressor benchmark: stdin through imgbuild's layer encoder (src/compress.rs), compressed
//! bytes to stdout. `bench/compression.sh` times it per level on one core against the gzip,
//! libdeflate, ISA-L and zstd command-line tools.
//!
//!   deflate [--codec gzip|zstd] [--level N] [--threads N] [--block-kib N] [--own P] < in.tar > out.gz
//!
//! `--block-kib` (gzip only) tries another block size than the layers' 128 KiB; `--own P`
//! (gzip only) runs imgbuild's own encoder (src/deflate.rs) with the parameters
//! `HASH_BITS,WAYS,INSERT_MAX,SKIP_SHIFT[,BLOCK_SYMS]`.

use std::io::{self, BufWriter, Read, Write};

fn main() -> io::Result<()> {
    let mut codec = imgbuild::compress::Codec::Gzip;
    let mut level = None;
    let mut threads = 1usize;
    let mut block = None;
    let mut own = None;
    let mut args = std::env::args().skip(1);
    // `cargo test --all-targets` runs this binary with no arguments: say how to use it rather
    // than wait on stdin (a CI step that hangs is worse than one that fails).
    if args.len() == 0 {
        eprintln!(
            "usage: deflate [--codec gzip|zstd] --level N [--threads N] [--block-kib N] [--own P] <in >out"
        );
        return Ok(());
    }
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_default();
        match a.as_str() {
            "--codec" => codec = v.parse().map_err(io::Error::other)?,
            "--level" => level = Some(v.parse().map_err(io::Error::other)?),
            "--threads" => threads = v.parse().map_err(io::Error::other)?,
            // `--own HASH_BITS,WAYS,INSERT_MAX,SKIP_SHIFT[,BLOCK_SYMS]`: imgbuild's own encoder with those
            // parameters (src/deflate.rs).
            "--own" => {
                let n: Vec<u32> = v
                    .split(',')
                    .map(|x| x.parse().map_err(io::Error::other))
                    .collect::<io::Result<_>>()?;
                own = Some(imgbuild::deflate::Params {
                    hash_bits: n[0],
                    ways: n[1] as usize,
                    insert_max: n[2] as usize,
                    skip_shift: n[3],
                    block_syms: n.get(4).map_or(0, |&b| b as usize),
                });
            }
            "--block-kib" => block = Some(v.parse::<usize>().map_err(io::Error::other)? << 10),
            _ => return Err(io::Error::other(format!("unknown argument {a}"))),
        }
    }
    let c = imgbuild::compress::Compression::new(codec, level).map_err(io::Error::other)?;
    let out = BufWriter::with_capacity(1 << 20, io::stdout().lock());
    let mut e = match (block, own) {
        (None, None) => imgbuild::compress::Encoder::new(out, c, threads)?,
        _ if codec == imgbuild::compress::Codec::Gzip => {
            use imgbuild::compress::{Engine, GZIP_BLOCK, ParGzWriter};
            let engine = own.map_or(Engine::for_level(c.level), Engine::Own);
            imgbuild::compress::Encoder::Gzip(ParGzWriter::with_engine(
                out,
                engine,
                threads,
                block.unwrap_or(GZIP_BLOCK),
            ))
        }
        _ => imgbuild::compress::Encoder::new(out, c, threads)?,
    };
    let mut input = io::stdin().lock();
    // The layer writer hands the encoder 1 MiB pieces (src/layer.rs).
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        e.write_all(&buf[..n])?;
    }
    e.finish()?.flush()
}
