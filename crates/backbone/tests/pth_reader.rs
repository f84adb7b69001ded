//! Checkpoint reading on files built by hand, byte by byte, in the layouts PyTorch writes.
//!
//! The pickles below are written the way CPython's pickler (protocol 2) writes them for
//! `torch.save`, so the reader is tested without PyTorch and without the real weights.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use patchcore_backbone::pth::{detect_format, read_state_dict, CheckpointFormat};
use patchcore_backbone::BackboneError;

/// A minimal protocol-2 pickle writer.
#[derive(Default)]
struct Pickle {
    out: Vec<u8>,
}

impl Pickle {
    fn new() -> Self {
        Self { out: vec![0x80, 2] }
    }
    fn op(&mut self, b: u8) -> &mut Self {
        self.out.push(b);
        self
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.out.push(b'c');
        self.out.extend_from_slice(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'\n');
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
        self
    }
    fn int(&mut self, v: u32) -> &mut Self {
        if v < 256 {
            self.out.extend_from_slice(&[b'K', v as u8]);
        } else if v < 65536 {
            self.out.push(b'M');
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else {
            self.out.push(b'J');
            self.out.extend_from_slice(&v.to_le_bytes());
        }
        self
    }
    fn tuple(&mut self, items: &[u32]) -> &mut Self {
        self.op(b'(');
        for &i in items {
            self.int(i);
        }
        self.op(b't')
    }
    fn put(&mut self, id: u8) -> &mut Self {
        self.out.extend_from_slice(&[b'q', id]);
        self
    }
    fn get(&mut self, id: u8) -> &mut Self {
        self.out.extend_from_slice(&[b'h', id]);
        self
    }
    fn stop(&mut self) -> Vec<u8> {
        self.out.push(b'.');
        std::mem::take(&mut self.out)
    }

    /// `_rebuild_tensor_v2(persistent_id(storage), offset, size, stride, False, OrderedDict())`.
    #[allow(clippy::too_many_arguments)]
    fn tensor(
        &mut self,
        storage_type: &str,
        key: &str,
        numel: u32,
        view: Option<(&str, u32, u32)>,
        offset: u32,
        size: &[u32],
        stride: &[u32],
    ) -> &mut Self {
        self.global("torch._utils", "_rebuild_tensor_v2").op(b'(');
        self.op(b'(')
            .str("storage")
            .global("torch", storage_type)
            .str(key)
            .str("cpu")
            .int(numel);
        match view {
            None => self.op(b'N'),
            Some((k, o, n)) => self.op(b'(').str(k).int(o).int(n).op(b't'),
        };
        self.op(b't').op(b'Q');
        self.int(offset).tuple(size).tuple(stride).op(0x89);
        self.global("collections", "OrderedDict").op(b')').op(b'R');
        self.op(b't').op(b'R')
    }
}

fn le_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The pickles that precede the object in a legacy file.
fn legacy_header() -> Vec<u8> {
    let mut out = vec![0x80, 2, 0x8a, 10];
    out.extend_from_slice(&0x1950a86a20f9469cfc6cu128.to_le_bytes()[..10]);
    out.push(b'.');
    out.extend(Pickle::new().int(1001).stop());
    let mut p = Pickle::new();
    p.op(b'}').put(0).op(b'(');
    p.str("protocol_version").int(1001);
    p.str("little_endian").op(0x88);
    p.str("type_sizes").op(b'}').op(b'(');
    p.str("short")
        .int(2)
        .str("int")
        .int(4)
        .str("long")
        .int(4)
        .op(b'u');
    p.op(b'u');
    out.extend(p.stop());
    out
}

/// The legacy checkpoint used by most tests, and the tensors it must yield.
///
/// Storage `k0` (12 floats, 0 … 11) is shared by three tensors: a (3, 4) matrix, a (4,) slice at
/// offset 4 and a transposed (4, 3) view with strides (1, 4). Other storages hold a
/// half, a long, a double and a view-of-storage tensor (old PyTorch's `view_metadata`).
fn legacy_checkpoint(prefix: &str) -> Vec<u8> {
    let mut out = legacy_header();
    let mut p = Pickle::new();
    p.global("collections", "OrderedDict")
        .put(0)
        .op(b')')
        .op(b'R')
        .put(1);
    p.op(b'(');
    p.str(&format!("{prefix}a.weight"))
        .tensor("FloatStorage", "k0", 12, None, 0, &[3, 4], &[4, 1]);
    p.str(&format!("{prefix}a.bias"))
        .tensor("FloatStorage", "k0", 12, None, 4, &[4], &[1]);
    p.str(&format!("{prefix}t"))
        .tensor("FloatStorage", "k0", 12, None, 0, &[4, 3], &[1, 4]);
    p.str(&format!("{prefix}h"))
        .tensor("HalfStorage", "k1", 3, None, 0, &[3], &[1]);
    p.str(&format!("{prefix}l"))
        .tensor("LongStorage", "k2", 2, None, 0, &[2], &[1]);
    p.str(&format!("{prefix}d"))
        .tensor("DoubleStorage", "k3", 2, None, 0, &[1, 2], &[2, 1]);
    p.str(&format!("{prefix}v")).tensor(
        "FloatStorage",
        "k4",
        6,
        Some(("k4v", 2, 3)),
        1,
        &[2],
        &[1],
    );
    // A scalar, as `num_batches_tracked` is.
    p.str(&format!("{prefix}n"))
        .tensor("LongStorage", "k5", 1, None, 0, &[], &[]);
    p.op(b'u');
    // The state dict's `_metadata` attribute, set through BUILD as PyTorch does.
    p.op(b'}')
        .op(b'(')
        .str("_metadata")
        .get(0)
        .op(b')')
        .op(b'R')
        .op(b'u')
        .op(b'b');
    out.extend(p.stop());

    // The storage keys, deliberately not in the order of first use.
    let keys = ["k3", "k0", "k2", "k1", "k5", "k4"];
    let mut p = Pickle::new();
    p.op(b']').op(b'(');
    for k in keys {
        p.str(k);
    }
    p.op(b'e');
    out.extend(p.stop());
    for k in keys {
        let (n, bytes): (u64, Vec<u8>) = match k {
            "k0" => (12, le_f32(&(0..12).map(|i| i as f32).collect::<Vec<_>>())),
            "k1" => (
                3,
                [1.5f32, -2.0, 0.25]
                    .iter()
                    .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                    .collect(),
            ),
            "k2" => (
                2,
                [-7i64, 1 << 40]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            "k3" => (
                2,
                [0.1f64, -3.5]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            "k4" => (6, le_f32(&[10.0, 11.0, 12.0, 13.0, 14.0, 15.0])),
            "k5" => (1, 42i64.to_le_bytes().to_vec()),
            _ => unreachable!(),
        };
        out.extend_from_slice(&n.to_le_bytes());
        out.extend(bytes);
    }
    out
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn get<'a>(t: &'a [(String, Tensor)], k: &str) -> &'a Tensor {
    &t.iter()
        .find(|(n, _)| n == k)
        .unwrap_or_else(|| panic!("{k} missing"))
        .1
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn legacy_format_offsets_strides_and_dtypes() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "model.pth", &legacy_checkpoint(""));
    assert_eq!(
        detect_format(&path).unwrap(),
        CheckpointFormat::LegacyPickle
    );
    let t = read_state_dict(&path, &Device::Cpu).unwrap();
    let names: Vec<&str> = t.iter().map(|(n, _)| n.as_str()).collect();
    // File order, with the non-tensor `_metadata` skipped.
    assert_eq!(names, ["a.weight", "a.bias", "t", "h", "l", "d", "v", "n"]);

    let w = get(&t, "a.weight");
    assert_eq!(w.dims(), &[3, 4]);
    assert_eq!(f32s(w), (0..12).map(|i| i as f32).collect::<Vec<_>>());
    // Shared storage at a non-zero offset.
    assert_eq!(f32s(get(&t, "a.bias")), [4.0, 5.0, 6.0, 7.0]);
    // A transposed view: element (i, j) is storage[i + 4 j].
    let tr = get(&t, "t");
    assert_eq!(tr.dims(), &[4, 3]);
    assert_eq!(
        tr.to_vec2::<f32>().unwrap(),
        [[0., 4., 8.], [1., 5., 9.], [2., 6., 10.], [3., 7., 11.]]
    );
    let h = get(&t, "h");
    assert_eq!(h.dtype(), DType::F16);
    assert_eq!(f32s(&h.to_dtype(DType::F32).unwrap()), [1.5, -2.0, 0.25]);
    let l = get(&t, "l");
    assert_eq!(l.dtype(), DType::I64);
    assert_eq!(l.to_vec1::<i64>().unwrap(), [-7, 1 << 40]);
    let d = get(&t, "d");
    assert_eq!(d.dtype(), DType::F64);
    assert_eq!(d.to_vec2::<f64>().unwrap(), [[0.1, -3.5]]);
    // A storage view starting at element 2 of the root, then offset 1 within the view.
    assert_eq!(f32s(get(&t, "v")), [13.0, 14.0]);
    let n = get(&t, "n");
    assert_eq!(n.dims(), &[] as &[usize]);
    assert_eq!(n.to_scalar::<i64>().unwrap(), 42);
}

#[test]
fn module_prefix_is_stripped() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "dp.pth", &legacy_checkpoint("module."));
    let t = read_state_dict(&path, &Device::Cpu).unwrap();
    assert_eq!(t[0].0, "a.weight");
    assert!(t.iter().all(|(k, _)| !k.starts_with("module.")));
}

