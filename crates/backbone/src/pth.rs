//! Reading PyTorch checkpoints (`.pth`, `.pt`) and safetensors files into named candle tensors.
//!
//! Three on-disk formats are recognised by their first bytes, whatever the file is called:
//!
//! * **Legacy PyTorch serialisation** (written by `torch.save` before PyTorch 1.6, or later with
//!   `_use_new_zipfile_serialization=False`). The file is a sequence of pickles: the magic number
//!   `0x1950a86a20f9469cfc6c`, the protocol version `1001`, a dict describing the writing system,
//!   the pickled object itself, and a pickled list of storage keys. After the last pickle comes,
//!   for every key of that list in order, the storage: an 8-byte little-endian element count
//!   followed by the raw little-endian elements. Tensors inside the object are rebuilt through
//!   `torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, ...)`, where the
//!   storage is a persistent id `("storage", storage_type, key, location, numel[, view])`. This
//!   module unpickles with candle's [`candle_core::pickle::Stack`] and implements the storage,
//!   offset and stride logic itself, so tensors that share a storage, start at an offset into it
//!   or are not contiguous are all materialised correctly.
//! * **Zip serialisation** (PyTorch 1.6 and later), read through candle's
//!   [`candle_core::pickle::PthTensors`].
//! * **safetensors**, read through [`candle_core::safetensors`].
//!
//! Keys keep their state-dict spelling, except that a leading `module.` (left by
//! `torch.nn.DataParallel`) is stripped when every tensor key carries it.

use std::collections::HashMap;
use std::io::{BufRead, Cursor, Read};
use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};

use crate::error::{BackboneError, Result};

/// The magic number that opens a legacy PyTorch checkpoint, as PyTorch pickles it.
const LEGACY_MAGIC: u128 = 0x1950a86a20f9469cfc6c;
/// The only legacy protocol version PyTorch has ever written.
const LEGACY_PROTOCOL_VERSION: i64 = 1001;

/// The on-disk formats [`read_state_dict`] understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointFormat {
    /// The pre-1.6 PyTorch format: consecutive pickles followed by raw storages.
    LegacyPickle,
    /// The zip-based PyTorch format (1.6 and later).
    Zip,
    /// A safetensors file.
    Safetensors,
}

/// Reads every tensor of a checkpoint.
///
/// PyTorch checkpoints keep the state dict's order; safetensors files, which have no order,
/// come sorted by name. The format is detected from the file's first bytes (see
/// [`detect_format`]). Tensors keep the
/// element type they were saved with and are placed on `device`. Entries of the state dict that
/// are not tensors (such as PyTorch's `_metadata`) are skipped. If the object in the file is a
/// dict without tensors but with a `state_dict`, `model` or `model_state_dict` entry, that entry
/// is read instead. A leading `module.` is stripped from the keys when all of them carry it.
///
/// # Errors
///
/// [`BackboneError::Io`] when the file cannot be read, [`BackboneError::Format`] when it is not a
/// checkpoint, is truncated or is corrupt, and [`BackboneError::UnsupportedStorage`] for element
/// types candle does not have. All of them name the file.
pub fn read_state_dict(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let tensors = match detect_format(path)? {
        CheckpointFormat::LegacyPickle => {
            let bytes = std::fs::read(path).map_err(|source| io_error(path, source))?;
            read_legacy_bytes(path, &bytes, device)?
        }
        CheckpointFormat::Zip => read_zip(path, device)?,
        CheckpointFormat::Safetensors => read_safetensors(path, device)?,
    };
    if tensors.is_empty() {
        return Err(format_error(path, "the file holds no tensors"));
    }
    Ok(strip_module_prefix(tensors))
}

/// Detects the format of a checkpoint from its first bytes.
///
/// # Errors
///
/// [`BackboneError::Io`] when the file cannot be read and [`BackboneError::Format`] when its
/// first bytes match none of the supported formats.
pub fn detect_format(path: &Path) -> Result<CheckpointFormat> {
    let mut head = Vec::with_capacity(16);
    std::fs::File::open(path)
        .and_then(|f| f.take(16).read_to_end(&mut head))
        .map_err(|source| io_error(path, source))?;
    if head.starts_with(b"PK\x03\x04") {
        return Ok(CheckpointFormat::Zip);
    }
    // A legacy checkpoint starts with `PROTO n` followed by `LONG1 10` and the magic number.
    if head.len() >= 4 && head[0] == 0x80 && head[2] == 0x8a && head[3] == 10 {
        return Ok(CheckpointFormat::LegacyPickle);
    }
    // A safetensors file starts with the u64 length of its JSON header, then the header's `{`.
    if head.len() >= 9 && head[8] == b'{' {
        return Ok(CheckpointFormat::Safetensors);
    }
    let reason = if head.is_empty() {
        "the file is empty".to_string()
    } else {
        "unrecognised format (expected a PyTorch .pth file, legacy or zip, or a safetensors file)"
            .to_string()
    };
    Err(format_error(path, reason))
}

