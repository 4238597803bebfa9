//! Hostile checkpoints made cheaply: `torch.save` zip files whose storages are deflated entries
//! inflating to far more than the file holds (shared by tests/checkpoint.rs and
//! examples/load_checkpoint.rs).
#![allow(dead_code)]

use residual::checkpoint::{pickle::pickle_state_dict, DType};

/// A `torch.save` zip file holding `name`, a 1-D fp32 tensor of `numel` zeros (`numel * 4` a
/// multiple of 1 MiB, below 4 GiB), as one deflated storage entry about 1000 times smaller.
pub fn torch_zip_bomb(name: &str, numel: i64) -> Vec<u8> {
    let inflated = numel as usize * 4;
    let pickle = pickle_state_dict(&[(name.to_string(), DType::F32, vec![numel])]);
    let mut zip = ZipWriter::default();
    zip.stored("archive/data.pkl", &pickle);
    zip.stored("archive/byteorder", b"little");
    zip.deflated("archive/data/0", &deflated_zeros(inflated), inflated as u32);
    zip.stored("archive/version", b"3\n");
    zip.finish()
}

/// A raw deflate stream of `len` zeros (`len` a multiple of 1 MiB), made by repeating the
/// compressed form of 1 MiB: zeros reference only zeros, so the blocks chain.
pub fn deflated_zeros(len: usize) -> Vec<u8> {
    use flate2::{Compress, Compression, FlushCompress};
    const CHUNK: usize = 1 << 20;
    let chunk = |flush| {
        let mut c = Compress::new(Compression::best(), false);
        let mut out = Vec::with_capacity(CHUNK);
        c.compress_vec(&vec![0u8; CHUNK], &mut out, flush).unwrap();
        out
    };
    let block = chunk(FlushCompress::Sync);
    let mut out = Vec::with_capacity(block.len() * (len / CHUNK) + 16);
    for _ in 0..len / CHUNK {
        out.extend_from_slice(&block);
    }
    // A final empty block ends the stream.
    let mut c = Compress::new(Compression::best(), false);
    let mut end = Vec::with_capacity(16);
    c.compress_vec(&[], &mut end, FlushCompress::Finish)
        .unwrap();
    out.extend_from_slice(&end);
    out
}

/// A minimal zip writer (no zip64) that takes deflated data as it is.
#[derive(Default)]
pub struct ZipWriter {
    out: Vec<u8>,
    central: Vec<u8>,
    count: u16,
}

impl ZipWriter {
    pub fn stored(&mut self, name: &str, data: &[u8]) {
        let crc = crc32(data);
        self.entry(name, 0, data, data.len() as u32, crc);
    }

    pub fn deflated(&mut self, name: &str, data: &[u8], inflated: u32) {
        // The checksum of the zeros is not computed: nothing here checks it.
        self.entry(name, 8, data, inflated, 0);
    }

    pub fn entry(&mut self, name: &str, method: u16, data: &[u8], size: u32, crc: u32) {
        let offset = self.out.len() as u32;
        let fields = |sig: u32, central: bool| {
            let mut h = Vec::new();
            h.extend_from_slice(&sig.to_le_bytes());
            if central {
                h.extend_from_slice(&20u16.to_le_bytes());
            }
            h.extend_from_slice(&20u16.to_le_bytes()); // version needed
            h.extend_from_slice(&0u16.to_le_bytes()); // flags
            h.extend_from_slice(&method.to_le_bytes());
            h.extend_from_slice(&0u32.to_le_bytes()); // time, date
            h.extend_from_slice(&crc.to_le_bytes());
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&size.to_le_bytes());
            h.extend_from_slice(&(name.len() as u16).to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes()); // extra
            if central {
                h.extend_from_slice(&[0u8; 6]); // comment, disk, internal attributes
                h.extend_from_slice(&0u32.to_le_bytes()); // external attributes
                h.extend_from_slice(&offset.to_le_bytes());
            }
            h.extend_from_slice(name.as_bytes());
            h
        };
        self.out.extend(fields(0x04034b50, false));
        self.out.extend_from_slice(data);
        self.central.extend(fields(0x02014b50, true));
        self.count += 1;
    }

    pub fn finish(mut self) -> Vec<u8> {
        let start = self.out.len() as u32;
        self.out.extend_from_slice(&self.central);
        self.out.extend_from_slice(&0x06054b50u32.to_le_bytes());
        self.out.extend_from_slice(&[0u8; 4]);
        self.out.extend_from_slice(&self.count.to_le_bytes());
        self.out.extend_from_slice(&self.count.to_le_bytes());
        self.out
            .extend_from_slice(&(self.central.len() as u32).to_le_bytes());
        self.out.extend_from_slice(&start.to_le_bytes());
        self.out.extend_from_slice(&0u16.to_le_bytes());
        self.out
    }
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    crc.update(data);
    crc.sum()
}

/// `data` as a raw deflate stream at `level` (0: stored blocks, quick for large records).
pub fn deflate(data: &[u8], level: u32) -> Vec<u8> {
    use flate2::{Compress, Compression, FlushCompress};
    let mut c = Compress::new(Compression::new(level), false);
    let mut out = Vec::with_capacity(data.len() + data.len() / 1000 + 64);
    loop {
        let consumed = c.total_in() as usize;
        if out.len() == out.capacity() {
            out.reserve(1 << 16);
        }
        let status = c
            .compress_vec(&data[consumed..], &mut out, FlushCompress::Finish)
            .unwrap();
        if status == flate2::Status::StreamEnd {
            return out;
        }
    }
}

/// The zip file `zip` (a `torch.save` file) with every record deflated at `level`, as zip tools
/// other than `torch.save` write them.
pub fn deflated_copy(zip: &[u8], level: u32) -> Vec<u8> {
    use std::io::Read;
    let mut archive = residual::checkpoint::formats::open_zip(zip).unwrap();
    let mut out = ZipWriter::default();
    for i in 0..archive.len() {
        let mut file = archive.by_index(i).unwrap();
        let name = file.name().unwrap().to_string();
        let mut data = Vec::new();
        file.read_to_end(&mut data).unwrap();
        out.entry(
            &name,
            8,
            &deflate(&data, level),
            data.len() as u32,
            crc32(&data),
        );
    }
    out.finish()
}