#[test]
fn truncated_legacy_files_give_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let full = legacy_checkpoint("");
    for len in (0..full.len()).step_by(7).chain([full.len() - 1]) {
        let path = write(dir.path(), "cut.pth", &full[..len]);
        match read_state_dict(&path, &Device::Cpu) {
            Err(e @ BackboneError::Format { .. }) => {
                assert!(e.to_string().contains("cut.pth"), "{e}")
            }
            other => panic!("prefix of {len} bytes: expected a format error, got {other:?}"),
        }
    }
}

#[test]
fn corrupt_legacy_files_give_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let full = legacy_checkpoint("");
    // Flip bytes all over the file; whatever happens must be an Ok or an Err, never a panic.
    for i in (0..full.len()).step_by(3) {
        let mut bad = full.clone();
        bad[i] ^= 0x5a;
        let path = write(dir.path(), "flip.pth", &bad);
        let _ = read_state_dict(&path, &Device::Cpu);
    }
    // A storage whose declared size disagrees with the tensor that uses it.
    let mut bad = legacy_checkpoint("");
    let pos = bad.len() - (8 + 6 * 4) - (8 + 8) - (8 + 6) - (8 + 16) - (8 + 48) - (8 + 16);
    assert_eq!(&bad[pos..pos + 8], &2u64.to_le_bytes());
    bad[pos] = 3;
    let path = write(dir.path(), "size.pth", &bad);
    let err = read_state_dict(&path, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("k3"), "{err}");
}