/// Reads a legacy (pre-1.6) PyTorch checkpoint held in memory.
///
/// `path` only serves to name the file in errors. See the [module documentation](self) for the
/// layout of the format.
///
/// # Errors
///
/// [`BackboneError::Format`] when the bytes are not a complete legacy checkpoint, and
/// [`BackboneError::UnsupportedStorage`] for storage types candle cannot represent.
pub fn read_legacy_bytes(
    path: &Path,
    bytes: &[u8],
    device: &Device,
) -> Result<Vec<(String, Tensor)>> {
    let mut cursor = Cursor::new(bytes);

    // The magic number is a 10-byte LONG1, which candle's unpickler cannot represent in an i64,
    // so this fixed pickle is checked byte by byte.
    let mut magic = [0u8; 15];
    cursor
        .read_exact(&mut magic)
        .map_err(|_| format_error(path, "truncated before the magic number"))?;
    let expected: [u8; 10] = LEGACY_MAGIC.to_le_bytes()[..10]
        .try_into()
        .map_err(|_| format_error(path, "internal error: magic number length"))?;
    if magic[0] != 0x80
        || magic[2..4] != [0x8a, 10]
        || magic[4..14] != expected
        || magic[14] != b'.'
    {
        return Err(format_error(
            path,
            "bad magic number: not a legacy PyTorch checkpoint",
        ));
    }

    let version = unpickle(path, &mut cursor, "protocol version")?;
    match version {
        Object::Int(v) if i64::from(v) == LEGACY_PROTOCOL_VERSION => {}
        Object::Long(v) if v == LEGACY_PROTOCOL_VERSION => {}
        other => {
            return Err(format_error(
                path,
                format!("unsupported legacy protocol version {other:?} (expected 1001)"),
            ))
        }
    }

    let sys_info = unpickle(path, &mut cursor, "system info")?;
    if let Object::Dict(entries) = &sys_info {
        for (k, v) in entries {
            if matches!(k, Object::Unicode(s) if s == "little_endian") && *v == Object::Bool(false)
            {
                return Err(format_error(
                    path,
                    "the checkpoint was written on a big-endian machine, which is not supported",
                ));
            }
        }
    }

    let object = unpickle(path, &mut cursor, "state dict")?;
    let keys_obj = unpickle(path, &mut cursor, "storage key list")?;
    let keys = match keys_obj {
        Object::List(keys) => keys
            .into_iter()
            .map(|k| match k {
                Object::Unicode(s) => Ok(s),
                Object::Int(i) => Ok(i.to_string()),
                Object::Long(i) => Ok(i.to_string()),
                other => Err(format_error(
                    path,
                    format!("storage key is not a string: {other:?}"),
                )),
            })
            .collect::<Result<Vec<_>>>()?,
        other => {
            return Err(format_error(
                path,
                format!("expected the list of storage keys, found {other:?}"),
            ))
        }
    };

    let entries = find_tensor_entries(path, object)?;
    let specs = entries
        .into_iter()
        .map(|(name, obj)| parse_tensor(path, &name, obj).map(|spec| (name, spec)))
        .collect::<Result<Vec<_>>>()?;

    // The element type of each storage is only known from the tensors that use it.
    let mut storage_dtypes: HashMap<&str, (DType, usize)> = HashMap::new();
    for (name, spec) in &specs {
        let dtype = storage_dtype(path, name, &spec.storage.storage_type)?;
        let entry = storage_dtypes
            .entry(spec.storage.key.as_str())
            .or_insert((dtype, spec.storage.numel));
        if entry.0 != dtype {
            return Err(format_error(
                path,
                format!(
                    "storage `{}` is used with two element types ({:?} and {dtype:?})",
                    spec.storage.key, entry.0
                ),
            ));
        }
    }

    // Locate every storage's bytes in the data that follows the pickles.
    let data_start = usize::try_from(cursor.position())
        .map_err(|_| format_error(path, "file offset out of range"))?;
    let mut pos = data_start;
    let mut storages: HashMap<&str, (DType, &[u8])> = HashMap::new();
    for key in &keys {
        let Some(&(dtype, numel)) = storage_dtypes.get(key.as_str()) else {
            return Err(format_error(
                path,
                format!("storage `{key}` is listed but no tensor uses it, so its element size is unknown"),
            ));
        };
        let count_bytes = bytes.get(pos..pos + 8).ok_or_else(|| {
            format_error(path, format!("truncated at the header of storage `{key}`"))
        })?;
        let mut count = [0u8; 8];
        count.copy_from_slice(count_bytes);
        let count = u64::from_le_bytes(count);
        if count != numel as u64 {
            return Err(format_error(
                path,
                format!("storage `{key}` holds {count} elements but the tensors declare {numel}"),
            ));
        }
        pos += 8;
        let len = numel
            .checked_mul(dtype.size_in_bytes())
            .ok_or_else(|| format_error(path, format!("storage `{key}` is too large")))?;
        let end = pos
            .checked_add(len)
            .filter(|&end| end <= bytes.len())
            .ok_or_else(|| {
                format_error(
                    path,
                    format!(
                        "truncated: storage `{key}` needs {len} bytes at offset {pos}, the file has {}",
                        bytes.len()
                    ),
                )
            })?;
        storages.insert(key.as_str(), (dtype, &bytes[pos..end]));
        pos = end;
    }

    specs
        .into_iter()
        .map(|(name, spec)| {
            let Some(&(dtype, data)) = storages.get(spec.storage.key.as_str()) else {
                return Err(format_error(
                    path,
                    format!(
                        "tensor `{name}` uses storage `{}`, which the file does not contain",
                        spec.storage.key
                    ),
                ));
            };
            let tensor = materialise(path, &name, &spec, dtype, data, device)?;
            Ok((name, tensor))
        })
        .collect()
}

