//! Compression detection and transparent decompression of layer streams.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod apply_util;

use std::io::{Read, Write};

use archive::{ApplyOptions, Compression, Error, apply_layer, decompress, detect_compression};

fn tar() -> Vec<u8> {
    apply_util::Tb::new()
        .file("f", &vec![b'z'; 100_000])
        .finish()
}

fn compressed(c: Compression, data: &[u8]) -> Vec<u8> {
    match c {
        Compression::None => data.to_vec(),
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(data, 3).unwrap(),
        Compression::Xz => {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Compression::Bzip2 => {
            let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
    }
}

#[test]
fn detect_and_decompress_every_format() {
    let plain = tar();
    for c in [
        Compression::None,
        Compression::Gzip,
        Compression::Zstd,
        Compression::Xz,
        Compression::Bzip2,
    ] {
        let bytes = compressed(c, &plain);
        assert_eq!(detect_compression(&bytes[..bytes.len().min(512)]), Some(c));
        let mut out = Vec::new();
        decompress(&bytes[..])
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, plain, "{c:?}");
        let d = tempfile::tempdir().unwrap();
        let n = apply_layer(
            d.path(),
            decompress(&bytes[..]).unwrap(),
            &ApplyOptions::default(),
        )
        .unwrap();
        assert_eq!(n, 100_000);
    }
}

#[test]
fn concatenated_gzip_members_are_read() {
    let mut bytes = compressed(Compression::Gzip, b"abc");
    bytes.extend(compressed(Compression::Gzip, b"def"));
    let mut out = Vec::new();
    decompress(&bytes[..])
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    assert_eq!(out, b"abcdef");
}

#[test]
fn empty_and_zero_blocks_are_tar() {
    assert_eq!(detect_compression(b""), Some(Compression::None));
    assert_eq!(detect_compression(&[0u8; 1024]), Some(Compression::None));
}

#[test]
fn unknown_bytes_are_shown() {
    let bytes = b"PK\x03\x04 this is a zip file, not a layer".repeat(20);
    assert_eq!(detect_compression(&bytes), None);
    let err = decompress(&bytes[..]).err().unwrap();
    assert!(
        matches!(&err, Error::UnknownFormat { magic } if magic == b"PK\x03\x04 thi"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("0x50 0x4b 0x03 0x04 0x20 0x74 0x68 0x69 (hex)"),
        "{err}"
    );
}