#[test]
fn tensors_reaching_past_their_storage_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut out = legacy_header();
    let mut p = Pickle::new();
    p.op(b'}').op(b'(');
    p.str("x")
        .tensor("FloatStorage", "s", 4, None, 2, &[2, 2], &[2, 1]);
    p.op(b'u');
    out.extend(p.stop());
    let mut p = Pickle::new();
    p.op(b']').str("s").op(b'a');
    out.extend(p.stop());
    out.extend_from_slice(&4u64.to_le_bytes());
    out.extend(le_f32(&[0.0; 4]));
    let path = write(dir.path(), "oob.pth", &out);
    let err = read_state_dict(&path, &Device::Cpu).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("oob.pth") && msg.contains("`x`"), "{msg}");
}

#[test]
fn unsupported_storage_types_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut out = legacy_header();
    let mut p = Pickle::new();
    p.op(b'}').op(b'(');
    p.str("q")
        .tensor("QInt8Storage", "s", 1, None, 0, &[1], &[1]);
    p.op(b'u');
    out.extend(p.stop());
    out.extend(Pickle::new().op(b']').str("s").op(b'a').stop());
    out.extend_from_slice(&1u64.to_le_bytes());
    out.push(0);
    let path = write(dir.path(), "q.pth", &out);
    match read_state_dict(&path, &Device::Cpu) {
        Err(BackboneError::UnsupportedStorage {
            key, storage_type, ..
        }) => {
            assert_eq!(key, "q");
            assert_eq!(storage_type, "QInt8Storage");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn garbage_empty_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let empty = write(dir.path(), "empty.pth", b"");
    let err = read_state_dict(&empty, &Device::Cpu).unwrap_err();
    assert!(matches!(err, BackboneError::Format { .. }));
    assert!(err.to_string().contains("empty.pth"));

    let text = write(
        dir.path(),
        "notes.pth",
        b"this is not a checkpoint at all\n",
    );
    let err = read_state_dict(&text, &Device::Cpu).unwrap_err();
    assert!(matches!(err, BackboneError::Format { .. }));
    assert!(err.to_string().contains("notes.pth"));

    // Pseudo-random bytes that start like a legacy checkpoint.
    let mut junk = vec![0x80, 2, 0x8a, 10];
    let mut s = 0x1234_5678u32;
    for _ in 0..4096 {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        junk.push(s as u8);
    }
    let junk_path = write(dir.path(), "junk.pth", &junk);
    assert!(matches!(
        read_state_dict(&junk_path, &Device::Cpu),
        Err(BackboneError::Format { .. })
    ));
    // The same bytes behind a zip or safetensors signature.
    junk[..4].copy_from_slice(b"PK\x03\x04");
    let zip_path = write(dir.path(), "junk.zip", &junk);
    assert!(matches!(
        read_state_dict(&zip_path, &Device::Cpu),
        Err(BackboneError::Format { .. })
    ));
    junk[..9].copy_from_slice(&[16, 0, 0, 0, 0, 0, 0, 0, b'{']);
    let st_path = write(dir.path(), "junk.safetensors", &junk);
    assert!(matches!(
        read_state_dict(&st_path, &Device::Cpu),
        Err(BackboneError::Format { .. })
    ));

    let missing = dir.path().join("nope.pth");
    match read_state_dict(&missing, &Device::Cpu) {
        Err(e @ BackboneError::Io { .. }) => assert!(e.to_string().contains("nope.pth")),
        other => panic!("{other:?}"),
    }
}

/// CRC-32 (IEEE), as zip needs.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A zip archive with stored (uncompressed) entries.
fn zip(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let offset = out.len() as u32;
        let crc = crc32(data);
        let header = |sig: u32, central: bool| {
            let mut h = Vec::new();
            h.extend_from_slice(&sig.to_le_bytes());
            if central {
                h.extend_from_slice(&20u16.to_le_bytes());
            }
            h.extend_from_slice(&20u16.to_le_bytes()); // version needed
            h.extend_from_slice(&0u16.to_le_bytes()); // flags
            h.extend_from_slice(&0u16.to_le_bytes()); // stored
            h.extend_from_slice(&0u16.to_le_bytes()); // time
            h.extend_from_slice(&0x21u16.to_le_bytes()); // 1980-01-01
            h.extend_from_slice(&crc.to_le_bytes());
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&(name.len() as u16).to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes()); // extra
            if central {
                h.extend_from_slice(&[0; 6]); // comment length, disk, internal attributes
                h.extend_from_slice(&0u32.to_le_bytes()); // external attributes
                h.extend_from_slice(&offset.to_le_bytes());
            }
            h.extend_from_slice(name.as_bytes());
            h
        };
        out.extend(header(0x0403_4b50, false));
        out.extend_from_slice(data);
        central.extend(header(0x0201_4b50, true));
    }
    let cd_offset = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