/// Where a tensor's storage lives, as recorded by its persistent id.
#[derive(Debug)]
struct StorageRef {
    storage_type: String,
    key: String,
    /// The element count of the whole (root) storage.
    numel: usize,
    /// For storage views, the element offset and length of the view within the root storage.
    view: Option<(usize, usize)>,
}

/// The arguments of `_rebuild_tensor_v2`.
#[derive(Debug)]
struct TensorSpec {
    storage: StorageRef,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

/// Runs candle's unpickler on the next pickle of `cursor`.
fn unpickle<R: BufRead>(path: &Path, cursor: &mut R, what: &str) -> Result<Object> {
    // Candle's unpickler can panic on some malformed inputs (for instance an over-long LONG1
    // shifts past 64 bits in builds with overflow checks); a corrupt file must give an error.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut stack = Stack::empty();
        stack.read_loop(cursor)?;
        stack.finalize()
    }));
    match outcome {
        Ok(Ok(obj)) => Ok(obj),
        Ok(Err(e)) => Err(format_error(
            path,
            format!("cannot unpickle the {what}: {e}"),
        )),
        Err(_) => Err(format_error(
            path,
            format!("cannot unpickle the {what}: malformed pickle"),
        )),
    }
}

/// Finds the `(key, tensor object)` entries of the state dict inside the unpickled object.
fn find_tensor_entries(path: &Path, object: Object) -> Result<Vec<(String, Object)>> {
    let entries = match object {
        Object::Dict(entries) => entries,
        // An OrderedDict with instance attributes (such as `_metadata`) whose state candle did
        // not merge into the dict.
        Object::Build { callable, .. } => match *callable {
            Object::Dict(entries) => entries,
            other => {
                return Err(format_error(
                    path,
                    format!("expected a state dict, found {}", describe(&other)),
                ))
            }
        },
        other => {
            return Err(format_error(
                path,
                format!("expected a state dict, found {}", describe(&other)),
            ))
        }
    };
    let mut tensors = Vec::new();
    let mut nested = None;
    for (key, value) in restore_setitems_order(entries) {
        let Object::Unicode(key) = key else { continue };
        if is_tensor_object(&value) {
            tensors.push((key, value));
        } else if nested.is_none()
            && matches!(key.as_str(), "state_dict" | "model" | "model_state_dict")
            && matches!(value, Object::Dict(_) | Object::Build { .. })
        {
            nested = Some(value);
        }
    }
    match (tensors.is_empty(), nested) {
        (true, Some(inner)) => find_tensor_entries(path, inner),
        _ => Ok(tensors),
    }
}