/// A zip-format checkpoint: storage `0` (8 floats) shared by a (2, 3) matrix at offset 0 and a
/// (2,) slice at offset 6, and storage `1` holding a (3, 2) tensor stored column-major.
fn zip_checkpoint(prefix: &str) -> Vec<u8> {
    let mut p = Pickle::new();
    p.global("collections", "OrderedDict")
        .op(b')')
        .op(b'R')
        .op(b'(');
    p.str(&format!("{prefix}m"))
        .tensor("FloatStorage", "0", 8, None, 0, &[2, 3], &[3, 1]);
    p.str(&format!("{prefix}s"))
        .tensor("FloatStorage", "0", 8, None, 6, &[2], &[1]);
    p.str(&format!("{prefix}f"))
        .tensor("FloatStorage", "1", 6, None, 0, &[3, 2], &[1, 3]);
    p.op(b'u');
    let pkl = p.stop();
    zip(&[
        ("archive/data.pkl", pkl),
        ("archive/data/0", le_f32(&[0., 1., 2., 3., 4., 5., 6., 7.])),
        ("archive/data/1", le_f32(&[1., 2., 3., 4., 5., 6.])),
        ("archive/version", b"3\n".to_vec()),
    ])
}

#[test]
fn zip_format_with_shared_storage_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "new.pth", &zip_checkpoint("module."));
    assert_eq!(detect_format(&path).unwrap(), CheckpointFormat::Zip);
    let t = read_state_dict(&path, &Device::Cpu).unwrap();
    let names: Vec<&str> = t.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["m", "s", "f"]);
    assert_eq!(
        get(&t, "m").to_vec2::<f32>().unwrap(),
        [[0., 1., 2.], [3., 4., 5.]]
    );
    assert_eq!(f32s(get(&t, "s")), [6., 7.]);
    // Column-major storage [1 … 6] of a (3, 2) tensor: element (i, j) = storage[i + 3 j].
    assert_eq!(
        get(&t, "f").to_vec2::<f32>().unwrap(),
        [[1., 4.], [2., 5.], [3., 6.]]
    );
}