/// The number of items CPython's pickler puts in one `SETITEMS` batch.
const PICKLE_BATCH_SIZE: usize = 1000;

/// Undoes the item order candle's unpickler gives dicts, if it reverses `SETITEMS` batches.
///
/// Candle 0.11 pops the items of each `SETITEMS` batch off its stack, which reverses them. The
/// pickler writes dict items in batches of [`PICKLE_BATCH_SIZE`], so reversing each chunk of
/// that size restores the file order (a state dict's `_metadata`, merged in by `BUILD` at the
/// end, only perturbs the final chunk and is not a tensor). Whether candle reverses is probed
/// once on a two-item dict, so a future candle that keeps the order is handled too.
fn restore_setitems_order<T>(items: Vec<T>) -> Vec<T> {
    static REVERSES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let reverses = *REVERSES.get_or_init(|| {
        let probe: &[u8] = b"\x80\x02}(X\x01\x00\x00\x00aK\x01X\x01\x00\x00\x00bK\x02u.";
        let mut stack = Stack::empty();
        let parsed = stack.read_loop(&mut Cursor::new(probe)).and_then(|_| stack.finalize());
        matches!(parsed, Ok(Object::Dict(d)) if d.first().is_some_and(|(k, _)| *k == Object::Unicode("b".into())))
    });
    if !reverses {
        return items;
    }
    let mut out = Vec::with_capacity(items.len());
    let mut items = items.into_iter();
    loop {
        let mut chunk: Vec<T> = items.by_ref().take(PICKLE_BATCH_SIZE).collect();
        if chunk.is_empty() {
            break;
        }
        chunk.reverse();
        out.extend(chunk);
    }
    out
}

/// Whether an unpickled object rebuilds a tensor.
fn is_tensor_object(obj: &Object) -> bool {
    match obj {
        Object::Reduce { callable, args } => match callable.as_ref() {
            Object::Class {
                module_name,
                class_name,
            } => match (module_name.as_str(), class_name.as_str()) {
                ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => true,
                ("torch._utils", "_rebuild_parameter")
                | ("torch._tensor", "_rebuild_from_type_v2") => {
                    matches!(args.as_ref(), Object::Tuple(a) if a.first().is_some_and(is_tensor_object_or_callable))
                }
                _ => false,
            },
            _ => false,
        },
        _ => false,
    }
}

/// `_rebuild_from_type_v2` takes the rebuild function itself as its first argument.
fn is_tensor_object_or_callable(obj: &Object) -> bool {
    is_tensor_object(obj)
        || matches!(obj, Object::Class { module_name, class_name }
            if module_name == "torch._utils" && class_name == "_rebuild_tensor_v2")
}

/// Decodes the arguments of a tensor-rebuilding call.
fn parse_tensor(path: &Path, name: &str, obj: Object) -> Result<TensorSpec> {
    let bad = |what: String| format_error(path, format!("tensor `{name}`: {what}"));
    let Object::Reduce { callable, args } = obj else {
        return Err(bad("not a tensor".into()));
    };
    let Object::Class {
        module_name,
        class_name,
    } = *callable
    else {
        return Err(bad("not a tensor".into()));
    };
    let Object::Tuple(mut args) = *args else {
        return Err(bad("rebuild arguments are not a tuple".into()));
    };
    match (module_name.as_str(), class_name.as_str()) {
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {}
        ("torch._utils", "_rebuild_parameter") => {
            if args.is_empty() {
                return Err(bad("empty _rebuild_parameter arguments".into()));
            }
            return parse_tensor(path, name, args.swap_remove(0));
        }
        ("torch._tensor", "_rebuild_from_type_v2") => {
            // The arguments are (function, type, function arguments, state).
            if args.len() < 3 {
                return Err(bad("short _rebuild_from_type_v2 arguments".into()));
            }
            let inner_args = args.swap_remove(2);
            let func = args.swap_remove(0);
            return parse_tensor(
                path,
                name,
                Object::Reduce {
                    callable: Box::new(func),
                    args: Box::new(inner_args),
                },
            );
        }
        (m, c) => return Err(bad(format!("unexpected rebuild function {m}.{c}"))),
    }
    if args.len() < 4 {
        return Err(bad(format!(
            "expected at least 4 rebuild arguments, got {}",
            args.len()
        )));
    }
    let mut args = args.into_iter();
    let (Some(storage), Some(offset), Some(size), Some(stride)) =
        (args.next(), args.next(), args.next(), args.next())
    else {
        return Err(bad("missing rebuild arguments".into()));
    };
    let Object::PersistentLoad(storage) = storage else {
        return Err(bad("the storage is not a persistent id".into()));
    };
    let storage = parse_storage(*storage).map_err(bad)?;
    let offset = as_usize(&offset).ok_or_else(|| bad(format!("bad storage offset {offset:?}")))?;
    let size = as_usize_tuple(&size).ok_or_else(|| bad(format!("bad size {size:?}")))?;
    let stride = as_usize_tuple(&stride).ok_or_else(|| bad(format!("bad stride {stride:?}")))?;
    if size.len() != stride.len() {
        return Err(bad(format!(
            "size {size:?} and stride {stride:?} differ in length"
        )));
    }
    Ok(TensorSpec {
        storage,
        offset,
        size,
        stride,
    })
}

/// Decodes a storage persistent id `("storage", storage_type, key, location, numel[, view])`.
fn parse_storage(obj: Object) -> std::result::Result<StorageRef, String> {
    let Object::Tuple(items) = obj else {
        return Err(format!("persistent id is not a tuple: {obj:?}"));
    };
    if items.len() < 5 {
        return Err(format!("persistent id too short: {items:?}"));
    }
    if !matches!(&items[0], Object::Unicode(s) if s == "storage") {
        return Err(format!("persistent id is not a storage: {:?}", items[0]));
    }
    let storage_type = match &items[1] {
        Object::Class { class_name, .. } => class_name.clone(),
        Object::Unicode(s) => s.clone(),
        other => return Err(format!("bad storage type {other:?}")),
    };
    let key = match &items[2] {
        Object::Unicode(s) => s.clone(),
        Object::Int(i) => i.to_string(),
        Object::Long(i) => i.to_string(),
        other => return Err(format!("bad storage key {other:?}")),
    };
    let numel = as_usize(&items[4]).ok_or_else(|| format!("bad storage size {:?}", items[4]))?;
    let view = match items.get(5) {
        None | Some(Object::None) => None,
        Some(Object::Tuple(v)) if v.len() == 3 => {
            let offset = as_usize(&v[1]).ok_or_else(|| format!("bad view offset {:?}", v[1]))?;
            let len = as_usize(&v[2]).ok_or_else(|| format!("bad view size {:?}", v[2]))?;
            Some((offset, len))
        }
        Some(other) => return Err(format!("bad storage view metadata {other:?}")),
    };
    Ok(StorageRef {
        storage_type,
        key,
        numel,
        view,
    })
}

/// Maps a PyTorch storage class to a candle element type.
fn storage_dtype(path: &Path, key: &str, storage_type: &str) -> Result<DType> {
    Ok(match storage_type {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "ByteStorage" | "BoolStorage" => DType::U8,
        "ShortStorage" => DType::I16,
        "IntStorage" => DType::I32,
        "LongStorage" => DType::I64,
        other => {
            return Err(BackboneError::UnsupportedStorage {
                path: path.to_path_buf(),
                key: key.to_string(),
                storage_type: other.to_string(),
            })
        }
    })
}