#[test]
fn truncated_zip_files_give_errors() {
    let dir = tempfile::tempdir().unwrap();
    let full = zip_checkpoint("");
    for len in (4..full.len()).step_by(5) {
        let path = write(dir.path(), "cut.zip", &full[..len]);
        match read_state_dict(&path, &Device::Cpu) {
            Err(e) => assert!(e.to_string().contains("cut.zip"), "{e}"),
            Ok(t) => panic!("prefix of {len} bytes parsed: {t:?}"),
        }
    }
}

#[test]
fn safetensors_files_are_read_and_truncation_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let a = Tensor::arange(0f32, 6., &Device::Cpu)
        .unwrap()
        .reshape((2, 3))
        .unwrap();
    let b = Tensor::new(&[5i64], &Device::Cpu).unwrap();
    let map: std::collections::HashMap<String, Tensor> =
        [("b".to_string(), b), ("a".to_string(), a)]
            .into_iter()
            .collect();
    candle_core::safetensors::save(&map, &path).unwrap();
    assert_eq!(detect_format(&path).unwrap(), CheckpointFormat::Safetensors);
    let t = read_state_dict(&path, &Device::Cpu).unwrap();
    assert_eq!(t[0].0, "a");
    assert_eq!(t[1].0, "b");
    assert_eq!(
        t[0].1.to_vec2::<f32>().unwrap(),
        [[0., 1., 2.], [3., 4., 5.]]
    );

    let bytes = std::fs::read(&path).unwrap();
    let cut = write(dir.path(), "cut.safetensors", &bytes[..bytes.len() - 3]);
    let err = read_state_dict(&cut, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("cut.safetensors"), "{err}");
}