/// Copies a tensor out of its storage bytes, following its offset and strides.
fn materialise(
    path: &Path,
    name: &str,
    spec: &TensorSpec,
    dtype: DType,
    storage: &[u8],
    device: &Device,
) -> Result<Tensor> {
    let bad = |what: String| format_error(path, format!("tensor `{name}`: {what}"));
    let elem = dtype.size_in_bytes();
    // The bytes actually present bound every access, whatever the pickle declares.
    let root_numel = storage.len() / elem;
    // A storage view restricts the tensor to a window of its root storage.
    let (base, available) = match spec.storage.view {
        None => (0, root_numel),
        Some((offset, len)) => {
            if offset.checked_add(len).is_none_or(|e| e > root_numel) {
                return Err(bad(format!(
                    "storage view {offset}+{len} exceeds the storage's {root_numel} elements"
                )));
            }
            (offset, len)
        }
    };
    let numel = spec
        .size
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("size {:?} overflows", spec.size)))?;
    if numel > 0 {
        // The furthest element the tensor reaches must lie inside the (view of the) storage.
        let last = spec
            .size
            .iter()
            .zip(&spec.stride)
            .try_fold(spec.offset, |acc, (&d, &s)| {
                (d - 1).checked_mul(s).and_then(|x| acc.checked_add(x))
            })
            .ok_or_else(|| bad("offset and strides overflow".into()))?;
        if last >= available {
            return Err(bad(format!(
                "offset {} with size {:?} and stride {:?} reaches element {last}, but the storage has {available}",
                spec.offset, spec.size, spec.stride
            )));
        }
    }
    let start = base + spec.offset;
    let contiguous_strides = contiguous_strides(&spec.size);
    let data: Vec<u8> = if numel == 0 {
        Vec::new()
    } else if spec
        .size
        .iter()
        .zip(&spec.stride)
        .zip(&contiguous_strides)
        .all(|((&d, &s), &c)| d == 1 || s == c)
    {
        storage[start * elem..(start + numel) * elem].to_vec()
    } else {
        // A general strided gather, walking the tensor in row-major order.
        let mut out = Vec::with_capacity(numel * elem);
        let mut index = vec![0usize; spec.size.len()];
        for _ in 0..numel {
            let src = start
                + index
                    .iter()
                    .zip(&spec.stride)
                    .map(|(&i, &s)| i * s)
                    .sum::<usize>();
            out.extend_from_slice(&storage[src * elem..(src + 1) * elem]);
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < spec.size[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        out
    };
    Tensor::from_raw_buffer(&data, dtype, &spec.size, device).map_err(|e| bad(e.to_string()))
}

/// The strides of a row-major contiguous tensor of the given size.
fn contiguous_strides(size: &[usize]) -> Vec<usize> {
    let mut strides = vec![1usize; size.len()];
    for d in (0..size.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1].saturating_mul(size[d + 1]);
    }
    strides
}

/// Reads a zip-format (PyTorch 1.6+) checkpoint through candle, keeping the pickle's order.
fn read_zip(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let wrap = |e: candle_core::Error| format_error(path, e.to_string());
    let infos = candle_core::pickle::read_pth_tensor_info(path, false, None).map_err(wrap)?;
    let infos = restore_setitems_order(infos);
    let reader = candle_core::pickle::PthTensors::new(path, None).map_err(wrap)?;
    let mut out = Vec::with_capacity(infos.len());
    for info in infos {
        let tensor = reader
            .get(&info.name)
            .map_err(|e| format_error(path, format!("tensor `{}`: {e}", info.name)))?
            .ok_or_else(|| format_error(path, format!("tensor `{}` vanished", info.name)))?;
        out.push((info.name, tensor.to_device(device)?));
    }
    Ok(out)
}

/// Reads a safetensors file; tensors come out sorted by name.
fn read_safetensors(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let map = candle_core::safetensors::load(path, device)
        .map_err(|e| format_error(path, e.to_string()))?;
    let mut tensors: Vec<_> = map.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(tensors)
}

/// Strips `module.` from every key when all keys start with it.
fn strip_module_prefix(tensors: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    const PREFIX: &str = "module.";
    if tensors.iter().all(|(k, _)| k.starts_with(PREFIX)) {
        tensors
            .into_iter()
            .map(|(k, t)| (k[PREFIX.len()..].to_string(), t))
            .collect()
    } else {
        tensors
    }
}

/// A non-negative pickled integer as `usize`.
fn as_usize(obj: &Object) -> Option<usize> {
    match obj {
        Object::Int(i) => usize::try_from(*i).ok(),
        Object::Long(i) => usize::try_from(*i).ok(),
        _ => None,
    }
}

/// A pickled tuple of non-negative integers.
fn as_usize_tuple(obj: &Object) -> Option<Vec<usize>> {
    match obj {
        Object::Tuple(items) => items.iter().map(as_usize).collect(),
        _ => None,
    }
}

/// A short description of an unpickled object for error messages.
fn describe(obj: &Object) -> String {
    let text = format!("{obj:?}");
    if text.len() > 120 {
        format!("{}…", &text[..text.floor_char_boundary_compat(120)])
    } else {
        text
    }
}

/// `str::floor_char_boundary` is not stable on the minimum supported Rust version.
trait FloorCharBoundary {
    fn floor_char_boundary_compat(&self, index: usize) -> usize;
}

impl FloorCharBoundary for str {
    fn floor_char_boundary_compat(&self, index: usize) -> usize {
        let mut i = index.min(self.len());
        while !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}

/// Builds a [`BackboneError::Format`].
pub(crate) fn format_error(path: &Path, reason: impl Into<String>) -> BackboneError {
    BackboneError::Format {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Builds a [`BackboneError::Io`].
pub(crate) fn io_error(path: &Path, source: std::io::Error) -> BackboneError {
    BackboneError::Io {
        path: PathBuf::from(path),
        source,
    }
}
